"""GPTQ formats as GPTQModel 7.7 loads them: ``gptq`` (v1) and ``gptq_v2``.

Layout (per linear): qweight int32 ``[ceil(in*b/32), out]`` packed along in; qzeros int32
``[n_groups, ceil(out*b/32)]`` packed along out; scales fp16 ``[n_groups, out]``; g_idx int32 ``[in]``;
optional bias. 2/4/8-bit pack ``32 // b`` values per word; **3-bit is one continuous bit stream**
(32 values in 3 words).

Zero points
-----------
* ``gptq_v2`` stores the true zero point.
* ``gptq`` (v1) stores "zero - 1". GPTQModel (since 0.9.0, when it introduced v2) converts by
  subtracting a word-wide constant (0x55555555 at 2-bit, 0x11111111 at 4-bit, 0x01010101 at 8-bit)
  from every packed qzeros word, and adds it back when loading. A zero point of 0 therefore borrows
  from the next field: the words are right for GPTQModel but per-field readers
  (``((w >> s) & mask) + 1``: vLLM's and exllama's GPTQ kernels, AutoGPTQ) misread the neighbour.
  3-bit is converted per field by GPTQModel (no borrow).
  Our ``gptq`` writer reproduces GPTQModel's word-wide convention exactly (so the folder loads in
  GPTQModel), counts the fields a per-field reader would misread, and logs a warning that suggests
  ``gptq_v2``.
* Reading v1 written by other tools: the two conventions give the same zero points except right after
  a field whose stored value is all ones (zero point 0). The reader decides by provenance:
  ``meta.quantizer`` containing ``gptqmodel:<version>`` with version >= 0.9.0 (GPTQModel's own rule,
  ``MIN_VERSION_WITH_V2``), or an ``effqat:`` entry, means word-wide; anything else (AutoGPTQ,
  optimum, no meta) means per-field. ``v1_zeros="word"|"field"`` overrides it.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import torch
from packaging.version import InvalidVersion, Version

from . import packing
from .fmt_eqat import InPackedFormat
from .registry import ModuleSpec, WriteContext, package_version, register

log = logging.getLogger("effqat.converters")

MIN_GPTQMODEL_WORD_V1 = Version("0.9.0")


def gptqmodel_quantizer_entry() -> str:
    return f"gptqmodel:{package_version('gptqmodel', '7.7.0')}"


def v1_convention_from_meta(qcfg: dict | None) -> str:
    """'word' (GPTQModel >= 0.9 / effqat) or 'field' (everything else); see module docstring."""
    quantizers = ((qcfg or {}).get("meta") or {}).get("quantizer") or []
    if isinstance(quantizers, str):
        quantizers = [quantizers]
    for q in quantizers:
        producer, _, ver = str(q).partition(":")
        producer = producer.strip().lower()
        if producer == "effqat":
            return "word"
        if producer == "gptqmodel":
            try:
                if Version(ver.strip()) >= MIN_GPTQMODEL_WORD_V1:
                    return "word"
            except InvalidVersion:
                return "word"
    return "field"


def field_misreads(qzeros_v1: torch.Tensor, zeros_go: torch.Tensor, bits: int) -> int:
    """How many real zero-point fields a per-field reader (``field + 1``) would get wrong."""
    pw = 32 // bits
    f = packing.unpack_words(qzeros_v1, bits, pw, zeros_go.shape[1], dim=1).numpy()
    per_field = (f + np.uint8(1)) & np.uint8((1 << bits) - 1)
    return int(np.count_nonzero(per_field != zeros_go.numpy()))


class GptqFormat(InPackedFormat):
    """``gptq_v2`` when ``v2`` else ``gptq`` (v1)."""

    def __init__(self, v2: bool):
        self.v2 = v2
        self.name = "gptq_v2" if v2 else "gptq"
        self.description = ("GPTQ, true zero points (GPTQModel format gptq_v2)" if v2 else
                            "GPTQ v1, zero points minus one (GPTQModel format gptq)")

    def per_word(self, bits):
        return None if bits == 3 else 32 // bits

    # -- config -------------------------------------------------------------------------------
    def folder_params(self, qcfg):
        out = super().folder_params(qcfg)
        if not self.v2:
            out["v1_zeros"] = v1_convention_from_meta(qcfg)
        if qcfg and qcfg.get("desc_act"):
            out["desc_act"] = True
        return out

    def quantize_config(self, ctx, meta):
        return self.gptq_family_config(ctx, meta, self.name, ctx.desc_act)

    # -- capabilities -------------------------------------------------------------------------
    def stored_bits(self, spec: ModuleSpec) -> int:
        # GPTQModel's TORCH kernel dequantizes continuous 3-bit in blocks of 3 words, so in and out
        # must be multiples of 32; other modules keep their integers at 4 bits (lossless).
        if spec.bits == 3 and (spec.in_features % 32 or spec.out_features % 32):
            return 4
        return spec.bits

    # -- zero points --------------------------------------------------------------------------
    def decode_zeros(self, qzeros, bits, out, params, name):
        if self.v2:
            return super().decode_zeros(qzeros, bits, out, params, name)
        conv = params.get("v1_zeros", "field")
        mask = (1 << bits) - 1
        if bits != 3 and conv == "word":
            return super().decode_zeros(packing.add_word_constant(qzeros, bits, +1), bits, out, params, name)
        f = super().decode_zeros(qzeros, bits, out, params, name).to(torch.int16)
        return ((f + 1) & mask).to(torch.uint8)

    def encode_zeros(self, zeros_go, bits, ctx: WriteContext):
        if self.v2:
            return super().encode_zeros(zeros_go, bits, ctx)
        if bits == 3:
            shifted = ((zeros_go.to(torch.int16) - 1) & 7).to(torch.uint8)
            return super().encode_zeros(shifted, bits, ctx)
        words = packing.add_word_constant(super().encode_zeros(zeros_go, bits, ctx), bits, -1)
        ctx.v1_borrow_fields += field_misreads(words, zeros_go, bits)
        ctx.v1_total_fields += zeros_go.numel()
        return words

    def zeros_words_to_v2(self, qzeros, bits, params):
        if self.v2:
            return qzeros
        if params.get("v1_zeros", "field") != "word":
            return None  # per-field v1: decode through the general path
        return packing.add_word_constant(qzeros, bits, +1)

    def zeros_words_from_v2(self, qzeros, bits, out_features, ctx):
        if self.v2:
            return qzeros
        words = packing.add_word_constant(qzeros, bits, -1)
        zeros_go = packing.unpack_words(qzeros, bits, 32 // bits, out_features, dim=1)
        ctx.v1_borrow_fields += field_misreads(words, zeros_go, bits)
        ctx.v1_total_fields += zeros_go.numel()
        return words

    def write(self, qw, stored_bits, ctx):
        if not torch.equal(qw.g_idx.to(torch.int32), torch.arange(qw.in_features, dtype=torch.int32)
                           // (qw.group_size if qw.group_size != -1 else qw.in_features)):
            ctx.desc_act = True
        return super().write(qw, stored_bits, ctx)


def parse_dynamic(dynamic: dict | None):
    """[(negative, compiled regex, overrides)] from a GPTQModel ``dynamic`` dict."""
    rules = []
    for key, val in (dynamic or {}).items():
        neg = key.startswith("-:")
        pat = key[2:] if key[:2] in ("+:", "-:") else key
        rules.append((neg, re.compile(pat), val or {}))
    return rules


def dynamic_for(rules, name: str):
    """None if the module is excluded from quantization, else its override dict (maybe empty)."""
    for neg, rx, val in rules:
        if rx.match(name):
            return None if neg else val
    return {}


register(GptqFormat(v2=False))
register(GptqFormat(v2=True))
