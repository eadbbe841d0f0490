"""A GGUF run (``effqat quantize MODEL OUT.gguf --format gguf --gguf-type Q4_K_M``): which llama.cpp
block type each tensor gets, before Block-AP; and the file at the end.

Before training, :func:`plan_types` names every quantized linear as llama.cpp will (its converter's
joins and renames, ``converters.gguf_layout``, then ``gguf``'s tensor name map) and asks the preset
(``gguf_presets``, llama.cpp's per-tensor rules) for each tensor's type. Linears train on that type
(``gguf_weights``); the other 2-D tensors the preset quantizes (token_embd, output) are llama.cpp's own
quantization of the fp tensor when the file is written, as ``llama-quantize`` makes them.

At the end, :func:`write_gguf_file` stages the run (trained norms and other fp tensors in the
checkpoint's 16-bit dtype, every linear as its GGUF rows, config and tokenizer) into a temporary
safetensors folder, one tensor at a time (``SpoolingShardWriter``: host memory holds one tensor), and
hands it to llama.cpp's converter (``converters.gguf_export.write_gguf``), which writes the file.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch

log = logging.getLogger("effqat.gguf")

ROWS_SUFFIX = ".gguf_rows"
_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class TypePlan:
    """Per-tensor types of one GGUF run."""
    preset: str
    arch: str
    modules: Dict[str, str]          # quantized linear (HF module name) -> block type
    floats: Dict[str, str]           # GGUF tensor name of another quantized 2-D tensor -> block type
    tensors: Dict[str, dict]         # GGUF tensor name -> {"type", "preset_type", "fallback", "reason"}
    gguf_names: Dict[str, str]       # quantized linear -> its GGUF tensor name


def _gguf_name(tensor_map, key: str) -> Optional[str]:
    name = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None and _EXPERT.search(key):   # one expert of a stack the converter merges
        name = tensor_map.get_name(_EXPERT.sub(".experts.", key), try_suffixes=(".weight", ".bias"))
    return name


def plan_types(model_dir: str, model, quantized_names, preset: str) -> TypePlan:
    """The block type of every quantized linear and of the other 2-D tensors, by ``preset``'s rules.
    Refuses (one line) architectures llama.cpp's converter does not know and linears it names no
    GGUF tensor for; nothing has been trained yet."""
    from . import gguf_presets
    from .converters import gguf_export, gguf_layout

    gguf, conversion = gguf_export._converter()
    arch, base, hparams = gguf_export._architecture(Path(model_dir), conversion)
    gguf_arch = gguf.MODEL_ARCH_NAMES[base.model_arch]
    hp = gguf_presets.hparams_from_hf_config(model.config.to_dict())
    tensor_map = gguf.get_tensor_name_map(base.model_arch, int(hp["n_layer"]))
    from .layout import tied_output_keys

    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = list(quantized_names)
    prefixes = tuple(n + "." for n in names)
    tied = tied_output_keys(model)   # not in the file: llama.cpp then gives token_embd the output's rule
    floats_2d = [k for k, shape in state.items()
                 if len(shape) == 2 and not k.startswith(prefixes) and k not in tied]
    quantized, _ = gguf_layout.converter_inputs(arch, names, [])
    gguf_names, shapes = {}, {}
    for inp in quantized:
        name = _gguf_name(tensor_map, inp.name)
        if name is None:
            raise NotImplementedError(f"{inp.parts[0]}: llama.cpp's tensor names for {arch} have no entry for "
                                      f"it, so its GGUF type cannot be chosen; this architecture cannot be "
                                      f"trained on GGUF types yet")
        out_f, in_f = state[f"{inp.parts[0]}.weight"]
        rows = sum(state[f"{p}.weight"][0] for p in inp.parts)
        if _EXPERT.search(inp.parts[0]) or "experts" in name:
            n_exp = len({_EXPERT.search(p).group(0) for p in inp.parts if _EXPERT.search(p)}) or 1
            shapes[name] = (n_exp, rows // n_exp, in_f)
        else:
            shapes[name] = (rows, in_f)
        for p in inp.parts:
            gguf_names[p] = name
    float_names = {}
    for k in floats_2d:
        name = _gguf_name(tensor_map, k)
        if name is not None:
            float_names[k] = name
            shapes[name] = state[k]
    choices = gguf_presets.tensor_types(preset, gguf_arch, shapes, hp)
    missing = sorted({n for n in gguf_names.values() if n not in choices})
    if missing:
        raise NotImplementedError(f"llama.cpp's {preset} rules give no type for {missing[0]} "
                                  f"({len(missing)} tensor(s)); not training on a guess")
    tensors = {n: asdict(c) if hasattr(c, "__dataclass_fields__") else dict(c) for n, c in choices.items()}
    modules = {m: tensors[n]["type"] for m, n in gguf_names.items()}
    floats = {n: tensors[n]["type"] for n in float_names.values() if n in tensors}
    _check_types(modules, floats)
    return TypePlan(preset, gguf_arch, modules, floats, tensors, gguf_names)


def _check_types(modules: dict, floats: dict) -> None:
    from .llama_cpp_quants import GGML_TYPE

    bad = sorted({t for t in list(modules.values()) + list(floats.values()) if t not in GGML_TYPE})
    if bad:
        raise NotImplementedError(f"the preset gives block type(s) {', '.join(bad)}, which effqat cannot "
                                  f"write (it writes {', '.join(GGML_TYPE)})")


def describe(plan: TypePlan) -> str:
    """One line per distinct (type, fallback) count, for the log."""
    counts: Dict[str, int] = {}
    for c in plan.tensors.values():
        key = c["type"] + (f" (fallback from {c['preset_type']})" if c.get("fallback") else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))


# -- the file --------------------------------------------------------------------------------------

class StagedModules:
    """The quantized modules of a staged GGUF run for ``gguf_export._Rows``: rows already encoded."""

    def __init__(self, folder, types: Dict[str, str], shapes: Dict[str, tuple]):
        from effqat_plugin.converters.format_base import ModuleSpec

        self.folder, self.types = folder, types
        self.specs = {m: ModuleSpec(name=m, in_features=int(s[1]), out_features=int(s[0]), n_groups=1)
                      for m, s in shapes.items()}

    def check(self, m: str) -> None:
        pass

    def row_type(self, m: str) -> str:
        return self.types[m]

    @staticmethod
    def joint_type(name: str, types):
        types = set(types)
        if len(types) != 1:
            raise NotImplementedError(f"{name}: llama.cpp's converter joins modules trained on different "
                                      f"block types ({', '.join(sorted(types))})")
        return types.pop()

    def encoded(self, m: str, qtype) -> np.ndarray:
        if qtype != self.types[m]:
            raise NotImplementedError(f"{m}: trained as {self.types[m]}, asked to write {qtype}")
        rows = self.folder.get(m + ROWS_SUFFIX).numpy()
        self.folder.drop_pages([m + ROWS_SUFFIX])
        return rows


META_KEY = "effqat.eqat"   # the run's meta.eqat (as in quantize_config.json of the other formats), JSON


def write_gguf_file(out: str, model_dir: str, model, tokenizer, dtype: torch.dtype, items: Iterable,
                    plan: TypePlan, overwrite: bool = False, meta: Optional[dict] = None) -> dict:
    """Write the GGUF file ``out`` from ``items``: ``(key, tensor)`` for the fp tensors and
    ``(module, frozen weight)`` for the quantized linears (``gguf_weights``); ``meta`` (the run's
    meta.eqat) goes into the file's metadata under ``effqat.eqat``. Returns the report."""
    from .converters import gguf_export
    from .converters.checkpoint import SafetensorsFolder
    from .converters.incremental import SpoolingShardWriter
    from .gguf_weights import encoded_rows, is_gguf_weight
    from .integration import stage_config_files

    dst = Path(out)
    gguf_export.check_gguf_destination(Path(model_dir), dst, overwrite)
    staging = Path(stage_config_files(model, tokenizer, dtype))
    try:
        writer = SpoolingShardWriter(staging, 2 << 30)
        shapes = {}
        for key, value in items:
            if is_gguf_weight(value):
                if value.qtype != plan.modules.get(key):
                    raise NotImplementedError(f"{key}: trained as {value.qtype}, the plan says "
                                              f"{plan.modules.get(key)}")
                writer.add(key + ROWS_SUFFIX, torch.from_numpy(np.ascontiguousarray(encoded_rows(value))))
                if value.bias is not None:
                    writer.add(key + ".bias", value.bias.to(dtype))
                shapes[key] = (value.out_features, value.in_features)
            else:
                writer.add(key, value)
        writer.finish()
        missing = sorted(set(plan.modules) - set(shapes))
        if missing:
            raise NotImplementedError(f"{missing[0]} ({len(missing)} module(s)) reached the GGUF writer "
                                      f"without its trained rows; not writing a partial model")
        gguf, conversion = gguf_export._converter()
        arch, base, hparams = gguf_export._architecture(staging, conversion)
        folder = SafetensorsFolder(staging)
        other = [k for k in folder.keys if not k.endswith(ROWS_SUFFIX)]
        rows = gguf_export._Rows(StagedModules(folder, plan.modules, shapes))
        written: dict = {}
        try:
            extra = {META_KEY: json.dumps(meta, default=str)} if meta else None
            gguf_export.write_gguf(staging, dst, overwrite, arch, base, hparams, folder, rows, other, {},
                                   written, llama_types=plan.floats, extra_kv=extra)
        finally:
            folder.close()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _report(dst, plan, rows.tensors, written)


def _report(dst: Path, plan: TypePlan, module_tensors, written: dict) -> dict:
    """Every GGUF tensor's stored type and bits per weight, the preset's choice and any fallback."""
    from .converters.gguf_export import bits_per_weight
    from .llama_cpp_quants import K_TYPES
    from .quantizer import UNIFORM32_GRIDS

    def how(qtype: str) -> str:
        if qtype in K_TYPES:
            return "K grid"
        rounding = "weights, through llama.cpp's rounding"
        if qtype not in UNIFORM32_GRIDS:
            return rounding
        return rounding + ("; steps d, mins in E2E-QP" if UNIFORM32_GRIDS[qtype].asymmetric else "; steps d in E2E-QP")

    tensors = []
    for t in module_tensors:
        c = plan.tensors.get(t["name"], {})
        tensors.append({**t, "trained": how(t["type"]),
                        "preset_type": c.get("preset_type", t["type"]), "fallback": bool(c.get("fallback"))})
    for name, qtype in plan.floats.items():
        got = written.get(name)
        if got is None:       # e.g. a tied output head: llama.cpp reuses token_embd
            continue
        c = plan.tensors.get(name, {})
        tensors.append({"name": name, "type": got, "bits_per_weight": bits_per_weight(got),
                        "trained": "no: llama.cpp's quantization of the fp tensor",
                        "preset_type": c.get("preset_type", qtype), "fallback": bool(c.get("fallback"))})
    counts: Dict[str, int] = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    fallback = [t["name"] for t in tensors if t["fallback"]]
    if fallback:
        log.warning("%d tensor(s) take llama.cpp's fallback type (rows not a multiple of 256): %s",
                    len(fallback), ", ".join(fallback[:8]) + (" ..." if len(fallback) > 8 else ""))
    return {"target_format": "gguf", "destination": str(dst), "gguf_type": plan.preset, "gguf_arch": plan.arch,
            "tensors": tensors, "tensor_types": counts, "fallback": fallback,
            "bytes_written": dst.stat().st_size, "files": [dst.name]}
