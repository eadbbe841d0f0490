"""Pure-torch reference implementation: the oracle every other backend is tested against.

Runs on any device. On CPU everything is computed in float32 (accurate oracle, and fast there);
on CUDA the dequantized weight is built in the activation dtype so the forced-reference path keeps
fp16/bf16 memory use (cuBLAS accumulates in fp32). Nothing dequantized outlives a call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from effqat_plugin.qweight import n_groups_for

from .packing import unpack_int_weight

# rows of W handled at once in the grad_s reduction (bounds the fp32 [rows, K] transient)
_GRAD_CHUNK_ELEMS = 1 << 24


def effective_group(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else int(group_size)


def n_groups(group_size: int, in_features: int) -> int:
    """Kernel-side argument order of :func:`effqat_plugin.qweight.n_groups_for`."""
    return n_groups_for(in_features, group_size)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _expand_groups(t: torch.Tensor, gs: int, in_features: int) -> torch.Tensor:
    """[rows, n_groups] -> [rows, in_features] (last group may be partial)."""
    return t.repeat_interleave(gs, dim=1)[:, :in_features]


def int_minus_zero(packed, zeros, bits, group_size, in_features, rows: Optional[slice] = None,
                   dtype=torch.float32) -> torch.Tensor:
    """``W_int - z`` as ``dtype`` ``[out(, rows), in]``."""
    gs = effective_group(group_size, in_features)
    if rows is not None:
        packed = packed[:, rows]
        zeros = zeros[rows]
    w = unpack_int_weight(packed, bits, in_features).to(dtype)
    return w - _expand_groups(zeros.to(dtype), gs, in_features)


def dequantize(packed, scales, zeros, bits, group_size, in_features, dtype=torch.float32,
               rows: Optional[slice] = None) -> torch.Tensor:
    """``(W_int - z) * s`` ``[out, in]`` in ``dtype`` (computed in fp32, then cast)."""
    gs = effective_group(group_size, in_features)
    d = int_minus_zero(packed, zeros, bits, group_size, in_features, rows)
    s = scales if rows is None else scales[rows]
    return (d * _expand_groups(s.to(torch.float32), gs, in_features)).to(dtype)


def forward(x2d, packed, scales, zeros, bits, group_size, in_features) -> torch.Tensor:
    """``x2d [M, K] @ W_hat^T -> [M, N]`` in ``x2d.dtype``."""
    cd = compute_dtype(x2d)
    w = dequantize(packed, scales, zeros, bits, group_size, in_features, cd)
    return (x2d.to(cd) @ w.t()).to(x2d.dtype)


def grad_input(grad_y2d, packed, scales, zeros, bits, group_size, in_features, x_dtype) -> torch.Tensor:
    """``grad_y [M, N] @ W_hat -> [M, K]``."""
    cd = compute_dtype(grad_y2d) if grad_y2d.device.type == "cpu" else x_dtype
    w = dequantize(packed, scales, zeros, bits, group_size, in_features, cd)
    return (grad_y2d.to(cd) @ w).to(x_dtype)


def grad_scales_zeros(x2d, grad_y2d, packed, scales, zeros, bits, group_size, in_features,
                      need_scales: bool = True, need_zeros: bool = False
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """grad_s[o, g] = sum_{i in g} (W_int - z)[o, i] * (grad_y^T x)[o, i];
    grad_z[o, g] = -s[o, g] * sum_{i in g} (grad_y^T x)[o, i]. Both fp32 ``[out, n_groups]``."""
    gs = effective_group(group_size, in_features)
    ng = n_groups(group_size, in_features)
    n_out = scales.shape[0]
    pad = ng * gs - in_features
    xf = x2d.to(torch.float32)
    gyf = grad_y2d.to(torch.float32)
    gsc = torch.empty(n_out, ng, dtype=torch.float32, device=x2d.device) if need_scales else None
    gz = torch.empty(n_out, ng, dtype=torch.float32, device=x2d.device) if need_zeros else None
    chunk = max(1, _GRAD_CHUNK_ELEMS // max(1, in_features))
    for n0 in range(0, n_out, chunk):
        rows = slice(n0, min(n_out, n0 + chunk))
        g = gyf[:, rows].t() @ xf  # [rows, K]
        if need_scales:
            d = int_minus_zero(packed, zeros, bits, group_size, in_features, rows)
            prod = torch.nn.functional.pad(g * d, (0, pad))
            gsc[rows] = prod.view(-1, ng, gs).sum(-1)
        if need_zeros:
            gsum = torch.nn.functional.pad(g, (0, pad)).view(-1, ng, gs).sum(-1)
            gz[rows] = -scales[rows].to(torch.float32) * gsum
    return gsc, gz
