"""The original EfficientQAT format (the ``ChenMnZ/*-EfficientQAT-wXgY`` model zoo).

Per quantized linear ``<name>``:
  qweight int32 ``[ceil(in / pw), out]`` packed along in, ``pw = 32 // bits`` values per word
          (3-bit: 10 per word, top 2 bits unused), LSB first;
  qzeros  int32 ``[n_groups, ceil(out / pw)]`` packed along out the same way, true zero points;
  scales  fp16 ``[n_groups, out]``; g_idx int32 ``[in]``; optional bias ``[out]``.
The original folders record neither bits nor group size. We write a ``quantize_config.json`` with
``quant_method: "eqat"`` so our own reader finds them, but the reader never needs it.
"""
from __future__ import annotations

import torch

from effqat_plugin.qweight import QuantFormatError

from . import packing
from effqat_plugin.qweight import default_g_idx

from .format_base import (ModuleSpec, QuantFormat, WriteContext, check_codes, g_idx_is_default,
                       make_qweight, qw_group, words_g_idx_is_default)


class InPackedFormat(QuantFormat):
    """Shared reader/writer for layouts that pack codes along ``in`` into ``[words, out]`` int32."""

    def per_word(self, bits: int) -> int | None:
        """Values per word, or None for a continuous stream."""
        raise NotImplementedError

    def _words(self, n: int, bits: int) -> int:
        return packing.words_for(n, bits, self.per_word(bits))

    def _pack(self, codes, bits, dim):
        pw = self.per_word(bits)
        return packing.pack_stream(codes, bits, dim) if pw is None else packing.pack_words(codes, bits, pw, dim)

    def _unpack(self, words, bits, n, dim):
        pw = self.per_word(bits)
        return (packing.unpack_stream(words, bits, n, dim) if pw is None
                else packing.unpack_words(words, bits, pw, n, dim))

    # metadata
    def module_geometry(self, name, shapes, bits):
        if "scales" not in shapes or len(shapes["scales"]) != 2:
            raise QuantFormatError(f"{name}: scales missing or not 2-D")
        g, out = shapes["scales"]
        if "g_idx" in shapes:
            return int(shapes["g_idx"][0]), int(out), int(g), True
        return 0, int(out), int(g), False

    def in_candidates(self, bits, shapes):
        rows = shapes["qweight"][0]
        pw = self.per_word(bits)
        if pw is None:
            hi, lo = rows * 32 // bits, (rows - 1) * 32 // bits + 1
        else:
            hi, lo = rows * pw, (rows - 1) * pw + 1
        return [n for n in range(hi, lo - 1, -1) if self._words(n, bits) == rows]

    def shapes_for(self, bits, in_features, out_features, groups):
        return {"qweight": (self._words(in_features, bits), out_features),
                "qzeros": (groups, self._words(out_features, bits)),
                "scales": (groups, out_features)}

    # data
    def decode_zeros(self, qzeros, bits, out, params, ctx_name):
        return self._unpack(qzeros, bits, out, dim=1)

    def encode_zeros(self, zeros_go, bits, ctx: WriteContext):
        return self._pack(zeros_go, bits, dim=1)

    def _load_checked(self, get, spec: ModuleSpec):
        name, bits = spec.name, spec.bits
        qweight, qzeros, scales = self.fetch_checked(get, spec, self.name)
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise QuantFormatError(f"{name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
        if not scales.is_floating_point():
            raise QuantFormatError(f"{name}.scales must be floating point, got {scales.dtype}")
        pw = self.per_word(bits)
        if pw is not None and (pw * bits < 32 or spec.in_features % pw or spec.out_features % pw):
            bad = packing.unused_bits_set(qweight, bits, pw, spec.in_features, 0)
            if self.name != "gptq":  # v1's "minus one" fills padded zero fields with ones
                bad += packing.unused_bits_set(qzeros, bits, pw, spec.out_features, 1)
            if bad:
                raise QuantFormatError(
                    f"{name}: {bad} packed words have bits set outside the {bits}-bit fields: "
                    "wrong --bits or corrupt tensors")
        return qweight, qzeros, scales

    def read(self, get, spec: ModuleSpec, params):
        name, bits = spec.name, spec.bits
        qweight, qzeros, scales = self._load_checked(get, spec)
        w = self._unpack(qweight, bits, spec.in_features, 0).t()
        z = self.decode_zeros(qzeros, bits, spec.out_features, params, name).t()
        g_idx = get("g_idx")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
        return make_qweight(w.contiguous(), z.contiguous(), scales.t().contiguous(), bits, spec.group_size,
                            g_idx, get("bias"), name)

    # -- packed-word fast path (2/4/8-bit, where EQAT, GPTQ and BitBLAS share the word layout) ---
    def zeros_words_to_v2(self, qzeros, bits, params):
        return qzeros

    def zeros_words_from_v2(self, qzeros, bits, out_features, ctx):
        return qzeros

    def read_words(self, get, spec: ModuleSpec, params):
        """Canonical words (GPTQ-v2 layout: qweight [in/pf, out], true-zero qzeros) or None."""
        if spec.bits not in (2, 4, 8) or spec.logical_bits:
            return None
        qweight, qzeros, scales = self._load_checked(get, spec)
        qz = self.zeros_words_to_v2(qzeros, spec.bits, params)
        if qz is None:
            return None
        g_idx = get("g_idx")
        return {"qweight": qweight, "qzeros": qz, "scales": scales, "g_idx": g_idx, "bias": get("bias")}

    def write_words(self, words, spec: ModuleSpec, stored_bits, ctx):
        if stored_bits != spec.bits or spec.bits not in (2, 4, 8):
            return None
        g_idx = words["g_idx"]
        if not words_g_idx_is_default(g_idx, spec):
            return None  # act-order: let the general path decide
        if g_idx is None:
            g_idx = default_g_idx(spec.in_features, qw_group(spec.group_size, spec.in_features))
        out = {"qweight": words["qweight"].contiguous(),
               "qzeros": self.zeros_words_from_v2(words["qzeros"], spec.bits, spec.out_features, ctx),
               "scales": words["scales"].to(torch.float16).contiguous(),
               "g_idx": g_idx.to(torch.int32).contiguous()}
        if words["bias"] is not None:
            out["bias"] = words["bias"].to(torch.float16).contiguous()
        return out

    def write(self, qw, stored_bits, ctx):
        check_codes(qw, "module")
        b = stored_bits
        out = {
            "qweight": self._pack(qw.int_weight.t(), b, dim=0),
            "qzeros": self.encode_zeros(qw.zeros.t(), b, ctx),
            "scales": qw.scales.t().to(torch.float16).contiguous(),
            "g_idx": qw.g_idx.to(torch.int32).contiguous(),
        }
        if qw.bias is not None:
            out["bias"] = qw.bias.to(torch.float16).contiguous()
        return out


class EqatFormat(InPackedFormat):
    name = "eqat"
    description = "original EfficientQAT (32//bits values per int32; 3-bit: 10 per word)"

    def per_word(self, bits):
        return packing.EQAT_PER_WORD[bits]

    def write(self, qw, stored_bits, ctx):
        if not g_idx_is_default(qw, qw.group_size):
            raise QuantFormatError("the EQAT format has no act-order: g_idx must be i // group_size")
        return super().write(qw, stored_bits, ctx)

    def folder_params(self, qcfg):
        if not qcfg or str(qcfg.get("quant_method", "")).lower() != "eqat":
            return {}
        return super().folder_params(qcfg)

    def quantize_config(self, ctx, meta):
        return {
            "quant_method": "eqat",
            "format": "eqat",
            "checkpoint_format": "eqat",
            "bits": ctx.bits,
            "group_size": ctx.group_size,
            "sym": bool(ctx.sym),
            "desc_act": False,
            "dynamic": ctx.dynamic or None,
            "meta": meta,
        }


FORMATS = (EqatFormat(),)
