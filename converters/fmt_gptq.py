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
* Our ``gptq`` writer (``v1_encoding="signflip"``, the default) makes the file mean the same to both
  kinds of reader: for every group whose zero point is 0 it stores ``W' = maxq - W``, ``z' = maxq``,
  ``s' = -s``. Then ``(W' - z') * s' = (-W) * (-s) = W * s`` exactly (fp16 negation is exact), no
  stored field is ``0 - 1``, so nothing borrows, and word-wide readers (GPTQModel, transformers) and
  per-field readers (AutoGPTQ, exllama, TGI, vLLM's older kernels) decode identical weights.
  GPTQModel's kernels compute ``(W - z) * s`` and accept negative scales (tested: dequantized weights
  and logits equal). ``v1_encoding="plain"`` writes GPTQModel's word-wide form unchanged (counts the
  fields a per-field reader would misread and warns). Our reader turns flipped groups (``z == maxq``
  with negative scales) back into ``z = 0``, so round trips are bit-exact.
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
from .checkpoint import DerivedTensor
from .fmt_eqat import InPackedFormat
from effqat_plugin.qweight import QuantizedWeight

from .format_base import ModuleSpec, WriteContext, words_g_idx_is_default

log = logging.getLogger("effqat.converters")

MIN_GPTQMODEL_WORD_V1 = Version("0.9.0")


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


V1_ENCODINGS = ("signflip", "plain")


def flip_groups(qw: QuantizedWeight, flip_og: torch.Tensor, maxq: int | None = None) -> QuantizedWeight:
    """Store ``(maxq - W, maxq - z, -s)`` for the groups where ``flip_og`` ([out, G] bool) is set.

    Applied to groups with ``z = 0`` it gives the sign-flip encoding; it is its own inverse, so
    applied to the flipped groups (``z = maxq``, negative scales) it gives back ``(W, 0, s)``.
    """
    if not bool(flip_og.any()):
        return qw
    maxq = (1 << qw.bits) - 1 if maxq is None else maxq   # a module stored wider keeps its own range
    g_idx = qw.g_idx.long()
    per_in = flip_og[:, g_idx]                                     # [out, in]
    w = torch.where(per_in, (maxq - qw.int_weight.to(torch.int16)).to(torch.uint8), qw.int_weight)
    z = torch.where(flip_og, (maxq - qw.zeros.to(torch.int16)).to(torch.uint8), qw.zeros)
    s = torch.where(flip_og, -qw.scales, qw.scales)
    return QuantizedWeight(int_weight=w, zeros=z, scales=s, bits=qw.bits, group_size=qw.group_size,
                           g_idx=qw.g_idx, bias=qw.bias)


def flipped_groups(zeros, scales, maxq) -> torch.Tensor:
    """Groups written by the sign-flip encoding: zero point maxq and a negative (sign-bit) scale."""
    return (zeros == maxq) & torch.signbit(scales)


def _sign_bits(scales: torch.Tensor) -> np.ndarray:
    """Sign bit of every scale as a numpy bool array (no float ops: fast on fp16)."""
    if scales.element_size() == 2:
        return scales.contiguous().view(torch.int16).numpy() < 0
    return scales.contiguous().view(torch.int32).numpy() < 0


def flip_words(words: dict, flip_go: np.ndarray, spec: ModuleSpec, lazy: bool = False) -> dict:
    """The sign flip on GPTQ-v2-layout words (qweight [in/pf, out], true-zero qzeros, scales [G, out]).

    ``flip_go`` is a numpy bool ``[G, out]``. All numpy, single-threaded: torch's element-wise CPU
    ops stall on a busy 2-core machine and made v1 output 3x slower than v2. ``lazy`` (the output
    side of a conversion): qweight becomes a :class:`DerivedTensor`, flipped while it is written.
    """
    if not flip_go.any():
        return words
    b = spec.bits
    out = dict(words)
    group = spec.group_size if spec.n_groups > 1 else -1
    fn = packing.group_flip_rows(flip_go, b, spec.in_features, group) if lazy else None
    qweight = words["qweight"]
    if fn is not None and isinstance(qweight, torch.Tensor):
        out["qweight"] = DerivedTensor(qweight, qweight.shape, torch.int32, fn)
    else:
        out["qweight"] = packing.flip_group_words(qweight, flip_go, b, spec.in_features, group)
    zmask = packing.pack_words(torch.from_numpy(flip_go.astype(np.uint8) * np.uint8((1 << b) - 1)),
                               b, 32 // b, dim=1)
    out["qzeros"] = packing.xor_words(words["qzeros"], zmask)
    scales = words["scales"]
    if lazy and scales.dtype in (torch.float16, torch.float32):   # negated while written, too
        out["scales"] = DerivedTensor(scales, scales.shape, scales.dtype, packing.negate_rows(flip_go))
    else:
        out["scales"] = packing.negate_where(scales, flip_go)
    return out


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

    def hf_quantization_config(self, ctx, qcfg):
        return self.gptq_family_hf_config(ctx, qcfg)

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
        if not packing.any_zero_field(qzeros, bits, out_features):   # no zero point, no borrow: a per-field
            ctx.v1_total_fields += qzeros.shape[0] * out_features    # reader decodes every field right
            return words
        zeros_go = packing.unpack_words(qzeros, bits, 32 // bits, out_features, dim=1)
        ctx.v1_borrow_fields += field_misreads(words, zeros_go, bits)
        ctx.v1_total_fields += zeros_go.numel()
        return words

    def read(self, get, spec, params):
        qw = super().read(get, spec, params)
        if self.v2:
            return qw
        maxq = (1 << spec.true_bits) - 1
        return flip_groups(qw, flipped_groups(qw.zeros, qw.scales, maxq), maxq)

    def read_words(self, get, spec, params):
        words = super().read_words(get, spec, params)
        if words is None or self.v2:
            return words
        maxq = (1 << spec.bits) - 1
        if not words_g_idx_is_default(words["g_idx"], spec):
            return None  # act-order: the general path handles flipped groups
        z = packing.unpack_words(words["qzeros"], spec.bits, 32 // spec.bits, spec.out_features, dim=1)
        return flip_words(words, (z.numpy() == maxq) & _sign_bits(words["scales"]), spec)

    def write_words(self, words, spec, stored_bits, ctx):
        if not self.v2 and ctx.v1_encoding == "signflip" and stored_bits == spec.bits:
            if not words_g_idx_is_default(words["g_idx"], spec):
                return None
            z = packing.unpack_words(words["qzeros"], spec.bits, 32 // spec.bits, spec.out_features, dim=1)
            words = flip_words(words, z.numpy() == 0, spec, lazy=True)
        return super().write_words(words, spec, stored_bits, ctx)

    def write(self, qw, stored_bits, ctx):
        if not torch.equal(qw.g_idx.to(torch.int32), torch.arange(qw.in_features, dtype=torch.int32)
                           // (qw.group_size if qw.group_size != -1 else qw.in_features)):
            ctx.desc_act = True
        if not self.v2 and ctx.v1_encoding == "signflip":
            qw = flip_groups(qw, qw.zeros == 0)
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


FORMATS = (GptqFormat(v2=False), GptqFormat(v2=True))
