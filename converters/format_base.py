"""The small types every on-disk format shares (the registry of formats is ``registry.py``).

A format is one module that subclasses :class:`QuantFormat` and lists its instances in ``FORMATS``
(``registry.py`` collects them; formats import only this module, never the registry). It knows
(1) how to read one module's tensors into a :class:`~effqat_plugin.qweight.QuantizedWeight`,
(2) how to write one back, (3) which shapes its tensors have (so bits / group size can be inferred
and checked from metadata alone, before any tensor is read), and (4) which per-module widths and
group sizes its runtime can hold (``stored_bits`` / ``group_compatible``).
Conversions always go reader -> QuantizedWeight -> writer; there are no format-pair shortcuts.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from effqat_plugin.qweight import QuantFormatError, QuantizedWeight, default_g_idx, n_groups_for

GROUP_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
BITS_CANDIDATES = (2, 3, 4, 8)
MODULE_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")

Getter = Callable[[str], Optional[torch.Tensor]]


def package_version(name: str, default: str = "0") -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return default


def gptqmodel_quantizer_entry() -> str:
    """The ``meta.quantizer`` entry GPTQModel's loader requires of asymmetric v1 folders."""
    return f"gptqmodel:{package_version('gptqmodel', '7.7.0')}"


def declared_sym(qcfg: dict | None) -> bool:
    """Whether a folder says every zero point is ``2^(b-1)``: GPTQ's ``sym: true``, or effqat's
    ``meta.sym`` (formats without a sym flag of their own, e.g. compressed-tensors asymmetric)."""
    qcfg = qcfg or {}
    meta = qcfg.get("meta") if isinstance(qcfg.get("meta"), dict) else {}
    return bool(qcfg.get("sym") or meta.get("sym"))


def qw_group(group_size: int, in_features: int) -> int:
    """Group size as QuantizedWeight accepts it (a group wider than the input is per-channel, -1)."""
    return -1 if group_size == -1 or group_size > in_features else group_size


@dataclass
class ModuleSpec:
    """What metadata says about one quantized linear (no tensor data read)."""

    name: str
    in_features: int
    out_features: int
    n_groups: int
    bits: int = 0
    group_size: int = 0
    has_bias: bool = False
    has_g_idx: bool = True
    in_known: bool = True  # False when in_features was derived from padded words (no g_idx)
    logical_bits: int = 0  # width the codes were quantized at, when stored wider (meta.wider_modules)

    @property
    def true_bits(self) -> int:
        return self.logical_bits or self.bits

    def group_ok(self, group: int) -> bool:
        return n_groups_for(self.in_features, group) == self.n_groups


@dataclass
class WriteContext:
    """Folder-level decisions and counters shared by one write (conversion or save)."""

    fmt: str
    bits: int
    group_size: int
    source_format: str = ""
    dynamic: dict = field(default_factory=dict)
    wider: dict = field(default_factory=dict)   # module -> {"bits": asked, "stored_bits": b, "extra_bytes": n}
    v1_encoding: str = "signflip"   # gptq (v1) output: 'signflip' (per-field safe) or 'plain'
    ragged: list = field(default_factory=list)  # modules some GPTQ kernels refuse (see hf_backend)
    v1_borrow_fields: int = 0
    v1_total_fields: int = 0
    desc_act: bool = False
    modules: int = 0
    sym: bool = False   # every zero point is 2^(b-1) (checked by convert._write); GPTQ writes sym: true
    module_overrides: dict = field(default_factory=dict)  # module -> the part of ``dynamic`` it got
    plain_weights: list = field(default_factory=list)     # modules of unquantized 2-D ``.weight`` tensors


class QuantFormat:
    """Base class of a format; see module docstring."""

    name: str = ""
    description: str = ""
    # Suffixes this format stores per quantized module.
    suffixes: tuple = MODULE_SUFFIXES
    # Suffixes every quantized module must have; the first one names the module (``<module>.qweight``).
    required: tuple = ("qweight", "qzeros", "scales")
    # Older names a reader also accepts: {suffix: (alias, ...)}; writers use ``suffixes``.
    aliases: dict = {}

    # --- metadata ----------------------------------------------------------------------------
    def qweight_dtype(self) -> str:
        return "I32"

    def module_geometry(self, name: str, shapes: dict, bits: int | None) -> tuple[int, int, int, bool]:
        """(in_features or 0 if unknown, out_features, n_groups, in_known) from tensor shapes."""
        raise NotImplementedError

    def shapes_for(self, bits: int, in_features: int, out_features: int, groups: int) -> dict:
        """Expected shapes of qweight / qzeros / scales for these parameters."""
        raise NotImplementedError

    def in_candidates(self, bits: int, shapes: dict) -> list[int]:
        """Possible in_features when nothing records it (largest first)."""
        raise NotImplementedError

    def geometry_ok(self, in_features: int, group: int) -> bool:
        """Whether this layout can hold a module of ``in_features`` at ``group`` at all (shape inference
        skips the (in, group) pairs it cannot, e.g. ragged groups where the format has none)."""
        return True

    # --- folder config -----------------------------------------------------------------------
    def folder_params(self, qcfg: dict | None) -> dict:
        """bits / group_size / dynamic (and format details) recorded in the folder, if any."""
        if not qcfg:
            return {}
        out = {}
        for k in ("bits", "group_size"):
            if qcfg.get(k) is not None:
                out[k] = int(qcfg[k])
        if qcfg.get("dynamic"):
            out["dynamic"] = qcfg["dynamic"]
        if declared_sym(qcfg):
            out["sym"] = True
        return out

    def quantize_config(self, ctx: WriteContext, meta: dict) -> dict | None:
        raise NotImplementedError

    def gptq_family_config(self, ctx: WriteContext, meta: dict, fmt: str, desc_act: bool,
                           sym: bool | None = None) -> dict:
        """quantize_config.json of a folder GPTQModel loads (gptq, gptq_v2, bitblas).

        ``sym`` (default ``ctx.sym``): every zero point is ``2^(b-1)``, so GPTQModel may pick its
        symmetric kernels (which ignore qzeros); the qzeros are written all the same. Not when a module
        is stored wider than its bits (3-bit kept at 4): its zero point 4 is not the wider width's 8,
        which a symmetric kernel would assume, so the folder then says ``sym: false`` (exact either way).

        GPTQModel's loader requires a ``gptqmodel:<version>`` quantizer entry for asymmetric v1
        (it also marks word-wide v1 zero points), so one is added when the meta has none.
        """
        meta = dict(meta)
        quantizers = list(meta.get("quantizer") or [])
        if not any(str(q).startswith("gptqmodel:") for q in quantizers):
            quantizers.insert(0, gptqmodel_quantizer_entry())
        meta["quantizer"] = quantizers
        return {
            "bits": ctx.bits,
            "group_size": ctx.group_size,
            "desc_act": bool(desc_act),
            "sym": bool(ctx.sym and not ctx.wider if sym is None else sym),
            "lm_head": False,
            "quant_method": "gptq",
            "format": fmt,
            "checkpoint_format": fmt,
            "pack_dtype": "int32",
            "dynamic": ctx.dynamic or None,
            "meta": meta,
        }

    def hf_quantization_config(self, ctx: WriteContext, qcfg: dict | None) -> dict | None:
        """``config.json``'s ``quantization_config``: what transformers' loader reads, or None.

        ``AutoModelForCausalLM.from_pretrained`` decides from this key alone whether a folder is
        quantized; without it every packed tensor is "unexpected" and the linears are random.
        """
        return None

    def gptq_family_hf_config(self, ctx: WriteContext, qcfg: dict) -> dict:
        """The quantize config plus a loading ``backend`` transformers' GPTQ integration honours.

        transformers (through optimum and gptqmodel) picks one kernel for every module from bits /
        group / device only; on CPU its 4-bit pick (``TorchCpuAvx512Linear``) refuses modules whose
        in_features are not a multiple of the group or whose out_features are not a multiple of 32
        (stories260k's 172-wide MLP). Folders with such modules name GPTQModel's ``torch`` kernel,
        which takes every shape; all others keep ``auto`` (the fastest kernel for the device).
        """
        out = dict(qcfg)
        out["backend"] = "torch" if ctx.ragged else "auto"
        return out

    def fetch_checked(self, get: Getter, spec: ModuleSpec, fmt_label: str):
        """qweight / qzeros / scales of one module, present and of the shapes bits/group imply."""
        name = spec.name
        tensors = {k: get(k) for k in ("qweight", "qzeros", "scales")}
        for k, t in tensors.items():
            if t is None:
                raise QuantFormatError(f"{name}: tensor {name}.{k} is missing")
        exp = self.shapes_for(spec.bits, spec.in_features, spec.out_features, spec.n_groups)
        for k, t in tensors.items():
            if tuple(t.shape) != exp[k]:
                raise QuantFormatError(
                    f"{name}.{k} has shape {tuple(t.shape)}, expected {exp[k]} for {fmt_label} at "
                    f"bits={spec.bits}, group_size={spec.group_size}: wrong --bits/--group-size or corrupt tensors")
        check_finite_scales(name, tensors["scales"])
        return tensors["qweight"], tensors["qzeros"], tensors["scales"]

    # --- capabilities ------------------------------------------------------------------------
    def stored_bits(self, spec: ModuleSpec) -> int:
        """Width this format/runtime stores the module at (>= spec.bits, same integers); or raise."""
        return spec.bits

    def group_compatible(self, spec: ModuleSpec, group: int) -> bool:
        return spec.group_ok(group)

    def check_folder(self, ctx: WriteContext, specs: list) -> None:
        """Refuse folder-level combinations the runtime cannot load."""

    # --- data --------------------------------------------------------------------------------
    def read(self, get: Getter, spec: ModuleSpec, params: dict) -> QuantizedWeight:
        raise NotImplementedError

    def write(self, qw: QuantizedWeight, stored_bits: int, ctx: WriteContext) -> dict:
        raise NotImplementedError

    # --- optional fast path ------------------------------------------------------------------
    # For 2/4/8-bit every format here stores the same LSB-first words (up to a transpose / LOP3
    # field permutation / v1 constant), so convert() can move whole words instead of unpacking
    # codes. ``read_words`` returns GPTQ-v2-layout words (qweight [ceil(in/pf), out], true-zero
    # qzeros [G, ceil(out/pf)], scales [G, out], g_idx, bias) or None; ``write_words`` returns this
    # format's tensors or None (then the general QuantizedWeight path runs). Tests check both
    # paths write identical bytes.
    def read_words(self, get: Getter, spec: ModuleSpec, params: dict):
        return None

    def write_words(self, words: dict, spec: ModuleSpec, stored_bits: int, ctx: WriteContext):
        return None


_EXP_MASK = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def check_finite_scales(name: str, scales: torch.Tensor) -> None:
    """NaN / Inf step sizes make every weight of their group NaN / Inf: refuse them on read.

    fp16 / bf16 are checked on their bits (a value is NaN/Inf iff its exponent field is all ones,
    i.e. ``bits & 0x7FFF >= exponent mask``): one AND and one max over int16 with numpy, about 20x
    faster than ``torch.isfinite`` on CPU halves, which dominated conversion time.
    """
    if not scales.is_floating_point() or scales.numel() == 0:
        return
    mask = _EXP_MASK.get(scales.dtype)
    if mask is not None:
        v = scales.contiguous().view(torch.int16).numpy().view(np.uint16)
        if int(np.bitwise_and(v, np.uint16(0x7FFF)).max()) < mask:
            return
    elif bool(torch.isfinite(scales).all()):
        return
    bad = int((~torch.isfinite(scales)).sum())
    raise QuantFormatError(f"{name}.scales holds {bad} NaN/Inf value(s): corrupt checkpoint")


def check_codes(qw: QuantizedWeight, name: str) -> None:
    """Re-validate a weight before packing (raises QuantFormatError with the module name)."""
    try:
        qw.validate()
    except QuantFormatError as e:
        raise QuantFormatError(f"{name}: {e}") from None


def g_idx_is_default(qw: QuantizedWeight, group: int) -> bool:
    return torch.equal(qw.g_idx.to(torch.int32), default_g_idx(qw.in_features, group))


def words_g_idx_is_default(g_idx: torch.Tensor | None, spec: ModuleSpec) -> bool:
    """The packed-word path's check: ``g_idx`` (None when the folder stores none) is the plain
    ``i // group_size`` of ``spec``, i.e. no act-order permutation to carry."""
    return g_idx is None or torch.equal(
        g_idx.to(torch.int32), default_g_idx(spec.in_features, qw_group(spec.group_size, spec.in_features)))


def make_qweight(int_weight, zeros, scales, bits, group, g_idx, bias, name) -> QuantizedWeight:
    try:
        return QuantizedWeight(int_weight=int_weight, zeros=zeros, scales=scales, bits=bits,
                               group_size=qw_group(group, int_weight.shape[1]), g_idx=g_idx, bias=bias)
    except QuantFormatError as e:
        raise QuantFormatError(f"{name}: {e}") from None
