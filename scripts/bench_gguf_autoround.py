"""One AutoRound GGUF row of ``scripts/bench_gguf.py``: AutoRound (0.16.1) quantizes the fp model on the
same calibration rows effqat trains on and writes its own GGUF at one of llama.cpp's presets.

Run by bench_gguf in a child process, so that AutoRound can live outside the test environment
(``pip install --target DIR --no-deps auto-round==0.16.1 py-cpuinfo``; bench_gguf puts ``DIR`` on the
child's ``PYTHONPATH``) and its memory is returned when the row ends.

* Calibration: ``effqat_plugin.data.load_token_file(--calib, tokenizer, --seq-len, --n-samples)``, the
  very rows ``effqat quantize --calib FILE --n-samples N --seq-len T`` reads, handed to AutoRound as a
  list of token tensors.
* Preset: AutoRound's scheme names (``gguf:q2_k_s``, ``gguf:q3_k_m``, ``gguf:q4_k_m``): it has no plain
  ``q2_k`` mix, so llama.cpp's Q2_K is compared with its Q2_K_S (the table reports each file's size).
* ``--iters``: AutoRound's tuning iterations (200 its default; 0 its RTN search, which AutoRound itself
  recommends for GGUF at bit widths other than 3); ``--alg-ext``: its "enhanced GGUF" algorithm.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PRESETS = {"Q2_K": "gguf:q2_k_s", "Q3_K_M": "gguf:q3_k_m", "Q4_K_M": "gguf:q4_k_m",
           "Q3_K_S": "gguf:q3_k_s", "Q4_K_S": "gguf:q4_k_s", "Q5_K_M": "gguf:q5_k_m", "Q6_K": "gguf:q6_k"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--calib", required=True)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--alg-ext", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effqat_plugin.data import load_token_file

    tok = AutoTokenizer.from_pretrained(args.model)
    rows = load_token_file(args.calib, tok, seq_len=args.seq_len, n_samples=args.n_samples)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".autoround-") as tmp:
        ar = AutoRound(model, tok, scheme=PRESETS[args.preset], iters=args.iters,
                       enable_alg_ext=args.alg_ext, dataset=[r[None] for r in rows],
                       nsamples=rows.shape[0], seqlen=rows.shape[1], device_map="cpu")
        ar.quantize_and_save(tmp, format=PRESETS[args.preset])
        made = sorted(Path(tmp).rglob("*.gguf"))
        if len(made) != 1:
            sys.exit(f"bench_gguf_autoround: expected one .gguf from AutoRound, found {[str(p) for p in made]}")
        shutil.move(str(made[0]), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
