"""BitBLAS format as GPTQModel 7.7 loads it with ``format="bitblas"`` (``BitblasLinear``).

Per linear (asymmetric, ``zeros_mode="quantized"``: ``W = (q - qz) * s``):
  qweight int8 ``[out, in*b/8]``: QuantCompress (byte j of row n holds ``code[n, j*e + k] << b*k``,
  e = 8/b; the same bytes as GPTQ ``qweight.T``), then for 2/4-bit BitBLAS's fp16 fast-decoding LOP3
  interleave inside each 32-bit word (field o -> bit ``(o%2)*16 + (o//2)*b``; at 2-bit bytes 1 and 2
  are then swapped). 8-bit codes are stored as they are.
  scales fp16 ``[out, n_groups]``; qzeros int8 ``[n_groups, out*b/8]`` compressed along out (no LOP3,
  true zero points); optional bias; **no g_idx**.
Runtime limits (GPTQModel ``BitblasLinear``): bits 2/4/8, group -1/32/64/128, in and out multiples of
16, in a multiple of the group, no act-order. Everything else is refused before anything is written.
Written in plain torch: bitblas itself cannot be imported without a GPU driver.
"""
from __future__ import annotations

import torch

from effqat_plugin.qweight import QuantFormatError

from . import packing
from .checkpoint import DerivedTensor
from .format_base import (ModuleSpec, QuantFormat, WriteContext, check_codes, g_idx_is_default,
                       make_qweight, words_g_idx_is_default)

BITBLAS_BITS = (2, 4, 8)
BITBLAS_GROUPS = (-1, 32, 64, 128)


class BitblasFormat(QuantFormat):
    name = "bitblas"
    description = "BitBLAS (int8 QuantCompress + LOP3 interleave, quantized zeros), GPTQModel format bitblas"
    suffixes = ("qweight", "qzeros", "scales", "bias")
    # GPTQModel 0.9.8-4.x (which made the authors' ``ChenMnZ/*-EfficientQAT-*-BitBLAS`` repos) named
    # the quantized zero points ``<module>.zeros`` (same int8 layout); 7.7 and our writer use qzeros.
    aliases = {"qzeros": ("zeros",)}

    def qweight_dtype(self):
        return "I8"

    def _lop3(self, bits):
        return packing.lop3_positions(bits) if bits in (2, 4) else None

    def module_geometry(self, name, shapes, bits):
        if "scales" not in shapes or len(shapes["scales"]) != 2:
            raise QuantFormatError(f"{name}: scales missing or not 2-D")
        out, g = shapes["scales"]
        if bits is None:
            return 0, int(out), int(g), False
        return int(shapes["qweight"][1]) * 8 // bits, int(out), int(g), True

    def in_candidates(self, bits, shapes):
        n = shapes["qweight"][1] * 8
        return [n // bits] if n % bits == 0 else []

    def shapes_for(self, bits, in_features, out_features, groups):
        return {"qweight": (out_features, in_features * bits // 8),
                "qzeros": (groups, out_features * bits // 8),
                "scales": (out_features, groups)}

    def folder_params(self, qcfg):
        out = super().folder_params(qcfg)
        if (qcfg or {}).get("desc_act"):
            raise QuantFormatError("BitBLAS folders cannot use act-order (desc_act)")
        return out

    def quantize_config(self, ctx, meta):
        # sym stays false: GPTQModel's symmetric BitBLAS layout has no qzeros, ours always stores them
        return self.gptq_family_config(ctx, meta, "bitblas", desc_act=False, sym=False)

    def hf_quantization_config(self, ctx, qcfg):
        return self.gptq_family_hf_config(ctx, qcfg)   # transformers -> BitblasLinear (CUDA only)

    def stored_bits(self, spec: ModuleSpec) -> int:
        if spec.bits not in BITBLAS_BITS:
            raise QuantFormatError(
                f"{spec.name}: BitBLAS cannot hold {spec.bits}-bit weights (supported: 2, 4, 8); "
                "convert 3-bit models to gptq or gptq_v2 instead")
        bad = [f"{d}={v}" for d, v in (("in_features", spec.in_features), ("out_features", spec.out_features))
               if v % 16]
        if bad:
            raise QuantFormatError(
                f"{spec.name}: BitBLAS needs in/out features divisible by 16 ({', '.join(bad)}); "
                "use gptq or gptq_v2 for this model")
        return spec.bits

    def group_compatible(self, spec, group):
        if group not in BITBLAS_GROUPS:
            return False
        if group != -1 and spec.in_features % group:
            return group == spec.in_features and spec.n_groups == 1
        return spec.group_ok(group)

    def check_folder(self, ctx, specs):
        for s in specs:
            g = s.group_size
            if g not in BITBLAS_GROUPS and not (s.n_groups == 1):
                raise QuantFormatError(
                    f"{s.name}: BitBLAS supports group sizes {BITBLAS_GROUPS[1:]} or per-channel, "
                    f"not {g}")
            if g != -1 and s.n_groups > 1 and s.in_features % g:
                raise QuantFormatError(
                    f"{s.name}: BitBLAS needs in_features ({s.in_features}) divisible by the group size ({g})")

    def _fetch(self, get, spec):
        """qweight / qzeros / scales of one module, checked for both read paths (present, shaped as
        bits/group imply, finite scales, int8, dims BitBLAS can hold), else a QuantFormatError."""
        name, bits = spec.name, spec.bits
        if bits not in BITBLAS_BITS:
            raise QuantFormatError(f"{name}: BitBLAS folders hold 2/4/8-bit weights, not {bits}")
        qweight, qzeros, scales = self.fetch_checked(get, spec, "BitBLAS")
        if qweight.dtype != torch.int8 or qzeros.dtype != torch.int8:
            raise QuantFormatError(f"{name}: BitBLAS qweight/qzeros must be int8")
        if spec.in_features % 16 or spec.out_features % 16:
            raise QuantFormatError(f"{name}: BitBLAS dims must be multiples of 16")
        return qweight, qzeros, scales

    def read(self, get, spec, params):
        name, bits = spec.name, spec.bits
        qweight, qzeros, scales = self._fetch(get, spec)
        pw = 32 // bits
        words = qweight.contiguous().view(torch.int32)          # [out, in/pw]
        pos = self._lop3(bits)
        if pos is not None:
            words = packing.permute_fields(words, bits, pos, inverse=True)
        w = packing.unpack_words(words, bits, pw, spec.in_features, dim=1)
        zwords = qzeros.contiguous().view(torch.int32)           # [G, out/pw]
        z = packing.unpack_words(zwords, bits, pw, spec.out_features, dim=1).t()
        return make_qweight(w, z.contiguous(), scales.contiguous(), bits, spec.group_size, None,
                            get("bias"), name)

    # -- packed-word fast path: GPTQ-v2 words <-> BitBLAS bytes without unpacking codes --------
    def read_words(self, get, spec, params):
        bits = spec.bits
        qweight, qzeros, scales = self._fetch(get, spec)
        words = qweight.contiguous().view(torch.int32)
        pos = self._lop3(bits)
        if pos is not None:
            words = packing.permute_fields(words, bits, pos, inverse=True)
        return {"qweight": words.t().contiguous(), "qzeros": qzeros.contiguous().view(torch.int32),
                "scales": scales.t().contiguous(), "g_idx": None, "bias": get("bias")}

    def write_words(self, words, spec, stored_bits, ctx):
        b = spec.bits
        if stored_bits != b or b not in BITBLAS_BITS:
            return None
        if not words_g_idx_is_default(words["g_idx"], spec):
            return None
        q, pos = words["qweight"], self._lop3(b)
        stages = packing.lop3_stages(b) if pos is not None else None
        fn = packing.transpose_swap(stages) if isinstance(q, torch.Tensor) and q.dtype == torch.int32 else None
        if fn is not None:   # transposed and reordered while written ([out, in/pf] words as int8)
            w = DerivedTensor(q, (q.shape[1], q.shape[0] * 4), torch.int8, fn)
        else:
            w = q.t().contiguous()          # [out, in/pf]
            if pos is not None:
                w = packing.permute_fields(w, b, pos)
            w = w.view(torch.int8)
        out = {"qweight": w, "qzeros": words["qzeros"].contiguous().view(torch.int8),
               "scales": words["scales"].t().to(torch.float16).contiguous()}
        if words["bias"] is not None:
            out["bias"] = words["bias"].to(torch.float16).contiguous()
        return out

    def write(self, qw, stored_bits, ctx: WriteContext):
        check_codes(qw, "module")
        b = stored_bits
        if not g_idx_is_default(qw, qw.group_size):
            raise QuantFormatError("BitBLAS has no act-order: g_idx must be i // group_size")
        pw = 32 // b
        words = packing.pack_words(qw.int_weight, b, pw, dim=1)   # [out, in/pw]
        pos = self._lop3(b)
        if pos is not None:
            words = packing.permute_fields(words, b, pos)
        zwords = packing.pack_words(qw.zeros.t(), b, pw, dim=1)   # [G, out/pw]
        out = {
            "qweight": words.contiguous().view(torch.int8),
            "qzeros": zwords.contiguous().view(torch.int8),
            "scales": qw.scales.to(torch.float16).contiguous(),
        }
        if qw.bias is not None:
            out["bias"] = qw.bias.to(torch.float16).contiguous()
        return out


FORMATS = (BitblasFormat(),)
