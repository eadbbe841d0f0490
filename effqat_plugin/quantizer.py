"""EfficientQAT's uniform group quantizer: init, straight-through fake quant, freezing.

Asymmetric by default (a learned zero point per group, as in the paper). ``sym=True`` fixes every
group's zero point at ``2^(b-1)`` (GPTQ's symmetric convention) and never trains it: the integers
then fit the symmetric kernels (GPTQModel's, vLLM's Marlin for 4/8-bit), which do not read zero points.

This is the only place the quantization math lives. Block-AP trains through `FakeQuantLinear`;
`freeze` turns its learned (W, s, z) into the integers every exporter writes.

Layout: weights are ``[out, in]``; groups run along ``in`` (``group_size`` consecutive input channels);
s and z are ``[out, n_groups]``. A ragged ``in`` (not a multiple of the group) gets a partial last
group, exactly as GPTQ's ``g_idx = i // group_size`` implies.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qweight import QuantizedWeight, n_groups_for

S_MIN, S_MAX = 1e-4, 1e4
Z_LIMIT = 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp() in the forward pass, identity gradient in the backward pass (as in the reference)."""
    return (x.clamp(lo, hi) - x).detach() + x


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``w`` as ``[out, n_groups, g]``; a partial last group is padded with copies of its own
    last channel, so min/max statistics see only real values."""
    out, inf = w.shape
    g = inf if group_size == -1 else group_size
    pad = n_groups_for(inf, group_size) * g - inf
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, g)


def expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in]`` (each group value repeated over its channels)."""
    g = in_features if group_size == -1 else group_size
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def symmetric_zero(bits: int) -> int:
    """The fixed zero point of symmetric mode: the middle code, ``2^(b-1)``."""
    return 1 << (bits - 1)


@torch.no_grad()
def init_scales_zeros(w: torch.Tensor, bits: int, group_size: int, sym: bool = False):
    """Min/max init per group: s = (max - min) / (2^b - 1), z = round(-min / s) (clamped as in the note).

    ``sym``: GPTQ's symmetric init, s = 2 max|w| / (2^b - 1) and z = 2^(b-1), so the group's range
    ``[-max|w|, max|w|]`` spans the codes around the middle one (the top code clips by half a step).
    """
    wg = _group_view(w.float(), group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    maxq = (1 << bits) - 1
    if sym:
        s = (2 * torch.maximum(lo.abs(), hi.abs()) / maxq).clamp(S_MIN, S_MAX)
        return s, torch.full_like(s, float(symmetric_zero(bits)))
    s = ((hi - lo) / maxq).clamp(S_MIN, S_MAX)
    z = (-lo / s).clamp(-Z_LIMIT, Z_LIMIT).round()
    return s, z


def fake_quantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Differentiable W_hat = (clamp(round(W/s) + round(z)) - round(z)) * s with STE roundings."""
    maxq = (1 << bits) - 1
    out, inf = w.shape
    s = clamp_ste(s, S_MIN, S_MAX)
    zr = clamp_ste(round_ste(z), 0, maxq)
    s_full = expand_groups(s, inf, group_size)
    z_full = expand_groups(zr, inf, group_size)
    q = (round_ste(w / s_full) + z_full).clamp(0, maxq)
    return (q - z_full) * s_full


@torch.no_grad()
def quantize_to_ints(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int):
    """The frozen integers of a fake-quant state: (W_int uint8, z uint8, s float32 clamped)."""
    maxq = (1 << bits) - 1
    inf = w.shape[1]
    s = s.float().clamp(S_MIN, S_MAX)
    zi = z.float().round().clamp(0, maxq)
    q = (w.float() / expand_groups(s, inf, group_size)).round() + expand_groups(zi, inf, group_size)
    q = q.clamp(0, maxq)
    return q.to(torch.uint8), zi.to(torch.uint8), s


class FakeQuantLinear(nn.Module):
    """A Linear whose weight, step sizes and zero points all train (Block-AP's unit of work).

    ``sym``: the zero points are a fixed buffer at ``2^(b-1)``, not parameters (nothing trains them)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, sym: bool = False):
        super().__init__()
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().clone()
        self.weight = nn.Parameter(w)
        s, z = init_scales_zeros(w, bits, group_size, sym)
        self.scales = nn.Parameter(s)
        if sym:
            self.register_buffer("zeros", z)
        else:
            self.zeros = nn.Parameter(z)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = fake_quantize(self.weight, self.scales, self.zeros, self.bits, self.group_size)
        return F.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def quant_parameters(self):
        return [self.scales] if self.sym else [self.scales, self.zeros]

    @torch.no_grad()
    def freeze(self, scales_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
        """The learned integers, with s rounded to ``scales_dtype`` (fp16 on disk)."""
        q, z, s = quantize_to_ints(self.weight, self.scales, self.zeros, self.bits, self.group_size)
        bias = None if self.bias is None else self.bias.detach().clone()
        return QuantizedWeight(int_weight=q, zeros=z, scales=s.to(scales_dtype), bits=self.bits,
                               group_size=self.group_size, bias=bias)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, scales_dtype=torch.float16,
                 sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest with min/max init: the untrained starting point (and the RTN baseline)."""
    s, z = init_scales_zeros(w, bits, group_size, sym)
    q, zi, s = quantize_to_ints(w, s, z, bits, group_size)
    return QuantizedWeight(int_weight=q, zeros=zi, scales=s.to(scales_dtype), bits=bits, group_size=group_size)
