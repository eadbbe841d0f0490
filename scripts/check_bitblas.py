#!/usr/bin/env python
"""Check a converted BitBLAS folder on a CUDA machine with bitblas installed.

Loads the BitBLAS folder with ``BACKEND.BITBLAS`` (format="bitblas": our QuantCompress + LOP3 bytes
go straight into BitBLAS's kernels, no repack) and the GPTQ folder it came from with
``BACKEND.TORCH``, then compares (1) every linear's output on random inputs and (2) the logits.

    python scripts/check_bitblas.py BITBLAS_DIR GPTQ_DIR [--tokens 16] [--atol 2e-2]

If only one folder exists, make the other with ``effqat convert SRC DST --to bitblas|gptq_v2``.
Exit code 0 when everything matches within tolerance (fp16 kernels accumulate differently, so the
comparison is relative, not bit-exact), 1 otherwise, 2 when CUDA or bitblas is missing.
Note: loading a *GPTQ* folder with BACKEND.BITBLAS goes through GPTQModel's repack, whose
``unpack_gptq_qzeros`` masks zero points with 0xF whatever the width (wrong at 8 bits); loading the
converted ``format="bitblas"`` folder avoids that path.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bitblas_dir")
    ap.add_argument("gptq_dir")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rtol", type=float, default=2e-2, help="max relative error of a module output")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("check_bitblas: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import bitblas  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"check_bitblas: bitblas cannot be imported: {e}", file=sys.stderr)
        return 2
    from gptqmodel import BACKEND, GPTQModel

    dev = "cuda:0"
    bb = GPTQModel.from_quantized(args.bitblas_dir, device=dev, backend=BACKEND.BITBLAS, torch_dtype=torch.float16)
    ref = GPTQModel.from_quantized(args.gptq_dir, device=dev, backend=BACKEND.TORCH, torch_dtype=torch.float16)
    bb_mods = {n: m for n, m in bb.model.named_modules() if hasattr(m, "qweight")}
    ref_mods = {n: m for n, m in ref.model.named_modules() if hasattr(m, "qweight")}
    missing = sorted(set(ref_mods) ^ set(bb_mods))
    if missing:
        print(f"module sets differ: {missing[:5]}")
        return 1
    g = torch.Generator(device=dev).manual_seed(args.seed)
    worst, bad = 0.0, []
    with torch.inference_mode():
        for name in sorted(ref_mods):
            a, b = bb_mods[name], ref_mods[name]
            x = torch.randn(args.tokens, b.in_features, generator=g, device=dev, dtype=torch.float16)
            ya, yb = a(x).float(), b(x).float()
            rel = ((ya - yb).norm() / yb.norm().clamp_min(1e-6)).item()
            worst = max(worst, rel)
            if not torch.isfinite(ya).all() or rel > args.rtol:
                bad.append((name, rel))
        vocab = ref.model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.tokens), generator=g, device=dev)
        la, lb = bb.model(ids).logits.float(), ref.model(ids).logits.float()
        lrel = ((la - lb).norm() / lb.norm().clamp_min(1e-6)).item()
        agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    print(f"{len(ref_mods)} modules: worst relative output error {worst:.2e}; logits rel. error {lrel:.2e}, "
          f"argmax agreement {agree:.1%}")
    for name, rel in bad[:10]:
        print(f"  MISMATCH {name}: relative error {rel:.2e}")
    return 0 if not bad and lrel <= 10 * args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
