"""Block-AP loss comparison: ``--block-loss mse`` against the normalized losses, per layer and end to end.

Two models, each quantized once per loss (same calibration, same seed, default EQATConfig otherwise):

* ``stories260k`` (bundled, 5 layers): calibration and in-domain held-out text sampled from the model
  itself (seeds 0 / 1, as ``scripts/demo.sh`` / ``make_eval_data.py`` do), wikitext-2 test as another text;
* ``gemma-like``: stories260k's weights rescaled so that its residual stream behaves like Gemma's:
  embeddings x sqrt(hidden) (head untied, so the logits' input is unchanged), layer ``i``'s o_proj
  and down_proj x ``growth^i`` (output norms growing with depth) and two "massive" channels written by
  layer 1's MLP (x ``massive``). It is not retrained: the rescaled fp model is the reference, its own
  samples its in-domain text.

Per layer it reports the run's own Block-AP held-out loss (in the units of that loss, so not
comparable across losses) and, comparable across losses, the relative error of the quantized model's
layer outputs on the in-domain held-out text: sum ||h_q - h_fp||^2 / sum ||h_fp||^2. End to end: the
perplexity of fp and quantized model on both texts.

    python scripts/compare_block_loss.py --out runs/block_loss.jsonl   # ~1-2 min per run on one core
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from effqat_plugin.env import prepare_runtime_env, quiet_third_party_logs

prepare_runtime_env()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "effqat_plugin" / "assets" / "stories260k"


def load_stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()


@torch.no_grad()
def gemma_like(growth: float, massive: float):
    """stories260k with a residual stream whose scale grows with depth and two massive channels."""
    from transformers import LlamaForCausalLM

    src = load_stories()
    cfg = src.config
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg).eval()
    state = src.state_dict()
    state["lm_head.weight"] = src.get_input_embeddings().weight.clone()
    model.load_state_dict(state, strict=False)
    model.get_input_embeddings().weight.mul_(math.sqrt(cfg.hidden_size))
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.weight.mul_(growth ** i)
        layer.mlp.down_proj.weight.mul_(growth ** i)
    if len(model.model.layers) > 1:
        model.model.layers[1].mlp.down_proj.weight[[3, 17]] *= massive
    return model


class LayerOutputs:
    """Captures every decoder layer's output hidden states during a forward."""

    def __init__(self, model):
        self.out = {}
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(model.model.layers)]

    def _hook(self, i):
        def hook(_m, _a, output):
            self.out[i] = (output[0] if isinstance(output, (tuple, list)) else output).detach().float()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def layer_outputs(model, ids, bs=8):
    cap = LayerOutputs(model)
    chunks = {}
    try:
        for i in range(0, ids.shape[0], bs):
            model(input_ids=ids[i:i + bs], use_cache=False)
            for k, v in cap.out.items():
                chunks.setdefault(k, []).append(v)
    finally:
        cap.remove()
    return [torch.cat(chunks[k]) for k in sorted(chunks)]


@torch.no_grad()
def ppl(model, ids, rt):
    from effqat_plugin.evaluation import causal_lm_loss

    return math.exp(causal_lm_loss(model, ids, 8, rt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260k,gemma-like")
    ap.add_argument("--losses", default="mse,channel_rms,token_relative")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--growth", type=float, default=2.0, help="gemma-like: per-layer output scale growth")
    ap.add_argument("--massive", type=float, default=40.0, help="gemma-like: gain of the two massive channels")
    ap.add_argument("--wikitext", default="/work/shared/data/wikitext-2/test.txt")
    ap.add_argument("--out", default="runs/block_loss.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    from effqat_plugin import EQATConfig
    from effqat_plugin.data import load_token_file, sample_from_model
    from effqat_plugin.eqat_run import run_eqat
    from effqat_plugin.evaluation import load_tokenizer_for
    from effqat_plugin.runtime import resolve_runtime

    rt = resolve_runtime("cpu")
    other = load_token_file(args.wikitext, load_tokenizer_for(str(STORIES)), seq_len=args.seq_len,
                            n_samples=args.n_eval)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    builders = {"stories260k": load_stories, "gemma-like": lambda: gemma_like(args.growth, args.massive)}
    for name in args.models.split(","):
        fp = builders[name]()
        calib = sample_from_model(fp, args.n_calib, args.seq_len, seed=0)
        in_domain = sample_from_model(fp, args.n_eval, args.seq_len, seed=1)
        fp_h = layer_outputs(fp, in_domain)
        fp_ppl = {"self": ppl(fp, in_domain, rt), "wikitext2": ppl(fp, other, rt)}
        del fp
        for loss in args.losses.split(","):
            model = builders[name]()
            # block_loss only when asked for: the mse rows also run on versions before it existed
            extra = {} if loss == "mse" else {"block_loss": loss}
            cfg = EQATConfig(bits=args.bits, group_size=args.group_size, compute_device="cpu", **extra)
            t0 = time.time()
            res = run_eqat(model, cfg, calib, show_progress=False)
            q_h = layer_outputs(model, in_domain)
            rel = [float((q - f).pow(2).sum() / f.pow(2).sum()) for q, f in zip(q_h, fp_h)]
            e2e = res.e2e
            rec = {"model": name, "block_loss": loss, "bits": args.bits, "group_size": args.group_size,
                   "block_val_loss": [r.val_loss for r in res.block_ap.reports],
                   "fp_rms_per_layer": [round(float(f.pow(2).mean().sqrt()), 3) for f in fp_h],
                   "rel_err_per_layer": rel,
                   "lr_scale": [r.lr_scale for r in res.block_ap.reports],
                   "lr_search": res.block_ap.lr_search,
                   "e2e_epochs": None if e2e is None else [getattr(e2e, "epochs_run", e2e.epochs), e2e.epochs,
                                                           e2e.best_epoch],
                   "fp_ppl": fp_ppl,
                   "q_ppl": {"self": ppl(model, in_domain, rt), "wikitext2": ppl(model, other, rt)},
                   "seconds": round(time.time() - t0, 1)}
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: rec[k] for k in ("model", "block_loss", "rel_err_per_layer", "fp_ppl", "q_ppl",
                                                  "e2e_epochs", "lr_scale", "seconds")}), flush=True)
            del model, res
    return 0


if __name__ == "__main__":
    sys.exit(main())
