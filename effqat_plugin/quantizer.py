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


def clamp_grid(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp() onto the integer grid in the forward pass; in the backward pass gradient 1 on the
    closed range [lo, hi] and 0 outside it. That is the subgradient straight-through QAT is written
    against (EfficientQAT's reference, and torch's own clamp from 2018 on: pytorch#7049). torch 2.14
    (pinned) changed clamp's gradient at a scalar bound to 0 (pytorch#191142), which would freeze
    every weight whose code sits on the lowest or highest integer: on SmolLM2-135M 22% of them at
    w2g64 (min/max init) and 32% at Q2_K (llama.cpp's fit). The forward values are clamp()'s exactly."""
    return torch.where((x >= lo) & (x <= hi), x, x.detach().clamp(lo, hi))


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
    q = clamp_grid(round_ste(w / s_full) + z_full, 0, maxq)
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


# ==================================================================================================
# llama.cpp's K grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), trained rather than rounded
# ==================================================================================================
# Every row (along in_features) is cut into super-blocks of 256 weights; each super-block into
# sub-blocks of 16 or 32. One weight is
#
#     x = (d * sc) * q - (dmin * m)        asymmetric: Q2_K, Q4_K, Q5_K
#     x = (d * sc) * q                     symmetric:  Q3_K, Q6_K
#
# with ``d`` / ``dmin`` fp16 per super-block, ``sc`` / ``m`` small integers per sub-block and ``q`` the
# integer of the weight. Fields are held at their *effective* values (what multiplies), not as stored:
# Q3_K's sc is in [-32, 31] (stored + 32), Q3_K's q in [-4, 3] (stored + 4), Q6_K's sc an int8 and its
# q in [-32, 31] (stored + 32); ``effqat_plugin.converters.gguf_kblocks`` adds the offsets.
#
# Shapes, for a weight ``[out, in]`` with ``nsb = in // 256`` and ``ng`` sub-blocks per super-block:
# d, dmin ``[out, nsb]``; sc, m ``[out, nsb, ng]``; q ``[out, in]``.
#
# The products are formed exactly as ggml (and ``gguf.quants.dequantize``) does them: fp16 d/dmin
# widened to fp32, then ``d * sc`` and ``dmin * m`` in fp32, then ``(d * sc) * q - (dmin * m)`` in fp32,
# one rounding per operation. So a fake-quant forward equals the decoded GGUF bytes bit for bit.
# (Both products are exact in fp32 here: an fp16 significand of 11 bits times sc (at most 7 significant
# bits) times q (at most 5) needs at most 23 bits; the one rounding is the subtraction of dmin * m, so
# even an FMA-contracted C dequantizer gives the same float.)
#
# * Block-AP: :func:`kgrid_fake_quantize` / :class:`KGridFakeQuantLinear` train W, d, dmin and the
#   continuous sc, m. q = clamp(round((W + dmin*m) / (d*sc))) is recomputed each step, as ggml's
#   quantizers compute it (round half to even in fp32, like ggml's nearest_int); rounding of q, sc, m
#   and the fp16 rounding of d, dmin are straight-through; q's clamp is :func:`clamp_grid` (dW = 1 on the
#   closed grid, 0 outside it, as in :func:`fake_quantize`), sc / m's clamps are straight-through (as z's above).
# * E2E-QP: :func:`kgrid_dequantize` / :class:`KGridFrozenWeight`: q, sc, m frozen integers, only
#   d and dmin train (EfficientQAT's "train only the step sizes", on llama.cpp's grid).
# * Initialization: llama.cpp's own fit (``effqat_plugin.llama_cpp_quants.llama_cpp_fit``). Where
#   d * sc == 0 every q gives the same weight; q is then taken as 0 here (ggml keeps its search's q,
#   so bytes may differ there, never values).
#
# The uniform 32-wide legacy types llama.cpp's presets fall back to for rows that are not a multiple
# of 256 (or choose outright, e.g. Q8_0) are the same grid with one block of 32 and no sub-block
# scale (sc fixed at 1): Q4_0 ``x = d * q``, q in [-8, 7] (stored + 8); Q5_0 q in [-16, 15] (stored
# + 16); Q8_0 q an int8; and the asymmetric Q4_1 / Q5_1 ``x = d * q + m`` (q in [0, 15] / [0, 31],
# fp16 m per block), which is this grid's ``d * q - dmin * m`` with m fixed at 1 and dmin = -m
# (``UNIFORM32_GRIDS``). E2E-QP trains their fp16 d (and dmin) the same way. Block-AP
# trains their weights through llama.cpp's own quantizer instead (``gguf_weights.RoundTripLinear``):
# ggml's legacy quantizers round against the unrounded d, not its fp16 value as the K quantizers do,
# so recomputing q here would not reproduce llama-quantize's bytes for an untrained run.

from dataclasses import dataclass as _dataclass

QK_K = 256
FP16_MAX = 65504.0


@_dataclass(frozen=True)
class KGrid:
    """One block type's grid: sub-block width, the ranges of the effective q, sc and m, and the
    (super-)block width that one d (and dmin) covers."""
    name: str
    group: int
    q_lo: int
    q_hi: int
    sc_lo: int
    sc_hi: int
    m_hi: int | None = None      # None: symmetric (no dmin, no m)
    block: int = QK_K
    m_lo: int = 0                # 1 (with m_hi 1): m fixed, one dmin per block (Q4_1, Q5_1)

    @property
    def n_groups(self) -> int:
        return self.block // self.group

    @property
    def asymmetric(self) -> bool:
        return self.m_hi is not None


KGRIDS = {
    "Q2_K": KGrid("Q2_K", 16, 0, 3, 0, 15, 15),
    "Q3_K": KGrid("Q3_K", 16, -4, 3, -32, 31),
    "Q4_K": KGrid("Q4_K", 32, 0, 15, 0, 63, 63),
    "Q5_K": KGrid("Q5_K", 32, 0, 31, 0, 63, 63),
    "Q6_K": KGrid("Q6_K", 16, -32, 31, -128, 127),
}
# llama.cpp's uniform 32-wide types (comment above): one fp16 d per block of 32, sc fixed at 1
UNIFORM32_GRIDS = {
    "Q4_0": KGrid("Q4_0", 32, -8, 7, 1, 1, block=32),
    "Q5_0": KGrid("Q5_0", 32, -16, 15, 1, 1, block=32),
    "Q8_0": KGrid("Q8_0", 32, -128, 127, 1, 1, block=32),
    "Q4_1": KGrid("Q4_1", 32, 0, 15, 1, 1, m_hi=1, block=32, m_lo=1),
    "Q5_1": KGrid("Q5_1", 32, 0, 31, 1, 1, m_hi=1, block=32, m_lo=1),
}
_GRIDS = {**KGRIDS, **UNIFORM32_GRIDS}


def kgrid(qtype: str) -> KGrid:
    try:
        return _GRIDS[qtype]
    except KeyError:
        raise ValueError(f"unknown block grid {qtype!r}; one of {', '.join(_GRIDS)}") from None


def check_kgrid_width(in_features: int, qtype: str) -> int:
    """The number of (super-)blocks per row; a ValueError for rows the type cannot hold."""
    g = kgrid(qtype)
    if in_features <= 0 or in_features % g.block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {g.block} long (in_features), got "
                         f"{in_features}; such tensors take llama.cpp's fallback type instead")
    return in_features // g.block


@_dataclass
class KGridParams:
    """The frozen fields of one weight matrix on a K grid (effective values, shapes as above):
    d, dmin float16; sc, m, q int8. dmin and m are None for the symmetric types."""
    qtype: str
    d: torch.Tensor
    sc: torch.Tensor
    q: torch.Tensor
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None
    bias: torch.Tensor | None = None   # the linear's bias (not part of the grid; F32 in GGUF)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights ``[out, in]``, exactly as ggml decodes the blocks (float32, then ``dtype``)."""
        with torch.no_grad():
            return kgrid_dequantize(self.q, self.sc, self.d, self.qtype, self.m, self.dmin).to(dtype)


class _Fp16RoundSTE(torch.autograd.Function):
    """Nearest fp16 value (clamped to fp16's finite range), held in float32; identity gradient.
    A custom function rather than the ``(a - x).detach() + x`` trick: that trick turns -0.0 into
    +0.0, and a super-block scale of -0.0 decodes to differently signed zeros in ggml."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-FP16_MAX, FP16_MAX).half().float()

    @staticmethod
    def backward(ctx, grad):
        return grad


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value in the forward pass (exactly that value, in float32), identity
    gradient in the backward pass (straight through the rounding and the clamp to +-65504)."""
    return _Fp16RoundSTE.apply(x.float())


def _kgrid_views(g: KGrid, out: int, in_features: int):
    return out, in_features // g.block, g.n_groups, g.group


def _kgrid_steps(d, sc, dmin, m, g: KGrid, ste: bool):
    """``d * sc`` and ``dmin * m`` ([out, nsb, ng], fp32) from trainable or frozen fields."""
    if ste:
        d32 = fp16_ste(d)
        sci = clamp_ste(round_ste(sc.float()), g.sc_lo, g.sc_hi)
    else:
        d32, sci = d.float(), sc.float()
    step = d32[..., None] * sci
    if not g.asymmetric:
        return step, None
    if ste:
        mi = clamp_ste(round_ste(m.float()), g.m_lo, g.m_hi)
        dmin32 = fp16_ste(dmin)
    else:
        mi, dmin32 = m.float(), dmin.float()
    return step, dmin32[..., None] * mi


def _kgrid_q(wg: torch.Tensor, step: torch.Tensor, mn: torch.Tensor | None, g: KGrid) -> torch.Tensor:
    """q = clamp(round((W + dmin*m) / (d*sc))) with a straight-through round (0 where d*sc == 0)."""
    step = step[..., None]
    num = wg if mn is None else wg + mn[..., None]
    dead = step == 0
    q = clamp_grid(round_ste(num / torch.where(dead, torch.ones_like(step), step)), g.q_lo, g.q_hi)
    return torch.where(dead, torch.zeros_like(q), q)


def _kgrid_combine(step, mn, q):
    x = step[..., None] * q
    return x if mn is None else x - mn[..., None]


def _check_fields(qtype, shape, d, sc, dmin, m):
    g = kgrid(qtype)
    out, inf = shape
    nsb = check_kgrid_width(inf, qtype)
    if tuple(d.shape) != (out, nsb) or tuple(sc.shape) != (out, nsb, g.n_groups):
        raise ValueError(f"{qtype} fields for a [{out}, {inf}] weight: d [{out}, {nsb}], sc "
                         f"[{out}, {nsb}, {g.n_groups}]; got d {list(d.shape)}, sc {list(sc.shape)}")
    if g.asymmetric:
        if dmin is None or m is None:
            raise ValueError(f"{qtype} is asymmetric: it needs dmin and m")
        if tuple(dmin.shape) != tuple(d.shape) or tuple(m.shape) != tuple(sc.shape):
            raise ValueError(f"{qtype}: dmin must be shaped like d and m like sc")
    elif dmin is not None or m is not None:
        raise ValueError(f"{qtype} is symmetric: it has no dmin or m")
    return g


def kgrid_fake_quantize(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, qtype: str,
                        dmin: torch.Tensor | None = None, m: torch.Tensor | None = None) -> torch.Tensor:
    """Block-AP's differentiable weight on a K grid: gradients reach W, d, dmin, sc and m."""
    g = _check_fields(qtype, w.shape, d, sc, dmin, m)
    out, nsb, ng, gs = _kgrid_views(g, *w.shape)
    step, mn = _kgrid_steps(d, sc, dmin, m, g, ste=True)
    q = _kgrid_q(w.float().reshape(out, nsb, ng, gs), step, mn, g)
    return _kgrid_combine(step, mn, q).reshape(out, nsb * g.block)


@torch.no_grad()
def kgrid_freeze(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, qtype: str,
                 dmin: torch.Tensor | None = None, m: torch.Tensor | None = None) -> KGridParams:
    """The integers and fp16 scales of a fake-quant state; their :meth:`KGridParams.dequantize`
    equals :func:`kgrid_fake_quantize` of the same state bit for bit."""
    g = _check_fields(qtype, w.shape, d, sc, dmin, m)
    out, nsb, ng, gs = _kgrid_views(g, *w.shape)
    step, mn = _kgrid_steps(d, sc, dmin, m, g, ste=True)
    q = _kgrid_q(w.float().reshape(out, nsb, ng, gs), step, mn, g)
    d16 = fp16_ste(d).half()
    sci = sc.float().round().clamp(g.sc_lo, g.sc_hi).to(torch.int8)
    kw = {}
    if g.asymmetric:
        kw = dict(dmin=fp16_ste(dmin).half(), m=m.float().round().clamp(g.m_lo, g.m_hi).to(torch.int8))
    return KGridParams(qtype, d16, sci, q.reshape(out, nsb * g.block).to(torch.int8), **kw)


def kgrid_dequantize(q: torch.Tensor, sc: torch.Tensor, d: torch.Tensor, qtype: str,
                     m: torch.Tensor | None = None, dmin: torch.Tensor | None = None) -> torch.Tensor:
    """E2E-QP's weight: frozen integers q, sc, m; d and dmin may be trainable fp32 tensors (rounded to
    fp16 straight-through, so what trains is what is stored). Gradients reach d and dmin only."""
    g = _check_fields(qtype, q.shape, d, sc, dmin, m)
    out, nsb, ng, gs = _kgrid_views(g, *q.shape)
    d32 = fp16_ste(d)
    step = d32[..., None] * sc.float()
    mn = None if not g.asymmetric else fp16_ste(dmin)[..., None] * m.float()
    return _kgrid_combine(step, mn, q.float().reshape(out, nsb, ng, gs)).reshape(out, nsb * g.block)


class KGridFakeQuantLinear(nn.Module):
    """A Linear on a K grid whose weight, d, dmin, sc and m all train (Block-AP's unit of work),
    initialized from a fit of the weight (llama.cpp's: ``llama_cpp_quants.llama_cpp_fit``)."""

    def __init__(self, linear: nn.Linear, init: KGridParams):
        super().__init__()
        self.qtype = init.qtype
        g = _check_fields(init.qtype, tuple(linear.weight.shape), init.d, init.sc, init.dmin, init.m)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.d = nn.Parameter(init.d.float().clone())
        self.sc = nn.Parameter(init.sc.float().clone())
        self.dmin = nn.Parameter(init.dmin.float().clone()) if g.asymmetric else None
        self.m = nn.Parameter(init.m.float().clone()) if g.asymmetric else None
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().clone())

    def quantized_weight(self) -> torch.Tensor:
        return kgrid_fake_quantize(self.weight, self.d, self.sc, self.qtype, self.dmin, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.quantized_weight()
        return F.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def quant_parameters(self):
        return [p for p in (self.d, self.dmin, self.sc, self.m) if p is not None]

    def freeze(self, scales_dtype=None) -> KGridParams:
        """The frozen fields (``scales_dtype`` is ignored: d and dmin are fp16 by the type's definition)."""
        p = kgrid_freeze(self.weight, self.d, self.sc, self.qtype, self.dmin, self.m)
        p.bias = None if self.bias is None else self.bias.detach().clone()
        return p


def code_bits(qtype: str) -> int:
    """Bits per code of E2E-QP's packed q: the fewest of the kernels' packed widths (2, 3, 4, 8) that
    hold the grid's range (Q2_K 2; Q3_K 3; Q4_K, Q4_0, Q4_1 4; the wider grids 8)."""
    g = kgrid(qtype)
    return next(b for b in (2, 3, 4, 8) if g.q_hi - g.q_lo < (1 << b))


class KGridFrozenWeight(nn.Module):
    """E2E-QP's form of one weight on a K grid: q packed at :func:`code_bits` per weight (the kernels'
    int32 layout, ``q - q_lo``), sc and m int8 buffers, d / dmin trainable (fp32 masters, fp16 in the
    forward pass); ``forward()`` returns the float32 weight ``[out, in]``. Packed, Q2_K's codes take a
    quarter of int8's bytes (a 70B model's E2E-QP at Q2_K: 40 GiB of GPU memory by ``effqat plan``, 84
    with int8 codes)."""

    def __init__(self, params: KGridParams):
        super().__init__()
        from .kernels.packing import pack_int_weight

        self.qtype = params.qtype
        g = _check_fields(params.qtype, params.shape, params.d, params.sc, params.dmin, params.m)
        self.q_lo, self.code_bits, self.in_features = g.q_lo, code_bits(params.qtype), params.in_features
        codes = (params.q.to(torch.int16) - g.q_lo).to(torch.uint8)
        self.register_buffer("q_packed", pack_int_weight(codes, self.code_bits))
        self.register_buffer("sc", params.sc.to(torch.int8).clone())
        self.register_buffer("m", params.m.to(torch.int8).clone() if g.asymmetric else None)
        self.d = nn.Parameter(params.d.float().clone())
        self.dmin = nn.Parameter(params.dmin.float().clone()) if g.asymmetric else None

    def codes(self) -> torch.Tensor:
        """q, int8 ``[out, in]``, unpacked."""
        from .kernels.packing import unpack_int_weight

        q = unpack_int_weight(self.q_packed, self.code_bits, self.in_features)
        return (q.to(torch.int16) + self.q_lo).to(torch.int8)

    def forward(self) -> torch.Tensor:
        return kgrid_dequantize(self.codes(), self.sc, self.d, self.qtype, self.m, self.dmin)

    def step_parameters(self):
        """What E2E-QP trains: the fp16 super-block scales d (and dmin)."""
        return [p for p in (self.d, self.dmin) if p is not None]

    @torch.no_grad()
    def to_params(self) -> KGridParams:
        dmin = None if self.dmin is None else fp16_ste(self.dmin).half()
        m = None if self.m is None else self.m.clone()
        return KGridParams(self.qtype, fp16_ste(self.d).half(), self.sc.clone(), self.codes(), dmin, m)


def roundtrip_ste(w: torch.Tensor, roundtrip) -> torch.Tensor:
    """``roundtrip(w)`` (a quantize-dequantize of ``w`` by an outside quantizer, e.g. llama.cpp's for its
    32-wide and non-uniform types) in the forward pass, identity gradient to ``w`` in the backward pass:
    the weights train against the exact grid they will be stored on, while the grid's scales are that
    quantizer's own fit of the current weights (they have no gradient)."""
    with torch.no_grad():
        w_hat = roundtrip(w.detach()).to(w.dtype)
    return (w_hat - w).detach() + w
