"""Triton kernels reading the packed layout directly (see :mod:`.packing`).

* ``dequant``  : packed int32 -> ``(W_int - z) * s`` ``[out, in]`` in fp16/bf16/fp32.
* ``gemv``     : y = x W^T for 1..4 rows, split-K, fp32 atomics (batch-1 decoding).
* ``gemm``     : fused dequant-GEMM y = x W^T (tl.dot, fp32 accumulate) for up to ``FUSED_MAX_M`` rows.
* ``gemm_dx``  : fused grad_x = grad_y W for up to ``FUSED_MAX_M`` rows.
* ``grad_sz``  : fused grad_s (and grad_z) reduction: per (out block, group) program,
                 G = grad_y^T x accumulated over tokens on the fly, then sum_k G * (W_int - z);
                 neither G nor W is materialised. Deterministic (no atomics).
Above ``FUSED_MAX_M`` rows the forward / grad_x dequantize into a transient fp16/bf16 weight (CUDA
extension if built, else the Triton dequant kernel) and call cuBLAS, which is faster for
training-sized token counts; the transient is freed before returning.

Shapes: everything the reference supports (bits 2/3/4/8, any group size incl. -1, ragged K and N).
Falls back to the reference only for empty inputs and float64 activations. Groups that are a
multiple of the K tile take a fast path (one z/s vector per tile); others gather z/s per element.

Kernels are built lazily: with ``TRITON_INTERPRET=1`` in the environment at first use they are
wrapped as interpreter functions (CPU tensors), otherwise compiled for the GPU.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch

from . import reference as _ref
from ._util import new_output
from .packing import values_per_word

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except Exception:  # pragma: no cover - annotations below still need tl.constexpr
    class tl:  # noqa: N801
        constexpr = None
    triton = None
    AVAILABLE = False

FUSED_MAX_M = int(os.environ.get("EFFQAT_FUSED_MAX_M", "64"))
GEMV_MAX_M = 4
_TL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# kernel bodies (plain functions; wrapped by _kernels())
# ----------------------------------------------------------------------------------------------
def _dequant_kernel(P, Z, S, OUT, N, K, gs, stride_pk, stride_zn, stride_sn, stride_on,
                    BITS: tl.constexpr, VPW: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    words = tl.load(P + (offs_k[None, :] // VPW) * stride_pk + offs_n[:, None], mask=mask, other=0)
    w = (words >> ((offs_k[None, :] % VPW) * BITS)) & ((1 << BITS) - 1)
    g = offs_k[None, :] // gs
    z = tl.load(Z + offs_n[:, None] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    s = tl.load(S + offs_n[:, None] * stride_sn + g, mask=mask, other=0).to(tl.float32)
    val = (w.to(tl.float32) - z) * s
    tl.store(OUT + offs_n[:, None] * stride_on + offs_k[None, :], val.to(OUT.dtype.element_ty),
             mask=mask)


def _gemv_kernel(X, P, Z, S, Y, M, N, K, gs, k_split, stride_xm, stride_pk, stride_zn, stride_sn,
                 stride_ym, BITS: tl.constexpr, VPW: tl.constexpr, M_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    nmask = offs_n < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * k_split
    for kk in range(0, k_split, BLOCK_K):
        offs_k = k_begin + kk + tl.arange(0, BLOCK_K)
        kmask = (offs_k < K) & (kk + tl.arange(0, BLOCK_K) < k_split)
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(P + (offs_k[:, None] // VPW) * stride_pk + offs_n[None, :], mask=wmask,
                        other=0)
        w = ((words >> ((offs_k[:, None] % VPW) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        g = offs_k[:, None] // gs
        z = tl.load(Z + offs_n[None, :] * stride_zn + g, mask=wmask, other=0).to(tl.float32)
        s = tl.load(S + offs_n[None, :] * stride_sn + g, mask=wmask, other=0).to(tl.float32)
        b = (w - z) * s  # [BK, BN]
        a = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    tl.atomic_add(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                  mask=(offs_m[:, None] < M) & nmask[None, :])


def _gemm_kernel(X, P, Z, S, Y, M, N, K, gs, stride_xm, stride_pk, stride_zn, stride_sn, stride_ym,
                 BITS: tl.constexpr, VPW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_ALIGNED: tl.constexpr, PREC: tl.constexpr,
                 DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + rk
        kmask = offs_k < K
        a = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(P + (offs_k[:, None] // VPW) * stride_pk + offs_n[None, :], mask=wmask,
                        other=0)
        w = ((words >> ((offs_k[:, None] % VPW) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        if GROUP_ALIGNED:
            g = k0 // gs
            z = tl.load(Z + offs_n * stride_zn + g, mask=nmask, other=0).to(tl.float32)
            s = tl.load(S + offs_n * stride_sn + g, mask=nmask, other=0).to(tl.float32)
            b = (w - z[None, :]) * s[None, :]
        else:
            g2 = offs_k[:, None] // gs
            z2 = tl.load(Z + offs_n[None, :] * stride_zn + g2, mask=wmask, other=0).to(tl.float32)
            s2 = tl.load(S + offs_n[None, :] * stride_sn + g2, mask=wmask, other=0).to(tl.float32)
            b = (w - z2) * s2
        bq = b.to(X.dtype.element_ty)
        if DOT_F32:  # interpreter: its tl.dot multiplies raw bf16 bits; upcast exact values
            acc = tl.dot(a.to(tl.float32), bq.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bq, acc, input_precision=PREC)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _gemm_dx_kernel(GY, P, Z, S, GX, M, N, K, gs, stride_gm, stride_pk, stride_zn, stride_sn,
                    stride_xm, BITS: tl.constexpr, VPW: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_ALIGNED: tl.constexpr, PREC: tl.constexpr,
                 DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    kmask = offs_k < K
    shift = (offs_k % VPW) * BITS
    wrow = (offs_k // VPW) * stride_pk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + rn
        nmask = offs_n < N
        a = tl.load(GY + offs_m[:, None] * stride_gm + offs_n[None, :],
                    mask=mmask[:, None] & nmask[None, :], other=0.0)
        wmask = nmask[:, None] & kmask[None, :]
        words = tl.load(P + wrow[None, :] + offs_n[:, None], mask=wmask, other=0)
        w = ((words >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BK]
        if GROUP_ALIGNED:
            g = (pid_k * BLOCK_K) // gs
            z = tl.load(Z + offs_n * stride_zn + g, mask=nmask, other=0).to(tl.float32)
            s = tl.load(S + offs_n * stride_sn + g, mask=nmask, other=0).to(tl.float32)
            b = (w - z[:, None]) * s[:, None]
        else:
            g2 = offs_k[None, :] // gs
            z2 = tl.load(Z + offs_n[:, None] * stride_zn + g2, mask=wmask, other=0).to(tl.float32)
            s2 = tl.load(S + offs_n[:, None] * stride_sn + g2, mask=wmask, other=0).to(tl.float32)
            b = (w - z2) * s2
        bq = b.to(GY.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), bq.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bq, acc, input_precision=PREC)
    tl.store(GX + offs_m[:, None] * stride_xm + offs_k[None, :], acc.to(GX.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])


def _grad_sz_kernel(X, GY, P, Z, S, GS_OUT, GZ_OUT, M, N, K, gs, stride_xm, stride_gm, stride_pk,
                    stride_zn, stride_sn, stride_on, BITS: tl.constexpr, VPW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    NEED_S: tl.constexpr, NEED_Z: tl.constexpr, PREC: tl.constexpr,
                    DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    grp = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    z = tl.load(Z + offs_n * stride_zn + grp, mask=nmask, other=0).to(tl.float32)
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = grp * gs
    for kk in range(0, gs, BLOCK_K):
        offs_k = k_start + kk + rk
        kmask = (kk + rk < gs) & (offs_k < K)
        G = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + rm
            mmask = offs_m < M
            gyt = tl.load(GY + offs_m[None, :] * stride_gm + offs_n[:, None],
                          mask=nmask[:, None] & mmask[None, :], other=0.0)  # [BN, BM]
            xa = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
            if DOT_F32:
                G = tl.dot(gyt.to(tl.float32), xa.to(tl.float32), G, input_precision="ieee")
            else:
                G = tl.dot(gyt, xa, G, input_precision=PREC)
        if NEED_S:
            wmask = nmask[:, None] & kmask[None, :]
            words = tl.load(P + (offs_k[None, :] // VPW) * stride_pk + offs_n[:, None], mask=wmask,
                            other=0)
            w = ((words >> ((offs_k[None, :] % VPW) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            d = tl.where(wmask, w - z[:, None], 0.0)
            acc_s += tl.sum(G * d, axis=1)
        if NEED_Z:
            acc_z += tl.sum(G, axis=1)
    if NEED_S:
        tl.store(GS_OUT + offs_n * stride_on + grp, acc_s, mask=nmask)
    if NEED_Z:
        s = tl.load(S + offs_n * stride_sn + grp, mask=nmask, other=0).to(tl.float32)
        tl.store(GZ_OUT + offs_n * stride_on + grp, -s * acc_z, mask=nmask)


_BODIES = {"dequant": _dequant_kernel, "gemv": _gemv_kernel, "gemm": _gemm_kernel,
           "gemm_dx": _gemm_dx_kernel, "grad_sz": _grad_sz_kernel}
_CACHE = {}


def _language_namespaces():
    """Every namespace Triton's interpreter patches: the language modules and the classes whose
    methods it rebinds (``triton.language`` and ``triton.language.core`` are separate modules that
    share function objects, so both are listed)."""
    import triton.language.core as core
    import triton.language.math as tmath
    import triton.language.standard as std
    return (tl, core, tmath, std, core.tensor, core.dtype, core.tensor_descriptor_base)


@contextlib.contextmanager
def _interpreter_sandbox():
    """Run one interpreter launch and leave ``triton.language`` exactly as it was.

    Two things happen inside:

    * When triton was imported without TRITON_INTERPRET=1, its own @jit helpers (tl.zeros, tl.sum,
      ...) are compiled-mode JITFunctions that refuse to run inside the interpreter; they are
      swapped for interpreted copies.
    * Triton 3.8's interpreter does not undo all of its patches: a *device* function call
      (``InterpretedFunction.__call__``, e.g. ``tl.sum`` inside a kernel) rebinds ~60 builtins of
      ``triton.language.core`` (``arange``, ``full``, ``cast``, ...) to interpreter versions and
      never restores them, and rewriting such a helper injects the interpreter's globals into
      ``triton.language.standard``. The real compiler then trips over the leftovers the next time
      it has to build a kernel from scratch (``'ir.value' object has no attribute 'dtype'`` at the
      first ``tl.arange``), which a warm Triton cache hides. (Triton PR #8735 made the grid
      launch clean up; the device-function path still leaks.) So every namespace the interpreter
      touches is snapshotted before the launch and restored after it: attributes it added are
      removed (submodules imported meanwhile stay), attributes it rebound get their original
      objects back.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    spaces = _language_namespaces()
    snapshots = [(ns, dict(vars(ns))) for ns in spaces]
    for mod in spaces[:4]:
        for name, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                setattr(mod, name, InterpretedFunction(val.fn))
    try:
        yield
    finally:
        for ns, before in snapshots:
            now = vars(ns)
            for name in [n for n, v in now.items() if n not in before and not _is_module(v)]:
                delattr(ns, name)
            for name, val in before.items():
                if now.get(name, _ABSENT) is not val:
                    setattr(ns, name, val)


_ABSENT = object()


def _is_module(value) -> bool:
    return isinstance(value, types.ModuleType)


class _InterpretedKernel:
    def __init__(self, fn):
        from triton.runtime.interpreter import InterpretedFunction
        self._k = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self._k[grid]

        def run(*args, **kwargs):
            with _interpreter_sandbox():
                return launch(*args, **kwargs)
        return run


def _kernels(interpret: bool):
    """Wrap the bodies as interpreter functions (CPU) or JIT kernels (GPU), once per mode."""
    if interpret not in _CACHE:
        if interpret:
            wrap = _InterpretedKernel
        else:
            from triton.runtime.jit import JITFunction
            wrap = JITFunction
        _CACHE[interpret] = {k: wrap(f) for k, f in _BODIES.items()}
    return _CACHE[interpret]


def _get(t: torch.Tensor):
    if t.device.type == "cuda":
        return _kernels(False)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _kernels(True)
    raise RuntimeError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 on CPU")


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_f32(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def _zs(zeros, scales):
    return zeros.contiguous(), scales.contiguous()


def _use_reference(x2d) -> bool:
    return x2d.shape[0] == 0 or x2d.dtype not in _TL_DTYPES


def _block_k(gs: int, K: int, cap: int = 64) -> int:
    """K tile: the largest power of two <= cap that divides the group (fast path), else 32."""
    for bk in (cap, 32, 16):
        if bk <= cap and gs % bk == 0:
            return bk
    return 32 if cap >= 32 else 16


# ----------------------------------------------------------------------------------------------
# launchers (same signatures as reference.py)
# ----------------------------------------------------------------------------------------------
def dequantize(packed, scales, zeros, bits, group_size, in_features, dtype=torch.float16,
               rows=None):
    if dtype not in _TL_DTYPES:
        return _ref.dequantize(packed, scales, zeros, bits, group_size, in_features, dtype)
    k = _get(packed)["dequant"]
    N = scales.shape[0]
    gs = _ref.effective_group(group_size, in_features)
    z, s = _zs(zeros, scales)
    out = new_output((N, in_features), dtype, packed.device)
    BN, BK = 32, 64
    grid = (triton.cdiv(N, BN), triton.cdiv(in_features, BK))
    k[grid](packed, z, s, out, N, in_features, gs, packed.stride(0), z.stride(0), s.stride(0),
            out.stride(0), BITS=bits, VPW=values_per_word(bits), BLOCK_N=BN, BLOCK_K=BK)
    return out


def forward(x2d, packed, scales, zeros, bits, group_size, in_features, dequant=None):
    """``x2d @ W^T``: a split-K GEMV for few rows, a fused dequant-GEMM for up to FUSED_MAX_M rows,
    else cuBLAS on a transient weight made by ``dequant`` (same signature as :func:`dequantize`;
    the entry point passes the CUDA extension's when it is built)."""
    if _use_reference(x2d):
        return _ref.forward(x2d, packed, scales, zeros, bits, group_size, in_features)
    x2d = x2d.contiguous()
    M, K = x2d.shape
    N = scales.shape[0]
    gs = _ref.effective_group(group_size, in_features)
    z, s = _zs(zeros, scales)
    ks = _get(x2d)
    vpw = values_per_word(bits)
    if M <= GEMV_MAX_M:
        BN, BK = 64, 32
        n_k_tiles = triton.cdiv(K, BK)
        n_blocks = triton.cdiv(N, BN)
        split = max(1, min(n_k_tiles, 512 // max(1, n_blocks)))
        k_split = triton.cdiv(n_k_tiles, split) * BK
        split = triton.cdiv(K, k_split)
        acc = torch.zeros((M, N), dtype=torch.float32, device=x2d.device)
        m_pad = 1 if M == 1 else (2 if M == 2 else 4)
        ks["gemv"][(n_blocks, split)](
            x2d, packed, z, s, acc, M, N, K, gs, k_split, x2d.stride(0), packed.stride(0),
            z.stride(0), s.stride(0), acc.stride(0), BITS=bits, VPW=vpw, M_PAD=m_pad,
            BLOCK_N=BN, BLOCK_K=BK)
        return acc.to(x2d.dtype)
    if M <= FUSED_MAX_M:
        y = new_output((M, N), x2d.dtype, x2d.device)
        BM = 16 if M <= 16 else (32 if M <= 32 else 64)
        BN = 64
        BK = _block_k(gs, K)
        ks["gemm"][(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            x2d, packed, z, s, y, M, N, K, gs, x2d.stride(0), packed.stride(0), z.stride(0),
            s.stride(0), y.stride(0), BITS=bits, VPW=vpw, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            GROUP_ALIGNED=(gs % BK == 0), PREC=_prec(x2d.dtype), DOT_F32=_dot_f32(x2d))
        return y
    w = (dequant or dequantize)(packed, scales, zeros, bits, group_size, in_features, x2d.dtype)
    return x2d @ w.t()


def grad_input(grad_y2d, packed, scales, zeros, bits, group_size, in_features, x_dtype, dequant=None):
    """``grad_y @ W`` (``dequant`` as in :func:`forward`, for many rows)."""
    if _use_reference(grad_y2d) or x_dtype not in _TL_DTYPES:
        return _ref.grad_input(grad_y2d, packed, scales, zeros, bits, group_size, in_features,
                               x_dtype)
    gy = grad_y2d.to(x_dtype).contiguous()
    M, N = gy.shape
    K = in_features
    if M > FUSED_MAX_M:
        w = (dequant or dequantize)(packed, scales, zeros, bits, group_size, in_features, x_dtype)
        return gy @ w
    gs = _ref.effective_group(group_size, in_features)
    z, s = _zs(zeros, scales)
    gx = new_output((M, K), x_dtype, gy.device)
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN, BK = 64, _block_k(gs, K)
    _get(gy)["gemm_dx"][(triton.cdiv(M, BM), triton.cdiv(K, BK))](
        gy, packed, z, s, gx, M, N, K, gs, gy.stride(0), packed.stride(0), z.stride(0),
        s.stride(0), gx.stride(0), BITS=bits, VPW=values_per_word(bits), BLOCK_M=BM, BLOCK_N=BN,
        BLOCK_K=BK, GROUP_ALIGNED=(gs % BK == 0), PREC=_prec(x_dtype), DOT_F32=_dot_f32(gy))
    return gx


def grad_scales_zeros(x2d, grad_y2d, packed, scales, zeros, bits, group_size, in_features,
                      need_scales=True, need_zeros=False):
    if _use_reference(x2d):
        return _ref.grad_scales_zeros(x2d, grad_y2d, packed, scales, zeros, bits, group_size,
                                      in_features, need_scales, need_zeros)
    x = x2d.contiguous()
    gy = grad_y2d.to(x.dtype).contiguous()
    M, K = x.shape
    N = scales.shape[0]
    gs = _ref.effective_group(group_size, in_features)
    ng = _ref.n_groups(group_size, in_features)
    z, s = _zs(zeros, scales)
    gsc = new_output((N, ng), torch.float32, x.device) if need_scales else None
    gz = new_output((N, ng), torch.float32, x.device) if need_zeros else None
    dummy = gsc if gsc is not None else gz
    BM, BN, BK = 32, 32, _block_k(gs, K, cap=32)
    _get(x)["grad_sz"][(triton.cdiv(N, BN), ng)](
        x, gy, packed, z, s, gsc if gsc is not None else dummy, gz if gz is not None else dummy,
        M, N, K, gs, x.stride(0), gy.stride(0), packed.stride(0), z.stride(0), s.stride(0),
        dummy.stride(0), BITS=bits, VPW=values_per_word(bits), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        NEED_S=bool(need_scales), NEED_Z=bool(need_zeros), PREC=_prec(x.dtype), DOT_F32=_dot_f32(x))
    return gsc, gz
