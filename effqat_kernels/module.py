"""``PackedQuantLinear``: a linear layer whose W_int stays packed in low bits and whose step sizes train.

Memory per layer: packed int32 W_int (``bits`` per weight; 3.2 at 3 bits), uint8 zeros (or fp32 when
they train), fp32 scales, optional frozen bias. No dequantized copy of W is kept between calls, and
the autograd backward recomputes it instead of saving it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dispatch import dequantize, qlinear
from .packing import pack_int_weight, packed_rows, unpack_int_weight
from .reference import n_groups as _n_groups


class PackedQuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, train_zeros: bool = False,
                 scales_dtype: torch.dtype = torch.float32, bias_dtype: torch.dtype = torch.float16,
                 device=None, backend: Optional[str] = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.train_zeros = bool(train_zeros)
        self.backend = backend  # None: follow use_backend()/EFFQAT_KERNEL/auto
        ng = _n_groups(self.group_size, self.in_features)
        self.register_buffer("qweight", torch.zeros(packed_rows(self.in_features, self.bits),
                                                    self.out_features, dtype=torch.int32,
                                                    device=device))
        if self.train_zeros:
            self.zeros = nn.Parameter(torch.zeros(self.out_features, ng, dtype=torch.float32,
                                                  device=device))
        else:
            self.register_buffer("zeros", torch.zeros(self.out_features, ng, dtype=torch.uint8,
                                                      device=device))
        self.scales = nn.Parameter(torch.ones(self.out_features, ng, dtype=scales_dtype,
                                              device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=bias_dtype,
                                                     device=device))
        else:
            self.bias = None

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @classmethod
    def from_quantized_weight(cls, qw, train_zeros: bool = False,
                              scales_dtype: torch.dtype = torch.float32,
                              backend: Optional[str] = None) -> "PackedQuantLinear":
        from effqat_plugin.qweight import default_g_idx
        if not torch.equal(qw.g_idx.to(torch.int64).cpu(),
                           default_g_idx(qw.in_features, qw.group_size).to(torch.int64)):
            raise NotImplementedError(
                "PackedQuantLinear needs contiguous groups (g_idx == i // group_size); "
                "act-order g_idx is not supported by the effqat kernels")
        dev = qw.int_weight.device
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, bias=qw.bias is not None,
                train_zeros=train_zeros, scales_dtype=scales_dtype,
                bias_dtype=qw.bias.dtype if qw.bias is not None else torch.float16,
                device=dev, backend=backend)
        with torch.no_grad():
            m.qweight.copy_(pack_int_weight(qw.int_weight, qw.bits))
            if train_zeros:
                m.zeros.copy_(qw.zeros.to(torch.float32))
            else:
                m.zeros.copy_(qw.zeros.to(torch.uint8))
            m.scales.copy_(qw.scales.to(scales_dtype))
            if qw.bias is not None:
                m.bias.copy_(qw.bias)
        return m

    def to_quantized_weight(self):
        from effqat_plugin.qweight import QuantizedWeight
        maxq = (1 << self.bits) - 1
        with torch.no_grad():
            if self.zeros.is_floating_point():
                z = self.zeros.detach().round().clamp(0, maxq).to(torch.uint8)
            else:
                z = self.zeros.detach().clone().to(torch.uint8)
            return QuantizedWeight(
                int_weight=unpack_int_weight(self.qweight, self.bits, self.in_features),
                zeros=z,
                scales=self.scales.detach().clone(),
                bits=self.bits,
                group_size=self.group_size,
                bias=None if self.bias is None else self.bias.detach().clone(),
            )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                          self.in_features, dtype, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                       self.in_features, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"train_zeros={self.train_zeros}")
