"""In-memory packed layout of the integer weights used by every effqat kernel.

Layout (``packed``): int32 tensor ``[ceil(in_features / vpw), out_features]`` with
``vpw = 32 // bits`` values per 32-bit word, packed along the *input* dimension (the GEMM reduction
dimension K), LSB first: input channel ``k`` of output ``n`` lives in word ``packed[k // vpw, n]`` at
bit offset ``bits * (k % vpw)``.

* bits 2 -> 16 values per word, 4 -> 8, 8 -> 4: every bit used.
* **bits 3 -> 10 values per word, top 2 bits of each word unused** (3.2 bits per weight). This is the
  same per-word layout as the original EfficientQAT checkpoints, keeps every value inside one word
  (no straddling, so the unpack is one shift + mask in every backend) and costs 6.7% over a dense
  3-bit stream.
* Ragged ``in_features``: the last word is zero-padded; ``in_features`` is always passed alongside.

Zero points stay ``uint8 [out, n_groups]`` (or a float tensor while they train) and scales
``float [out, n_groups]``: at group size >= 32 they are < 0.3 bit/weight, and unpacked they need no
shift in the kernels.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def values_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def packed_rows(in_features: int, bits: int) -> int:
    vpw = values_per_word(bits)
    return -(-in_features // vpw)


def pack_int_weight(int_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[out, in]`` codes in ``[0, 2**bits)`` -> int32 ``[ceil(in / (32 // bits)), out]``."""
    if int_weight.dim() != 2:
        raise ValueError(f"int_weight must be 2-D [out, in], got {tuple(int_weight.shape)}")
    if int_weight.is_floating_point():
        raise ValueError(f"int_weight must be an integer tensor, got {int_weight.dtype}")
    vpw = values_per_word(bits)
    maxq = (1 << bits) - 1
    out, inf = int_weight.shape
    w = int_weight.to(torch.int64)
    if w.numel() and (int(w.min()) < 0 or int(w.max()) > maxq):
        raise ValueError(f"int_weight has values outside [0, {maxq}] for bits={bits}")
    kp = packed_rows(inf, bits)
    wt = torch.zeros(kp * vpw, out, dtype=torch.int64, device=w.device)
    wt[:inf] = w.t()
    wt = wt.view(kp, vpw, out)
    shifts = (torch.arange(vpw, device=w.device, dtype=torch.int64) * bits).view(1, vpw, 1)
    words = (wt << shifts).sum(dim=1)  # [kp, out] in [0, 2**32)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def unpack_int_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int_weight`: int32 packed -> uint8 ``[out, in_features]``."""
    vpw = values_per_word(bits)
    maxq = (1 << bits) - 1
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be int32 [K/vpw, out], got {packed.dtype} {tuple(packed.shape)}")
    kp, out = packed.shape
    if kp != packed_rows(in_features, bits):
        raise ValueError(
            f"packed has {kp} rows; in_features={in_features} at {bits} bits needs "
            f"{packed_rows(in_features, bits)}")
    shifts = (torch.arange(vpw, device=packed.device, dtype=torch.int32) * bits).view(1, vpw, 1)
    vals = (packed.unsqueeze(1) >> shifts) & maxq  # arithmetic shift; the mask drops sign bits
    return vals.reshape(kp * vpw, out)[:in_features].t().to(torch.uint8).contiguous()
