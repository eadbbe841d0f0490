"""AWQ "gemm" format (AutoAWQ / llm-awq layout), 4-bit, asymmetric with integer zero points.

Why: AWQ's asymmetric 4-bit form stores exactly what EQAT learns (integer codes, integer zero points,
fp16 step sizes), and it is what vLLM / SGLang serve fast (``awq_marlin``), while vLLM refuses
asymmetric GPTQ. Per linear (``W = (q - z) * s``):
  qweight int32 ``[in, out/8]`` packed along **out**, 8 codes per word, field ``j`` of word ``c``
          holding column ``8c + AWQ_ORDER[j]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
  qzeros  int32 ``[n_groups, out/8]`` packed the same way, true zero points (no minus one);
  scales  fp16 ``[n_groups, out]``; optional bias; **no g_idx** (no act-order).
Limits (kept to what GPTQModel's AWQ kernels and the serving runtimes load): 4 bits, out_features a
multiple of 8, group size 32/64/128 dividing in_features. Everything else is refused before anything
is written. AWQ packs along ``out`` where every other format packs along ``in``, so its words are
not GPTQ's; the packed-word fast path moves them with a 4-bit nibble transpose
(``packing.nibble_transpose``, computed while written) instead of unpacking every code.
"""
from __future__ import annotations

import torch

from effqat_plugin.qweight import QuantFormatError

from . import packing
from .checkpoint import DerivedTensor
from .format_base import (ModuleSpec, QuantFormat, WriteContext, check_codes,
                       g_idx_is_default, make_qweight, words_g_idx_is_default)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_BITS = (4,)
AWQ_GROUPS = (32, 64, 128)
# where field o of a GPTQ-layout zero-point word (column 8k + o) sits in AWQ's word
_ZERO_POSITIONS = [4 * int(j) for j in torch.argsort(torch.tensor(AWQ_ORDER))]


def _interleave(codes_io: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Permute columns inside each block of 8: stored field j <- column AWQ_ORDER[j] (or back)."""
    n, m = codes_io.shape
    blocks = codes_io.reshape(n, m // 8, 8)
    order = torch.tensor(AWQ_ORDER)
    if inverse:
        out = torch.empty_like(blocks)
        out[:, :, order] = blocks
    else:
        out = blocks[:, :, order]
    return out.reshape(n, m).contiguous()


class AwqFormat(QuantFormat):
    name = "awq"
    description = "AWQ gemm (4-bit, packed along out with the AWQ interleave, integer zero points)"
    suffixes = ("qweight", "qzeros", "scales", "bias")

    # metadata
    def module_geometry(self, name, shapes, bits):
        if "scales" not in shapes or len(shapes["scales"]) != 2:
            raise QuantFormatError(f"{name}: scales missing or not 2-D")
        g, out = shapes["scales"]
        return int(shapes["qweight"][0]), int(out), int(g), True

    def in_candidates(self, bits, shapes):
        return [int(shapes["qweight"][0])]

    def shapes_for(self, bits, in_features, out_features, groups):
        pf = 32 // bits
        return {"qweight": (in_features, -(-out_features // pf)),
                "qzeros": (groups, -(-out_features // pf)),
                "scales": (groups, out_features)}

    def folder_params(self, qcfg):
        out = super().folder_params(qcfg)
        fmt = str((qcfg or {}).get("version") or (qcfg or {}).get("format") or "gemm").lower()
        if fmt != "gemm":
            raise QuantFormatError(f"AWQ format {fmt!r} is not supported (only gemm)")
        if (qcfg or {}).get("zero_point") is False or (qcfg or {}).get("sym") is True:
            raise QuantFormatError("symmetric AWQ (zero_point=false) is not supported")
        return out

    def quantize_config(self, ctx, meta):
        return {"quant_method": "awq", "format": "gemm", "checkpoint_format": "gemm", "bits": ctx.bits,
                "group_size": ctx.group_size, "sym": False, "desc_act": False, "pack_dtype": "int32",
                "meta": meta}

    def hf_quantization_config(self, ctx, qcfg):
        # transformers' AwqConfig names the layout 'version' and asymmetry 'zero_point'
        return {"quant_method": "awq", "bits": ctx.bits, "group_size": ctx.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}

    # capabilities
    def stored_bits(self, spec: ModuleSpec) -> int:
        if spec.bits not in AWQ_BITS:
            raise QuantFormatError(
                f"{spec.name}: AWQ export is 4-bit only (the width AWQ runtimes serve); this module is "
                f"{spec.bits}-bit: use gptq_v2")
        if spec.out_features % 8:
            raise QuantFormatError(
                f"{spec.name}: AWQ needs out_features divisible by 8 (out_features={spec.out_features}); "
                "use gptq_v2 for this model")
        return spec.bits

    def group_compatible(self, spec, group):
        return group in AWQ_GROUPS and spec.in_features % group == 0 and spec.group_ok(group)

    def check_folder(self, ctx, specs):
        for s in specs:
            if s.group_size not in AWQ_GROUPS or s.in_features % s.group_size:
                raise QuantFormatError(
                    f"{s.name}: AWQ needs a group size in {AWQ_GROUPS} dividing in_features "
                    f"(group_size={s.group_size}, in_features={s.in_features}); use gptq_v2")

    # data
    def _fetch(self, get, spec):
        """qweight / qzeros / scales of one module, checked for both read paths (present, shaped as
        bits/group imply, finite scales, int32, 8 | out_features), else a QuantFormatError."""
        name, bits = spec.name, spec.bits
        if bits not in AWQ_BITS:
            raise QuantFormatError(f"{name}: AWQ folders hold 4-bit weights here, not {bits}")
        qweight, qzeros, scales = self.fetch_checked(get, spec, "AWQ")
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise QuantFormatError(f"{name}: AWQ qweight/qzeros must be int32")
        if spec.out_features % 8:
            raise QuantFormatError(f"{name}: AWQ out_features must be a multiple of 8")
        return qweight, qzeros, scales

    def read(self, get, spec, params):
        bits = spec.bits
        qweight, qzeros, scales = self._fetch(get, spec)
        w = _interleave(packing.unpack_words(qweight, bits, 8, spec.out_features, dim=1), inverse=True)
        z = _interleave(packing.unpack_words(qzeros, bits, 8, spec.out_features, dim=1), inverse=True)
        return make_qweight(w.t().contiguous(), z.t().contiguous(), scales.t().contiguous(), bits,
                            spec.group_size, None, get("bias"), spec.name)

    # -- packed-word fast path (4-bit words <-> GPTQ-v2 words, see format_base.QuantFormat) ----------
    def _words_ok(self, spec: ModuleSpec) -> bool:
        return (spec.bits in AWQ_BITS and not spec.logical_bits and spec.in_features % 8 == 0
                and spec.out_features % 8 == 0 and packing.nibble_transpose(AWQ_ORDER) is not None)

    def read_words(self, get, spec, params):
        if not self._words_ok(spec):
            return None
        qweight, qzeros, scales = self._fetch(get, spec)
        words = torch.empty(spec.in_features // 8, spec.out_features, dtype=torch.int32)
        packing.nibble_transpose(AWQ_ORDER, inverse=True)(qweight.contiguous().numpy(), words.numpy())
        return {"qweight": words, "qzeros": packing.permute_fields(qzeros, 4, _ZERO_POSITIONS, inverse=True),
                "scales": scales, "g_idx": None, "bias": get("bias")}

    def write_words(self, words, spec, stored_bits, ctx):
        if stored_bits != spec.bits or not self._words_ok(spec):
            return None
        if not words_g_idx_is_default(words["g_idx"], spec):
            return None  # act-order: the general path refuses it with its message
        q = words["qweight"]
        q = q if isinstance(q, torch.Tensor) else q.materialize()
        out = {"qweight": DerivedTensor(q, (spec.in_features, spec.out_features // 8), torch.int32,
                                        packing.nibble_transpose(AWQ_ORDER)),
               "qzeros": packing.permute_fields(words["qzeros"], 4, _ZERO_POSITIONS),
               "scales": words["scales"].to(torch.float16).contiguous()}
        if words["bias"] is not None:
            out["bias"] = words["bias"].to(torch.float16).contiguous()
        return out

    def write(self, qw, stored_bits, ctx: WriteContext):
        check_codes(qw, "module")
        if not g_idx_is_default(qw, qw.group_size):
            raise QuantFormatError("AWQ has no act-order: g_idx must be i // group_size")
        b = stored_bits
        out = {
            "qweight": packing.pack_words(_interleave(qw.int_weight.t().contiguous()), b, 8, dim=1),
            "qzeros": packing.pack_words(_interleave(qw.zeros.t().contiguous()), b, 8, dim=1),
            "scales": qw.scales.t().to(torch.float16).contiguous(),
        }
        if qw.bias is not None:
            out["bias"] = qw.bias.to(torch.float16).contiguous()
        return out


FORMATS = (AwqFormat(),)
