"""The one in-memory form of a quantized linear weight that every part of effqat speaks.

Block-AP produces it, E2E-QP trains its scales, and every on-disk format (EQAT, GPTQ v1/v2,
BitBLAS) is a reader/writer pair to and from it. Keeping a single unpacked, layout-free form means a
new format is one module and conversions A->B never go through format-specific shortcuts.

Orientation follows ``nn.Linear.weight``: rows are output features, columns input features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


class QuantFormatError(ValueError):
    """Raised when tensors and declared bits / group size do not fit together."""


def n_groups_for(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension; the last group may be partial (ragged dims)."""
    if group_size == -1:
        return 1
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of every input channel when there is no act-order permutation."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)


@dataclass
class QuantizedWeight:
    """Integers, zero points and step sizes of one linear layer.

    int_weight: uint8 ``[out, in]`` codes in ``[0, 2**bits - 1]``.
    zeros:      uint8 ``[out, n_groups]`` true zero points (never the v1 "minus one" form).
    scales:     float ``[out, n_groups]`` step sizes (fp16 on disk, fp32 while training).
    g_idx:      int32 ``[in]`` group of each input channel (``i // group_size`` unless act-order).
    bias:       optional float ``[out]``.
    The dequantized weight is ``(int_weight - zeros[:, g_idx]) * scales[:, g_idx]``.
    """

    int_weight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    g_idx: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.g_idx is None:
            self.g_idx = default_g_idx(self.in_features, self.group_size)
        self.validate()

    @property
    def out_features(self) -> int:
        return int(self.int_weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.int_weight.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.zeros.shape[1])

    def validate(self) -> None:
        """Check every invariant readers and writers rely on; fail loudly rather than pack garbage."""
        b = self.bits
        if b not in SUPPORTED_BITS:
            raise QuantFormatError(f"bits={b} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantFormatError(f"group_size={self.group_size} must be positive or -1")
        if self.int_weight.dim() != 2:
            raise QuantFormatError(f"int_weight must be 2-D [out, in], got {tuple(self.int_weight.shape)}")
        out, inf = self.int_weight.shape
        if self.group_size != -1 and self.group_size > inf:
            raise QuantFormatError(
                f"group_size={self.group_size} is larger than in_features={inf}")
        if self.zeros.shape != self.scales.shape or self.zeros.dim() != 2 or self.zeros.shape[0] != out:
            raise QuantFormatError(
                f"zeros {tuple(self.zeros.shape)} and scales {tuple(self.scales.shape)} must both be "
                f"[out={out}, n_groups]")
        if self.g_idx.shape != (inf,):
            raise QuantFormatError(f"g_idx must be [in={inf}], got {tuple(self.g_idx.shape)}")
        if len(self.g_idx) and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.zeros.shape[1]):
            raise QuantFormatError("g_idx points outside the zero/scale groups")
        maxq = (1 << b) - 1
        for name in ("int_weight", "zeros"):
            t = getattr(self, name)
            if t.is_floating_point():
                raise QuantFormatError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) > maxq):
                raise QuantFormatError(
                    f"{name} has values outside [0, {maxq}] for bits={b} "
                    f"(min {int(t.min())}, max {int(t.max())}): wrong --bits, or corrupt tensors")
        if not self.scales.is_floating_point():
            raise QuantFormatError(f"scales must be floating point, got {self.scales.dtype}")
        if self.bias is not None and self.bias.shape != (out,):
            raise QuantFormatError(f"bias must be [out={out}], got {tuple(self.bias.shape)}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(W_int - z) * s`` in ``dtype``; the ground truth every reader and kernel is tested against."""
        g = self.g_idx.long()
        z = self.zeros.to(torch.float32)[:, g]
        s = self.scales.to(torch.float32)[:, g]
        return ((self.int_weight.to(torch.float32) - z) * s).to(dtype)

    def equal(self, other: "QuantizedWeight", check_scales_dtype: bool = False) -> bool:
        """Bit-for-bit equality of integers, zeros, scales (after fp16 cast) and group map."""
        same = (
            self.bits == other.bits
            and self.int_weight.shape == other.int_weight.shape
            and torch.equal(self.int_weight.to(torch.uint8), other.int_weight.to(torch.uint8))
            and torch.equal(self.zeros.to(torch.uint8), other.zeros.to(torch.uint8))
            and torch.equal(self.g_idx.to(torch.int32), other.g_idx.to(torch.int32))
        )
        if not same:
            return False
        if check_scales_dtype and self.scales.dtype != other.scales.dtype:
            return False
        return torch.equal(self.scales.to(torch.float16), other.scales.to(torch.float16))
