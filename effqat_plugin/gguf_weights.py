"""One linear's weight on a llama.cpp block type, in the three forms a GGUF run needs.

* **Block-AP** (:func:`trainable`): on a K type (Q2_K..Q6_K) every field trains
  (``quantizer.KGridFakeQuantLinear``: W, d, dmin, sc, m), starting from llama.cpp's own fit of the
  weight (``llama_cpp_quants.llama_cpp_fit``, with the layer's importance matrix when there is one),
  so an untrained run *is* ``llama-quantize`` and training starts from the peer's answer. On the
  32-wide types llama.cpp's presets fall back to for rows that are not a multiple of 256 (IQ4_NL,
  Q5_0, Q5_1, Q8_0) or choose for some tensors, the weight is llama.cpp's own quantization of it, and
  Block-AP trains the weights *through* that quantizer (``quantizer.roundtrip_ste``): the forward pass
  sees exactly the stored grid, the grid's scales are llama.cpp's fit of the current weights.
* **E2E-QP** (:func:`e2e_module`): a K-type weight keeps q, sc and m frozen and trains only the fp16
  super-block scales d (and dmin) (:class:`KGridLinear`), EfficientQAT's "train only the step sizes"
  on llama.cpp's grid. So does a weight on a uniform 32-wide type (Q4_0, Q5_0, Q8_0, and Q4_1 / Q5_1
  with their fp16 block min: its Block-AP rows decoded into the same fields,
  ``quantizer.UNIFORM32_GRIDS``), with its one fp16 d (and min) per block of 32 trainable. Only
  IQ4_NL (a non-uniform grid) stays frozen (:class:`BlockRowsLinear`).
* **Stored** (:func:`encoded_rows`): the uint8 rows GGUF holds, ``[out, in / block * block bytes]``.

Learning rates of the K fields: the run's step-size rate ``quant_lr`` is an absolute rate for a
uniform grid's step s. A K grid's step is d * sc, with d about 1/sc of it and sc, m small integers,
so each field gets the same *relative* rate instead: ``quant_lr * mean|field| / mean|d * sc|``
(:func:`relative_lr_multipliers`); Block-AP and E2E-QP both use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lr_rules import grid_rate_factor
from .quantizer import (KGRIDS, UNIFORM32_GRIDS, KGridFakeQuantLinear, KGridFrozenWeight, KGridParams, kgrid,
                        roundtrip_ste)


def is_k_type(qtype: str) -> bool:
    return qtype in KGRIDS


def _gguf_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype)


@dataclass
class BlockRows:
    """A weight stored as llama.cpp quantized it: uint8 ``[out, row bytes]`` of block type ``qtype``."""
    qtype: str
    data: torch.Tensor
    in_features: int
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weights ``[out, in]`` as gguf's reference dequantizer decodes the rows."""
        import gguf

        w = gguf.quants.dequantize(self.data.numpy(), _gguf_type(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(dtype)


def encoded_rows(frozen) -> np.ndarray:
    """The GGUF bytes of a frozen weight (:class:`BlockRows` or ``KGridParams``), ``[out, row bytes]``."""
    if isinstance(frozen, BlockRows):
        return frozen.data.numpy()
    from .converters import gguf_kblocks

    return gguf_kblocks.encode(frozen)


def _typical(t: torch.Tensor) -> float:
    t = t.detach().float().abs()
    return float(t.mean()) if t.numel() else 0.0


def relative_lr_multipliers(d, sc, dmin=None, m=None) -> Dict[int, float]:
    """``id(param) -> multiplier`` of the run's step-size rate for each K field (module docstring)."""
    step = _typical(d.detach().float()[..., None] * sc.detach().float().round())
    if step <= 0:
        return {}
    return {id(p): _typical(p) / step for p in (d, sc, dmin, m) if p is not None}


class RoundTripLinear(nn.Module):
    """Block-AP's unit on a 32-wide llama.cpp type: the weight trains through llama.cpp's quantizer."""

    def __init__(self, linear: nn.Linear, qtype: str, imatrix: Optional[torch.Tensor] = None):
        super().__init__()
        self.qtype, self.imatrix = qtype, imatrix
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().clone())

    def _rows(self, w: torch.Tensor) -> np.ndarray:
        from . import llama_cpp_quants

        return llama_cpp_quants.quantize_chunk(w, self.qtype, self.imatrix)

    def _roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        import gguf

        back = gguf.quants.dequantize(self._rows(w), _gguf_type(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).to(w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = roundtrip_ste(self.weight, self._roundtrip)
        return F.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def quant_parameters(self) -> List[nn.Parameter]:
        return []

    def lr_multipliers(self) -> Dict[int, float]:
        return {}

    @torch.no_grad()
    def freeze(self, scales_dtype=None) -> BlockRows:
        bias = None if self.bias is None else self.bias.detach().cpu().clone()
        return BlockRows(self.qtype, torch.from_numpy(self._rows(self.weight)), self.in_features, bias)


class _KGridTrainable(KGridFakeQuantLinear):
    """``KGridFakeQuantLinear`` with the relative learning rates of its fields."""

    def lr_multipliers(self) -> Dict[int, float]:
        return relative_lr_multipliers(self.d, self.sc, self.dmin, self.m)


def trainable(linear: nn.Linear, qtype: str, imatrix: Optional[torch.Tensor] = None) -> nn.Module:
    """Block-AP's module for ``linear`` stored as ``qtype`` (module docstring)."""
    if is_k_type(qtype):
        from .llama_cpp_quants import llama_cpp_fit

        return _KGridTrainable(linear, llama_cpp_fit(linear.weight.detach().float(), qtype, imatrix))
    return RoundTripLinear(linear, qtype, imatrix)


class KGridLinear(nn.Module):
    """E2E-QP's form of a K-type linear: frozen q / sc / m, trainable d / dmin (``KGridFrozenWeight``)."""

    def __init__(self, params: KGridParams):
        super().__init__()
        self.grid = KGridFrozenWeight(params)
        self.qtype = params.qtype
        self.out_features, self.in_features = params.shape
        self.register_buffer("bias", None if params.bias is None else params.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.grid().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def step_parameters(self) -> List[nn.Parameter]:
        return self.grid.step_parameters()

    def lr_multipliers(self, run_bits: int) -> Dict[int, float]:
        """d / dmin relative to the step d * sc (as in Block-AP), times the grid's resolution
        against the run's bit width (``lr_rules.grid_rate_factor``)."""
        g, grid = self.grid, kgrid(self.qtype)
        factor = grid_rate_factor(run_bits, grid.q_hi - grid.q_lo)
        return {k: v * factor for k, v in relative_lr_multipliers(g.d, g.sc, g.dmin, g.m).items()
                if k in (id(g.d), id(g.dmin))}

    @torch.no_grad()
    def to_frozen(self) -> KGridParams:
        p = self.grid.to_params()
        p.bias = None if self.bias is None else self.bias.detach().cpu().clone()
        return p


class BlockRowsLinear(nn.Module):
    """A frozen 32-wide-type linear (E2E-QP trains nothing in it): decoded weight as a buffer."""

    def __init__(self, rows: BlockRows):
        super().__init__()
        self.rows = rows
        self.out_features, self.in_features = rows.out_features, rows.in_features
        self.register_buffer("weight", rows.dequantize(torch.float32))
        self.register_buffer("bias", None if rows.bias is None else rows.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_frozen(self) -> BlockRows:
        return self.rows


def e2e_module(frozen) -> nn.Module:
    """The E2E-QP module of a frozen GGUF weight: trainable steps on every uniform grid."""
    if isinstance(frozen, BlockRows) and frozen.qtype in UNIFORM32_GRIDS:
        from .converters import gguf_kblocks

        params = gguf_kblocks.decode(frozen.data.numpy(), frozen.qtype)
        params.bias = frozen.bias
        return KGridLinear(params)
    return KGridLinear(frozen) if isinstance(frozen, KGridParams) else BlockRowsLinear(frozen)


def is_gguf_weight(frozen) -> bool:
    return isinstance(frozen, (KGridParams, BlockRows))
