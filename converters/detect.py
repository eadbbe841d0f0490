"""Which format a folder holds, and every quantized module's bits / group size / dims.

Decided from metadata only (safetensors headers, ``quantize_config.json``, ``config.json``'s
``quantization_config``, the folder name), so a whole conversion is planned and checked before any
tensor is read.

Format: ``weight_packed`` tensors (or ``quant_method: compressed-tensors``) -> ``compressed-tensors``;
int8 ``qweight`` without ``g_idx`` -> ``bitblas``; int32 ``qweight`` -> GPTQ when a quantize
config says ``quant_method: gptq`` (``checkpoint_format``/``format`` ``gptq_v2`` -> v2, else v1),
otherwise the original EQAT format (its folders carry no quantize config, or ours with
``quant_method: eqat``). A config that contradicts the tensors, or modules in different layouts, is
an error.

Bits / group size, per module, first match wins: explicit ``bits=/group_size=`` (checked against the
tensors), the folder's config (+ ``dynamic`` per-module overrides), inference from tensor shapes when
exactly one (bits, group) fits every module, the folder / repo name (``w2g64``), else an error asking
for ``--bits/--group-size``.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from effqat_plugin.qweight import QuantFormatError, QuantizedWeight, n_groups_for

from .checkpoint import SafetensorsFolder
from .fmt_gptq import dynamic_for, parse_dynamic
from .format_base import BITS_CANDIDATES, GROUP_CANDIDATES, ModuleSpec, QuantFormat
from .registry import get_format

log = logging.getLogger("effqat.converters")

NAME_RE = re.compile(r"(?:^|[^a-z0-9])w(\d)g(\d+)(?:$|[^0-9])", re.I)


@dataclass
class FolderPlan:
    folder: SafetensorsFolder
    fmt: QuantFormat
    qcfg: dict | None
    params: dict
    specs: dict = field(default_factory=dict)          # module name -> ModuleSpec
    other_keys: list = field(default_factory=list)     # non-quantized tensor names
    bits: int = 0
    group_size: int = 0
    inferred_from: str = ""

    def key(self, module: str, suffix: str) -> str:
        """The stored name of ``module.suffix`` (an older alias such as BitBLAS ``.zeros`` if that is it)."""
        return stored_key(self.folder, self.fmt, module, suffix)

    def getter(self, module: str):
        return lambda suf: self.folder.get(self.key(module, suf))

    def module_keys(self, module: str) -> list:
        keys = [self.key(module, s) for s in self.fmt.suffixes]
        return [k for k in keys if k in self.folder.shapes]

    def in_file(self, module: str, e: QuantFormatError) -> QuantFormatError:
        """``e`` prefixed with the shard file that holds ``module``."""
        shard = self.folder.key_to_file.get(self.key(module, self.fmt.required[0]), "")
        return QuantFormatError(f"{self.folder.path / shard}: {e}")

    def read(self, module: str) -> QuantizedWeight:
        """One module of the folder, narrowed back to its quantized width if stored wider."""
        spec = self.specs[module]
        try:
            qw = self.fmt.read(self.getter(module), spec, self.params)
        except QuantFormatError as e:
            raise self.in_file(module, e) from None
        if spec.logical_bits and spec.logical_bits != qw.bits:
            qw = QuantizedWeight(int_weight=qw.int_weight, zeros=qw.zeros, scales=qw.scales,
                                 bits=spec.logical_bits, group_size=qw.group_size, g_idx=qw.g_idx,
                                 bias=qw.bias)
        return qw


def stored_key(folder: SafetensorsFolder, fmt: QuantFormat, module: str, suffix: str) -> str:
    k = f"{module}.{suffix}"
    if k in folder.shapes:
        for alt in fmt.aliases.get(suffix, ()):
            if f"{module}.{alt}" in folder.shapes:
                raise QuantFormatError(f"{module}: both {k} and {module}.{alt} are stored; keep one")
        return k
    for alt in fmt.aliases.get(suffix, ()):
        if f"{module}.{alt}" in folder.shapes:
            return f"{module}.{alt}"
    return k


def _read_json(p: Path):
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None


def read_quant_config(path: Path) -> dict | None:
    q = _read_json(path / "quantize_config.json")
    if q is not None:
        return q
    cfg = _read_json(path / "config.json") or {}
    qc = cfg.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def name_hint(path: Path):
    """(bits, group) from a folder or repo name such as ``Llama-2-7b-EfficientQAT-w2g64``."""
    for part in (path.resolve().name, path.name):
        m = NAME_RE.search(part)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


PACKED_MARKERS = ("qweight", "weight_packed")   # the tensor that names a quantized module, per layout family


def module_names(folder: SafetensorsFolder, marker: str | None = None):
    """Quantized modules: names of ``<module>.qweight`` (GPTQ family, AWQ, BitBLAS, EQAT) or
    ``<module>.weight_packed`` (compressed-tensors) tensors; ``marker`` picks one."""
    for m in (marker,) if marker else PACKED_MARKERS:
        mods = [k[: -len(m) - 1] for k in folder.keys if k.endswith("." + m)]
        if mods:
            return mods
    raise ValueError(f"{folder.path} holds no quantized modules (no '*.qweight' or '*.weight_packed' "
                     "tensors); is it a quantized checkpoint?")


def detect_format(folder: SafetensorsFolder, qcfg: dict | None) -> str:
    packed = any(k.endswith(".weight_packed") for k in folder.keys)
    method = str((qcfg or {}).get("quant_method", "")).lower()
    if packed or method == "compressed-tensors":
        if any(k.endswith(".qweight") for k in folder.keys):
            raise ValueError("mixed formats in one folder: compressed-tensors weight_packed and qweight tensors")
        if qcfg and method != "compressed-tensors":
            raise ValueError(f"folder config says quant_method={method!r} but the tensors are "
                             "compressed-tensors (weight_packed)")
        module_names(folder, "weight_packed")
        return "compressed-tensors"
    mods = module_names(folder, "qweight")
    dtypes = Counter(folder.dtypes[m + ".qweight"] for m in mods)
    if len(dtypes) > 1:
        raise ValueError(f"mixed formats in one folder: qweight dtypes {dict(dtypes)}")
    dt = next(iter(dtypes))
    with_gidx = sum(1 for m in mods if m + ".g_idx" in folder.dtypes)
    declared = None
    if qcfg:
        method = str(qcfg.get("quant_method", "gptq")).lower()
        fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "").lower()
        if method == "eqat" or fmt == "eqat":
            declared = "eqat"
        elif method == "awq":
            declared = "awq"
        elif fmt == "bitblas" or method == "bitblas":  # GPTQModel 0.9.8-4.x: checkpoint_format; vLLM: method
            declared = "bitblas"
        elif method == "gptq":
            declared = "gptq_v2" if fmt == "gptq_v2" else "gptq"
        else:
            raise ValueError(f"unsupported quantization in the folder config: quant_method={method!r}, "
                             f"format={fmt!r}")
    if dt in ("I8", "U8"):
        if with_gidx:
            raise ValueError("mixed formats: int8 qweight (BitBLAS) together with g_idx tensors")
        if declared not in (None, "bitblas"):
            raise ValueError(f"folder config says {declared} but qweight tensors are int8 (BitBLAS)")
        return "bitblas"
    if dt != "I32":
        raise ValueError(f"unsupported qweight dtype {dt}")
    if declared == "awq" and with_gidx:
        raise ValueError("folder config says awq but the modules carry g_idx (GPTQ/EQAT tensors)")
    if declared == "bitblas":
        raise ValueError("folder config says bitblas but qweight tensors are int32 (GPTQ/EQAT)")
    if 0 < with_gidx < len(mods) and declared is None:
        log.warning("%d of %d modules lack g_idx", len(mods) - with_gidx, len(mods))
    return declared or "eqat"


def _module_shapes(folder, name, fmt):
    shapes = {}
    for suf in fmt.suffixes:
        k = stored_key(folder, fmt, name, suf)
        if k in folder.shapes:
            shapes[suf] = folder.shapes[k]
    for suf in fmt.required:
        if suf not in shapes:
            raise QuantFormatError(f"{name}: tensor {name}.{suf} is missing")
    return shapes


def _candidates(fmt: QuantFormat, name, shapes, bits_list, groups):
    """All (bits, group, in) that fit the module's tensor shapes."""
    out = []
    for b in bits_list:
        in_f, out_f, g, known = fmt.module_geometry(name, shapes, b)
        ins = [in_f] if known else fmt.in_candidates(b, shapes)
        for n in ins:
            if n <= 0:
                continue
            for gs in groups:
                if n_groups_for(n, gs) != g or not fmt.geometry_ok(n, gs):
                    continue
                exp = fmt.shapes_for(b, n, out_f, g)
                # tensors a layout may leave out (compressed-tensors' symmetric zero points) are not compared;
                # fmt.required ones are present (_module_shapes)
                if all(tuple(shapes[k]) == tuple(v) for k, v in exp.items() if k in shapes):
                    out.append((b, gs, n))
    return out


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# (module-name suffix, which config size in_features / out_features must equal; None = unchecked)
_CONFIG_DIMS = (
    (re.compile(r"\.self_attn\.[qkv]_proj$"), "hidden_size", None),
    (re.compile(r"\.self_attn\.o_proj$"), None, "hidden_size"),
    (re.compile(r"\.mlp\.(gate|up)_proj$"), "hidden_size", "intermediate_size"),
    (re.compile(r"\.mlp\.down_proj$"), "intermediate_size", "hidden_size"),
)


def check_against_config(path: Path, specs: dict, folder: SafetensorsFolder) -> None:
    """Refuse tensors whose shapes contradict ``config.json`` (wrong config or corrupt tensors).

    Metadata only and deliberately narrow, so it never refuses a valid model: layer indices below
    ``num_hidden_layers``; the embedding / lm_head width; and the Llama-family linears whose dims the
    config states outright (``self_attn.{q,k,v}_proj`` in, ``o_proj`` out, ``mlp.{gate,up,down}_proj``
    against ``hidden_size`` / ``intermediate_size``; MoE experts, fused and other names unchecked).
    """
    cfg = _read_json(path / "config.json")
    if not isinstance(cfg, dict):
        return
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config here
        cfg = {**cfg, **cfg["text_config"]}
    where = path / "config.json"
    n_layers = cfg.get("num_hidden_layers")
    if isinstance(n_layers, int):
        for k in folder.keys:
            m = _LAYER_RE.search(k)
            if m and int(m.group(1)) >= n_layers and ".mtp." not in k:
                raise ValueError(f"{where}: num_hidden_layers={n_layers} but the weights hold {k}")
    hidden = cfg.get("hidden_size")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        shp = folder.shapes.get(k)
        if isinstance(hidden, int) and shp is not None and len(shp) == 2 and shp[1] != hidden:
            raise ValueError(f"{where}: hidden_size={hidden} but {k} has shape {list(shp)}")
    for name, spec in specs.items():
        for rx, in_key, out_key in _CONFIG_DIMS:
            if not rx.search(name) or ".experts." in name or ".shared_expert" in name:
                continue
            for key, got, side in ((in_key, spec.in_features, "in"), (out_key, spec.out_features, "out")):
                want = cfg.get(key) if key else None
                if isinstance(want, int) and got != want:
                    raise ValueError(f"{where}: {key}={want} but the tensors of {name} give "
                                     f"{side}_features={got} (wrong config.json or corrupt tensors)")


def plan_folder(src, bits=None, group_size=None, v1_zeros: str | None = None) -> FolderPlan:
    path = Path(src)
    folder = SafetensorsFolder(path)
    qcfg = read_quant_config(path)
    fmt_name = detect_format(folder, qcfg)
    fmt = get_format(fmt_name)
    params = fmt.folder_params(qcfg)
    if v1_zeros and v1_zeros != "auto":
        if v1_zeros not in ("word", "field"):
            raise ValueError("v1_zeros must be auto, word or field")
        params["v1_zeros"] = v1_zeros
    mods = module_names(folder, fmt.required[0])
    rules = parse_dynamic(params.get("dynamic"))
    plan = FolderPlan(folder=folder, fmt=fmt, qcfg=qcfg, params=params)
    owned = set()
    all_groups = (-1,) + GROUP_CANDIDATES
    per_mod = {}
    for m in mods:
        shapes = _module_shapes(folder, m, fmt)
        for suf in fmt.suffixes:
            k = stored_key(folder, fmt, m, suf)
            if k in folder.shapes:
                owned.add(k)
        per_mod[m] = (shapes, _candidates(fmt, m, shapes, BITS_CANDIDATES, all_groups))
        if not per_mod[m][1]:
            raise QuantFormatError(
                f"{m}: tensor shapes {shapes} fit no bits in {BITS_CANDIDATES} and group size for the "
                f"{fmt.name} format (corrupt or truncated tensors?)")
    plan.other_keys = [k for k in folder.keys if k not in owned]

    # folder-level bits / group: explicit > config > shapes > name
    hint = name_hint(path)
    src_bits = bits if bits is not None else params.get("bits")
    src_group = group_size if group_size is not None else params.get("group_size")
    how = "arguments" if bits is not None or group_size is not None else ("config" if params.get("bits") else "")

    if src_bits is None or src_group is None:
        common = None
        for m, (_, cands) in per_mod.items():
            if dynamic_for(rules, m):  # per-module overrides are checked below
                continue
            s = {(b, g) for b, g, _ in cands
                 if (src_bits is None or b == src_bits) and (src_group is None or g == src_group)}
            common = s if common is None else common & s
        common = common or set()
        if len(common) == 1:
            src_bits, src_group = next(iter(common))
            how = how or "tensor shapes"
        elif hint and hint in common:
            src_bits, src_group = hint
            how = how or "folder name"
        else:
            opts = ", ".join(f"w{b}g{g}" for b, g in sorted(common)) or "none"
            if not common and (src_bits is not None or src_group is not None):
                free = None
                for m, (_, cands) in per_mod.items():
                    s = {(b, g) for b, g, _ in cands}
                    free = s if free is None else free & s
                fits = ", ".join(f"w{b}g{g}" for b, g in sorted(free or ())) or "nothing"
                raise ValueError(
                    f"the tensors of {path} do not fit bits={src_bits}, group_size={src_group} "
                    f"(from {how or 'config'}); they fit: {fits}")
            if hint:
                raise ValueError(
                    f"folder name says w{hint[0]}g{hint[1]} but the tensors do not fit it (they fit: {opts})")
            raise ValueError(
                f"cannot tell bits / group size of {path} from its tensors (candidates: {opts}); "
                "pass --bits and --group-size (bits=, group_size=)")
    plan.bits, plan.group_size, plan.inferred_from = int(src_bits), int(src_group), how
    if hint and how in ("tensor shapes", "config") and hint != (plan.bits, plan.group_size):
        log.warning("folder name says w%dg%d but the %s say w%dg%d; using the latter",
                    hint[0], hint[1], how, plan.bits, plan.group_size)

    wider = ((qcfg or {}).get("meta") or {}).get("wider_modules") or {}
    for m, (shapes, cands) in per_mod.items():
        ov = dynamic_for(rules, m)
        if ov is None:
            raise ValueError(f"{m} is quantized but the folder's dynamic config excludes it")
        b = int(ov.get("bits", plan.bits))
        g = int(ov.get("group_size", plan.group_size))
        match = [c for c in cands if c[0] == b and c[1] == g]
        if not match:
            fit = ", ".join(sorted({f"w{c[0]}g{c[1]}" for c in cands}))
            raise ValueError(
                f"{m}: its tensors {dict(shapes)} do not fit bits={b}, group_size={g} "
                f"(from {how or 'overrides'}); they fit {fit}")
        n = match[0][2]
        in_f, out_f, ng, known = fmt.module_geometry(m, shapes, b)
        if not known and len({c[2] for c in match}) > 1:
            log.warning("%s: no g_idx; assuming in_features=%d", m, n)
        logical = 0
        w = wider.get(m)
        if isinstance(w, dict) and int(w.get("stored_bits", b)) == b and int(w.get("bits", b)) < b:
            logical = int(w["bits"])
        plan.specs[m] = ModuleSpec(name=m, in_features=n, out_features=out_f, n_groups=ng, bits=b,
                                   group_size=g, has_bias=f"{m}.bias" in folder.shapes,
                                   has_g_idx=f"{m}.g_idx" in folder.shapes, in_known=known,
                                   logical_bits=logical)
    check_against_config(path, plan.specs, folder)
    return plan
