"""effqat's own low-bit kernels: packed W_int (2/3/4/8 bits) -> fused dequant-matmul with a backward
that gives grad_x and grad_s (and optionally grad_z) without ever storing a dequantized weight.

Entry points
------------
* :func:`qlinear` - autograd-aware ``y = x @ ((W_int - z) * s)^T + b`` from the packed layout.
* :class:`PackedQuantLinear` - ``nn.Module`` holding packed W_int, trainable fp32 scales.
* :func:`dequantize`, :func:`pack_int_weight`, :func:`unpack_int_weight`.
* :func:`active_backend` / :func:`use_backend` / env ``EFFQAT_KERNEL=reference|triton|cuda|auto``.

Backends
--------
``reference`` (pure torch; the oracle; used on CPU), ``triton`` (unpack+dequant kernel, fused
dequant-GEMM forward / input-grad, fused grad_s/grad_z reduction; runs on CPU only under
``TRITON_INTERPRET=1``), ``cuda`` (JIT-built CUDA C++ dequant extension + cuBLAS GEMM; grad_s via
Triton when available, else torch). ``auto``: CPU -> reference; CUDA -> triton if importable, else
cuda if the extension builds, else reference.

The packed layout is documented in :mod:`effqat_plugin.kernels.packing`.
"""
from __future__ import annotations

from .dispatch import (BACKENDS, ENV_VAR, active_backend, dequantize, qlinear, triton_interpreting,
                       use_backend)
from .dispatch import _triton_ok  # noqa: F401 - the tests ask which backend auto picks
from .module import PackedQuantLinear
from .packing import SUPPORTED_BITS, pack_int_weight, packed_rows, unpack_int_weight, values_per_word

__all__ = [
    "qlinear", "dequantize", "pack_int_weight", "unpack_int_weight", "active_backend",
    "use_backend", "PackedQuantLinear", "values_per_word", "packed_rows", "BACKENDS", "ENV_VAR",
    "SUPPORTED_BITS", "triton_interpreting",
]
