"""The kernels' one entry point: which backend runs (``reference`` / ``triton`` / ``cuda``, chosen by
``EFFQAT_KERNEL`` or :func:`use_backend`), and the autograd-aware :func:`qlinear` and :func:`dequantize`
that dispatch to it. A module of its own so that :mod:`.module` (``PackedQuantLinear``) imports it
without importing the package that re-exports both.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, NamedTuple, Optional

import torch

from . import reference as _reference
from .packing import SUPPORTED_BITS, packed_rows

log = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "EFFQAT_KERNEL"

_local = threading.local()
_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _requested() -> str:
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    req = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if req not in BACKENDS + ("auto",):
        raise ValueError(f"{ENV_VAR}={req!r}; expected one of reference, triton, cuda, auto")
    return req


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force a backend (``reference|triton|cuda|auto``) inside a ``with`` block (config switch);
    takes precedence over the environment variable. ``None`` leaves the current choice."""
    if name is not None and name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown kernel backend {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name if name is not None else prev
    try:
        yield
    finally:
        _local.forced = prev


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ok() -> bool:
    try:
        from . import triton_kernels  # noqa: F401
        return triton_kernels.AVAILABLE
    except Exception:  # pragma: no cover - triton missing / broken
        return False


def _cuda_ok() -> bool:
    try:
        from . import cuda_ext
        return cuda_ext.available()
    except Exception:  # pragma: no cover
        return False


def active_backend(device=None, requested: Optional[str] = None) -> str:
    """Which implementation runs for tensors on ``device``: ``reference``, ``triton`` or ``cuda``.

    ``requested`` (or :func:`use_backend`, or env ``EFFQAT_KERNEL``) forces one; a forced backend
    that cannot run on the device falls back to ``reference`` with a warning (Triton on CPU runs only
    under ``TRITON_INTERPRET=1``; the CUDA extension never runs on CPU)."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    req = requested or _requested()
    if req == "reference":
        return "reference"
    if dev.type != "cuda":
        if req == "triton" and triton_interpreting() and _triton_ok():
            return "triton"
        if req in ("triton", "cuda"):
            _warn_once(f"effqat kernels: backend {req!r} cannot run on {dev.type}; using reference")
        return "reference"
    if req == "triton":
        if _triton_ok():
            return "triton"
        _warn_once("effqat kernels: triton unavailable; using reference")
        return "reference"
    if req == "cuda":
        if _cuda_ok():
            return "cuda"
        _warn_once("effqat kernels: CUDA extension unavailable; using reference")
        return "reference"
    # auto
    if _triton_ok():
        return "triton"
    if _cuda_ok():
        return "cuda"
    return "reference"


class _Ops(NamedTuple):
    """One backend's operations as the entry point runs them."""

    forward: Callable
    grad_input: Callable
    grad_scales_zeros: Callable
    dequantize: Callable


def _transient_dequant(packed, scales, zeros, bits, group_size, in_features, dtype):
    """The dequantized weight Triton's cuBLAS paths (many rows) multiply with: the CUDA
    extension's when it is built, else Triton's own."""
    if packed.device.type == "cuda" and _cuda_ok():
        from . import cuda_ext
        return cuda_ext.dequantize(packed, scales, zeros, bits, group_size, in_features, dtype)
    from . import triton_kernels
    return triton_kernels.dequantize(packed, scales, zeros, bits, group_size, in_features, dtype)


_OPS: dict = {}


def _impl(name: str) -> _Ops:
    """The operations of backend ``name``. Backends never call each other: where one borrows from
    another (Triton's big GEMMs use the CUDA extension's dequant; the CUDA backend's grad_s is
    Triton's reduction when Triton runs), the borrowing is composed here."""
    if name not in _OPS:
        if name == "triton":
            from . import triton_kernels as tk
            _OPS[name] = _Ops(functools.partial(tk.forward, dequant=_transient_dequant),
                              functools.partial(tk.grad_input, dequant=_transient_dequant),
                              tk.grad_scales_zeros, tk.dequantize)
        elif name == "cuda":
            from . import cuda_ext as ce
            grad_sz = ce.grad_scales_zeros
            if _triton_ok():
                from . import triton_kernels
                grad_sz = triton_kernels.grad_scales_zeros
            _OPS[name] = _Ops(ce.forward, ce.grad_input, grad_sz, ce.dequantize)
        else:
            r = _reference
            _OPS[name] = _Ops(r.forward, r.grad_input, r.grad_scales_zeros, r.dequantize)
    return _OPS[name]


def _check(packed, scales, zeros, bits, group_size, in_features):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; use one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size} must be positive or -1")
    ng = _reference.n_groups(group_size, in_features)
    n_out = scales.shape[0]
    if packed.dtype != torch.int32 or tuple(packed.shape) != (packed_rows(in_features, bits), n_out):
        raise ValueError(
            f"packed weight must be int32 [{packed_rows(in_features, bits)}, {n_out}] for "
            f"in_features={in_features}, bits={bits}; got {packed.dtype} {tuple(packed.shape)}")
    if tuple(scales.shape) != (n_out, ng) or tuple(zeros.shape) != (n_out, ng):
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} must be "
                         f"[out={n_out}, n_groups={ng}]")


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, zeros, bias, bits, group_size, in_features, backend):
        impl = _impl(backend)
        n_out = scales.shape[0]
        lead = x.shape[:-1]
        x2d = x.reshape(-1, in_features)
        y = impl.forward(x2d, packed, scales, zeros, bits, group_size, in_features)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x, packed, scales, zeros)  # never a dequantized weight
        ctx.meta = (bits, group_size, in_features, backend, bias is not None)
        return y.reshape(*lead, n_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, packed, scales, zeros = ctx.saved_tensors
        bits, group_size, in_features, backend, has_bias = ctx.meta
        impl = _impl(backend)
        n_out = scales.shape[0]
        gy = grad_y.reshape(-1, n_out)
        x2d = x.reshape(-1, in_features)
        need_x, _, need_s, need_z, need_b = ctx.needs_input_grad[:5]
        gx = gs = gz = gb = None
        if need_x:
            gx = impl.grad_input(gy, packed, scales, zeros, bits, group_size, in_features,
                                 x.dtype).reshape(x.shape)
        if need_s or need_z:
            gs, gz = impl.grad_scales_zeros(x2d, gy, packed, scales, zeros, bits, group_size,
                                            in_features, need_scales=need_s, need_zeros=need_z)
            gs = gs.to(scales.dtype) if gs is not None else None
            gz = gz.to(zeros.dtype) if gz is not None else None
        if need_b and has_bias:
            gb = gy.to(torch.float32).sum(0)
        return gx, None, gs, gz, gb, None, None, None, None


def qlinear(x: torch.Tensor, packed_weight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor, bits: int, group_size: int, in_features: int,
            bias: Optional[torch.Tensor] = None, *, train_zeros: bool = False,
            backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ ((W_int - z) * s)^T + bias`` in ``x.dtype``; ``x`` is ``[..., in_features]``.

    ``packed_weight``: int32 from :func:`~effqat_kernels.packing.pack_int_weight`; ``scales`` float ``[out, n_groups]``;
    ``zeros`` uint8 ``[out, n_groups]`` or a float tensor (used as is, no rounding) when the zero
    points train. Gradients flow to ``x``, ``scales`` and, when ``zeros`` is a float tensor that
    requires grad (``train_zeros=True`` asserts that), to ``zeros``; ``bias`` gets one if it requires
    grad. ``backend`` forces an implementation for this call.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, expected {in_features}")
    _check(packed_weight, scales, zeros, bits, group_size, in_features)
    if train_zeros and not (zeros.is_floating_point() and zeros.requires_grad):
        raise ValueError("train_zeros=True needs zeros as a float tensor with requires_grad=True")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    name = active_backend(x.device, backend)
    return _QLinearFn.apply(x, packed_weight, scales, zeros, bias, bits, group_size, in_features,
                            name)


def dequantize(packed_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, in_features: int, dtype: torch.dtype = torch.float16,
               *, backend: Optional[str] = None) -> torch.Tensor:
    """``(W_int - z) * s`` as ``dtype`` ``[out, in_features]`` (no autograd)."""
    _check(packed_weight, scales, zeros, bits, group_size, in_features)
    name = active_backend(packed_weight.device, backend)
    with torch.no_grad():
        return _impl(name).dequantize(packed_weight, scales.detach(), zeros.detach(), bits,
                                      group_size, in_features, dtype)
