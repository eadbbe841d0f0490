"""Block-AP learning-rate sweep: lr scale x epochs, per-layer train / held-out loss on the first layers.

Block-AP trains one decoder layer at a time on the outputs of the already-quantized layers before it,
so the first K layers of a model behave exactly as in a full run: loading the model with
``num_hidden_layers=K`` gives the per-layer losses of a full run's first K layers at a fraction of the
cost. ``scale`` is the ``auto`` preset's raise ``k`` over the paper's rates (``lr_rules.block_lrs``):
weights/norms ``k x``, s/z ``1 + (k - 1) * 3 / (2^b - 1)`` x; ``auto`` itself picks
``min(max_lr_scale, paper_tokens / run_tokens)`` (128 at 64 x 256 calibration tokens).

    python scripts/sweep_lr.py --model ~/.cache/effqat/smollm2-135m \\
        --text-calib ../shared/data/wikitext-2/valid.txt --layers 6 --scales 1,8,32,128 --epochs 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from effqat_plugin.env import prepare_runtime_env

prepare_runtime_env()

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text-calib", required=True)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--scales", default="1,8,32,128")
    ap.add_argument("--epochs", default="1,2")
    ap.add_argument("--out", default="runs/sweep_lr.jsonl", help="one JSON line per run (appended; finished runs skipped)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from effqat_plugin import EQATConfig, lr_rules
    from effqat_plugin.data import load_token_file
    from effqat_plugin.evaluation import load_tokenizer_for
    from effqat_plugin.layout import definition_for
    from effqat_plugin.eqat_run import run_eqat

    ids = load_token_file(args.text_calib, load_tokenizer_for(args.model), seq_len=args.calib_len,
                          n_samples=args.n_calib)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["bits"], r["group_size"], r["scale"], r["epochs"], r["n_calib"]) for r in map(json.loads, f)}
    for epochs in [int(e) for e in args.epochs.split(",")]:
        for scale in [float(s) for s in args.scales.split(",")]:
            key = (args.bits, args.group_size, scale, epochs, ids.shape[0])
            if key in done:
                continue
            q_lr, w_lr = lr_rules.block_lrs(args.bits, "auto", 1e9, 1, scale=scale)
            cfg = EQATConfig(bits=args.bits, group_size=args.group_size, block_epochs=epochs, e2e_epochs=0,
                             block_quant_lr=q_lr, block_weight_lr=w_lr)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                         num_hidden_layers=args.layers).eval()
            t0 = time.time()
            res = run_eqat(model, cfg, ids, definition=definition_for(model.config.model_type), show_progress=False)
            rec = {"bits": args.bits, "group_size": args.group_size, "scale": scale, "epochs": epochs,
                   "n_calib": int(ids.shape[0]), "calib_len": int(ids.shape[1]), "quant_lr": q_lr, "weight_lr": w_lr,
                   "train": [round(r.train_loss, 6) for r in res.block_ap.reports],
                   "val": [None if r.val_loss is None else round(r.val_loss, 6) for r in res.block_ap.reports],
                   "seconds": round(time.time() - t0, 1)}
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
            del model, res
    return 0


if __name__ == "__main__":
    sys.exit(main())
