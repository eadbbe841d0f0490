"""The Python API: ``convert`` (streaming, folder -> folder), ``save_quantized`` and ``load_quantized``.

Every path goes reader -> :class:`QuantizedWeight` -> writer, one module at a time (or, at 2/4/8
bits, as whole packed words). ``convert`` reads the source through private mappings of its shards,
gives back each module's pages once consumed, and flushes output shards at ``max_shard_size``;
tensors that pass through unchanged are copied file-to-file by the kernel. Peak RSS stays under
about 1.3x the largest shard (0.4x when qweight bytes do not change; ``scripts/bench_convert.py``). Output is built in a temporary sibling folder and renamed into
place at the end; any error removes it and leaves ``dst`` untouched.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import torch

import effqat_plugin
from effqat_plugin.qweight import QuantFormatError, QuantizedWeight

from . import packing
from .checkpoint import (ShardWriter, atomic_folder, carried_files, check_destination, copy_files,
                         parse_size, write_json)
from .detect import plan_folder
from .format_base import ModuleSpec, QuantFormat, WriteContext
from .registry import get_format

log = logging.getLogger("effqat.converters")

CONVERTER_NAME = "effqat.converters"


def _effqat_entry() -> str:
    return f"effqat:{effqat_plugin.__version__}"


def _packed_bytes(fmt: QuantFormat, bits: int, s: ModuleSpec) -> int:
    try:
        shp = fmt.shapes_for(bits, s.in_features, s.out_features, s.n_groups)
    except Exception:  # pragma: no cover - formats without a shape rule
        return 0
    itemsize = 1 if fmt.qweight_dtype() == "I8" else 4
    return itemsize * (shp["qweight"][0] * shp["qweight"][1] + shp["qzeros"][0] * shp["qzeros"][1])


def is_ragged(s: ModuleSpec) -> bool:
    """Dims some GPTQ kernels refuse: in/out not multiples of 32, or in not a multiple of the group."""
    g = s.group_size
    return bool(s.in_features % 32 or s.out_features % 32 or (g > 0 and s.n_groups > 1 and s.in_features % g))


def decide(fmt: QuantFormat, specs: list[ModuleSpec], bits: int, group: int, source_format: str,
           v1_encoding: str = "signflip", sym: bool = False):
    """Folder bits / group, per-module stored widths and ``dynamic`` overrides for writing ``fmt``."""
    from .fmt_gptq import V1_ENCODINGS

    if v1_encoding not in V1_ENCODINGS:
        raise ValueError(f"v1_encoding must be one of {V1_ENCODINGS}, got {v1_encoding!r}")
    ctx = WriteContext(fmt=fmt.name, bits=bits, group_size=group, source_format=source_format,
                       v1_encoding=v1_encoding, sym=bool(sym))
    ctx.ragged = [s.name for s in specs if is_ragged(s)]
    specs = [dataclasses.replace(s, bits=s.true_bits, logical_bits=0) for s in specs]
    fmt.check_folder(ctx, specs)
    stored = {}
    for s in specs:
        sb = fmt.stored_bits(s)           # raises for what the runtime cannot hold
        stored[s.name] = sb
        override = {}
        if sb != bits:
            override["bits"] = sb
        if not fmt.group_compatible(s, group):
            if fmt.group_compatible(s, s.group_size):
                mg = s.group_size
            elif s.n_groups == 1 and fmt.group_compatible(s, -1):
                mg = -1
            else:
                raise QuantFormatError(
                    f"{s.name}: {fmt.name} cannot store group size {s.group_size} for in_features="
                    f"{s.in_features}")
            if mg != group:
                override["group_size"] = mg
        if override:
            ctx.dynamic[f"+:^{re.escape(s.name)}$"] = override
            ctx.module_overrides[s.name] = override
        if sb != s.bits:
            extra = _packed_bytes(fmt, sb, s) - _packed_bytes(fmt, s.bits, s)
            ctx.wider[s.name] = {"bits": s.bits, "stored_bits": sb, "extra_bytes": int(extra),
                                 "in_features": s.in_features, "out_features": s.out_features}
    return ctx, stored


def _fast_module(plan, dst_fmt: QuantFormat, m: str, stored_bits: int, ctx: WriteContext):
    spec = plan.specs[m]
    if spec.true_bits not in (2, 4, 8) or stored_bits != spec.bits:
        return None
    try:
        words = plan.fmt.read_words(plan.getter(m), spec, plan.params)
    except QuantFormatError as e:
        raise plan.in_file(m, e) from None
    if words is None:
        return None
    if ctx.sym:
        z = packing.unpack_words(words["qzeros"], spec.bits, 32 // spec.bits, spec.out_features, dim=1)
        check_symmetric(m, z, spec.bits)
    return dst_fmt.write_words(words, spec, stored_bits, ctx)


def check_symmetric(name: str, zeros: torch.Tensor, bits: int) -> None:
    """A folder written as ``sym: true`` promises zero points of ``2^(b-1)`` everywhere: symmetric
    kernels (GPTQModel's, vLLM's Marlin) never read qzeros, so any other value would be silently wrong."""
    mid = 1 << (bits - 1)
    bad = int((zeros.to(torch.int16) != mid).sum())
    if bad:
        raise QuantFormatError(f"{name}: {bad} zero point(s) differ from {mid}, but the folder is symmetric "
                               "(sym: true); symmetric kernels would ignore them")


def _meta(ctx: WriteContext, fmt: QuantFormat, user_meta: dict | None) -> dict:
    meta = dict(user_meta or {})
    quantizers = [q for q in (meta.get("quantizer") or []) if not str(q).startswith("effqat:")]
    if isinstance(meta.get("quantizer"), str):
        quantizers = [meta["quantizer"]]
    quantizers.append(_effqat_entry())
    meta["quantizer"] = quantizers
    meta["converter"] = CONVERTER_NAME
    meta.setdefault("source_format", ctx.source_format)
    if ctx.wider:
        meta["wider_modules"] = ctx.wider
    if ctx.sym:
        meta["sym"] = True
    if fmt.name == "gptq":
        meta["v1_zero_points"] = ("sign-flipped zero-point-0 groups: per-field and word-wide readers agree"
                                  if ctx.v1_encoding == "signflip" else "word-wide (GPTQModel convention)")
    return meta


def _report(ctx: WriteContext, fmt: QuantFormat, extra: dict) -> dict:
    rep = {
        "target_format": fmt.name,
        "bits": ctx.bits,
        "group_size": ctx.group_size,
        "modules": ctx.modules,
        "dynamic": ctx.dynamic,
        "wider_modules": ctx.wider,
        "wider_extra_bytes": sum(v["extra_bytes"] for v in ctx.wider.values()),
        "v1_borrow_fields": ctx.v1_borrow_fields,
        "v1_total_fields": ctx.v1_total_fields,
        "desc_act": ctx.desc_act,
        "sym": ctx.sym,
    }
    rep.update(extra)
    return rep


def _warn(ctx: WriteContext, fmt: QuantFormat):
    if ctx.sym and ctx.wider and fmt.name in ("gptq", "gptq_v2"):
        log.warning("symmetric model, but %d module(s) are stored at a wider width (zero point 2^(b-1) of the "
                    "narrower width): the folder says sym: false so kernels read the zero points (weights "
                    "exact; meta.sym still records the symmetric training)", len(ctx.wider))
    if ctx.wider:
        log.warning(
            "%d module(s) stored at a wider width than asked (same integers, zeros and scales; lossless) "
            "because the %s runtime cannot hold them at %d bits: %s; cost %d extra bytes",
            len(ctx.wider), fmt.name, ctx.bits, ", ".join(sorted(ctx.wider)),
            sum(v["extra_bytes"] for v in ctx.wider.values()))
    if fmt.name == "gptq" and ctx.v1_borrow_fields:  # only with v1_encoding="plain"
        log.warning(
            "gptq (v1) output: %d of %d zero-point fields follow a zero point of 0 and borrow across "
            "fields in GPTQModel's word-wide v1 convention. GPTQModel loads them exactly, but per-field "
            "readers (vLLM's and exllama's GPTQ kernels, AutoGPTQ) would misread these %d zero points; "
            "drop --v1-encoding plain (the default sign-flip encoding has no borrows) or use --to gptq_v2",
            ctx.v1_borrow_fields, ctx.v1_total_fields, ctx.v1_borrow_fields)


def _write(dst: Path, fmt: QuantFormat, ctx: WriteContext, stored: dict, items: Iterable,
           config_src, meta: dict | None, overwrite: bool, max_shard_size, source=None,
           shard_writer=ShardWriter) -> dict:
    """Drain ``items`` ((name, QuantizedWeight | Tensor)) into ``dst`` atomically."""
    max_bytes = parse_size(max_shard_size)
    with atomic_folder(dst, overwrite) as tmp:
        sw = shard_writer(tmp, max_bytes, source=source)
        for name, obj in items:
            if isinstance(obj, dict):          # already in the target layout (fast path)
                ctx.modules += 1
                for suf, t in obj.items():
                    sw.add(f"{name}.{suf}", t)
            elif isinstance(obj, QuantizedWeight):
                if ctx.sym:
                    check_symmetric(name, obj.zeros, obj.bits)
                try:
                    tensors = fmt.write(obj, stored[name], ctx)
                except QuantFormatError as e:
                    raise QuantFormatError(f"{name}: {e}") from None
                ctx.modules += 1
                for suf, t in tensors.items():
                    sw.add(f"{name}.{suf}", t)
            else:
                if name.endswith(".weight") and len(obj.shape) == 2:
                    ctx.plain_weights.append(name[: -len(".weight")])
                sw.add(name, obj)
        files = sw.finish()
        qcfg = fmt.quantize_config(ctx, _meta(ctx, fmt, meta))
        if qcfg is not None:
            write_json(tmp / "quantize_config.json", qcfg)
        copy_files(carried_files(config_src), tmp, fmt.hf_quantization_config(ctx, qcfg) if qcfg else None)
        written = sum((tmp / f).stat().st_size for f in files)
    _warn(ctx, fmt)
    return {"files": files, "bytes_written": written}


# ----------------------------------------------------------------------------------------------
def convert(src, dst, *, to: str, bits=None, group_size=None, overwrite=False, dry_run=False,
            max_shard_size="4GB", v1_zeros: str = "auto", fast: bool = True,
            v1_encoding: str = "signflip", gguf_options: dict | None = None) -> dict:
    """Convert a quantized folder (EQAT / GPTQ v1 / GPTQ v2 / BitBLAS / AWQ) to format ``to``.

    ``to="gguf"`` writes one llama.cpp file ``dst`` instead (lossless block types; see
    :mod:`.gguf_export`); ``gguf_options`` takes its ``embedding_type`` / ``output_type``.

    ``bits`` / ``group_size`` are needed only when neither the folder's config, its tensor shapes nor
    its name tell them; when given they must agree with the tensors. ``v1_zeros`` ('auto', 'word',
    'field') overrides how GPTQ v1 zero points are read (see fmt_gptq). ``fast`` lets 2/4/8-bit
    modules move as whole packed words when both formats support it (identical output; tested).
    Returns a report dict.
    """
    if to == "gguf":  # one llama.cpp model file, not a folder format (see gguf_export)
        from .gguf_export import convert_to_gguf
        return convert_to_gguf(src, dst, bits=bits, group_size=group_size, overwrite=overwrite,
                               dry_run=dry_run, v1_zeros=v1_zeros, **(gguf_options or {}))
    t0 = time.time()
    dst_fmt = get_format(to)
    src = Path(src)
    plan = plan_folder(src, bits=bits, group_size=group_size, v1_zeros=v1_zeros)
    specs = list(plan.specs.values())
    ctx, stored = decide(dst_fmt, specs, plan.bits, plan.group_size, plan.fmt.name, v1_encoding,
                         sym=bool(plan.params.get("sym")))
    if not dry_run:
        check_destination(src, dst, overwrite)
    folder = plan.folder
    extra = {"source": str(src), "source_format": plan.fmt.name, "inferred_from": plan.inferred_from,
             "destination": str(dst), "dry_run": bool(dry_run), "source_bytes": folder.total_bytes(),
             "largest_source_shard_bytes": folder.largest_shard_bytes()}
    if plan.fmt.name == "gptq":
        extra["v1_zeros_read_as"] = plan.params.get("v1_zeros")
    if dry_run:
        ctx.modules = len(specs)
        return _report(ctx, dst_fmt, extra)

    owner = {}
    for m in plan.specs:
        for k in plan.module_keys(m):
            owner[k] = m

    def items():
        done = set()
        try:
            for shard in folder.shards:
                for key in folder.shard_keys(shard):
                    m = owner.get(key)
                    if m is None:
                        yield key, folder.get(key)
                        continue
                    if m in done:
                        continue
                    done.add(m)
                    if fast:
                        tensors = _fast_module(plan, dst_fmt, m, stored[m], ctx)
                        if tensors is not None:
                            yield m, tensors
                            folder.drop_pages(plan.module_keys(m))
                            continue
                    yield m, plan.read(m)
                    folder.drop_pages(plan.module_keys(m))
        finally:
            folder.close()

    meta = {"source_format": plan.fmt.name}
    if plan.qcfg and isinstance(plan.qcfg.get("meta"), dict):
        for k in ("eqat",):
            if k in plan.qcfg["meta"]:
                meta[k] = plan.qcfg["meta"][k]
        meta["source_quantizer"] = plan.qcfg["meta"].get("quantizer")
    # Source tensors become zero-copy views of the shards; those a conversion passes through
    # unchanged (qweight between EQAT and GPTQ at 2/4/8 bits, scales, g_idx, embeddings, norms)
    # are copied file-to-file by the kernel when the output shard is written.
    folder.mmap_reads = True
    try:
        out = _write(Path(dst), dst_fmt, ctx, stored, items(), src, meta, overwrite, max_shard_size,
                     source=folder.source_range)
    finally:
        folder.release_maps()
    extra.update(out)
    extra["seconds"] = round(time.time() - t0, 3)
    return _report(ctx, dst_fmt, extra)


def _spec_of(name: str, qw: QuantizedWeight) -> ModuleSpec:
    return ModuleSpec(name=name, in_features=qw.in_features, out_features=qw.out_features,
                      n_groups=qw.n_groups, bits=qw.bits, group_size=qw.group_size,
                      has_bias=qw.bias is not None)


def folder_bits_group(qweights: Mapping[str, QuantizedWeight | ModuleSpec]) -> tuple[int, int]:
    bits = Counter(q.bits for q in qweights.values()).most_common(1)[0][0]
    groups = Counter(q.group_size for q in qweights.values() if q.group_size != -1 and q.n_groups > 1)
    if groups:
        return bits, groups.most_common(1)[0][0]
    groups = Counter(q.group_size for q in qweights.values())
    return bits, groups.most_common(1)[0][0]


def save_quantized(dst, *, fmt: str, qweights: Mapping[str, QuantizedWeight],
                   tensors: Mapping[str, torch.Tensor], config_dir_or_files, meta: dict | None = None,
                   overwrite: bool = False, max_shard_size: str = "4GB", v1_encoding: str = "signflip",
                   sym: bool = False) -> dict:
    """Write in-memory quantized modules + other tensors as a ``fmt`` folder; returns a report.

    ``sym``: every zero point is ``2^(b-1)`` (checked); GPTQ folders then say ``sym: true``."""
    if not qweights:
        raise ValueError("save_quantized: no quantized modules given")
    clash = [k for k in tensors if any(k == f"{m}.{s}" for m in qweights for s in ("qweight", "qzeros",
                                                                                  "scales", "g_idx"))]
    if clash:
        raise ValueError(f"tensors clash with quantized module tensors: {clash[:3]}")

    def items():
        yield from tensors.items()
        yield from qweights.items()

    specs = {n: _spec_of(n, q) for n, q in qweights.items()}
    return save_modules(dst, fmt, specs, items(), config_dir_or_files, meta, overwrite, max_shard_size,
                        v1_encoding=v1_encoding, sym=sym)


def save_modules(dst, fmt: str, specs: Mapping[str, ModuleSpec], items: Iterable, config_dir_or_files,
                 meta: dict | None, overwrite: bool, max_shard_size, v1_encoding: str = "signflip",
                 shard_writer=ShardWriter, sym: bool = False) -> dict:
    """The writer behind ``save_quantized`` and ``incremental.save_quantized_stream``: decide the folder's
    bits, group and per-module widths from ``specs`` (every quantized module ``items`` yields), then
    drain ``items`` ((name, QuantizedWeight | Tensor), in shard order) into ``dst`` atomically."""
    f = get_format(fmt)
    bits, group = folder_bits_group(specs)
    ctx, stored = decide(f, list(specs.values()), bits, group,
                         source_format=(meta or {}).get("source_format", "effqat"), v1_encoding=v1_encoding,
                         sym=sym)
    check_destination(None, dst, overwrite)
    m = dict(meta or {})
    m.setdefault("source_format", "effqat")
    out = _write(Path(dst), f, ctx, stored, items, config_dir_or_files, m, overwrite, max_shard_size,
                 shard_writer=shard_writer)
    return _report(ctx, f, {"destination": str(dst), **out})


def load_quantized(src, *, bits=None, group_size=None, v1_zeros: str = "auto"):
    """Read a whole folder into memory: (format, {module: QuantizedWeight}, {name: tensor}, config).

    For small models and tests; :func:`convert` streams instead. ``config`` is the folder's quantize
    config, or (original EQAT folders) a dict with the inferred ``bits``/``group_size``/``format``.
    """
    plan = plan_folder(src, bits=bits, group_size=group_size, v1_zeros=v1_zeros)
    folder = plan.folder
    qweights, tensors = {}, {}
    try:
        for m in plan.specs:
            qweights[m] = plan.read(m)
        for k in plan.other_keys:
            tensors[k] = folder.get(k)
    finally:
        folder.close()
    cfg = dict(plan.qcfg or {})
    cfg.setdefault("bits", plan.bits)
    cfg.setdefault("group_size", plan.group_size)
    cfg.setdefault("format", plan.fmt.name)
    return plan.fmt.name, qweights, tensors, cfg
