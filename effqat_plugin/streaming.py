"""Decoder layers read from the safetensors shards when their turn comes, and released after.

The model is built on the meta device from config.json (accelerate's ``init_empty_weights``: parameters
take no memory, non-persistent buffers such as rotary ``inv_freq`` are computed for real), after
``defuser.replace_fused_blocks`` as ``GPTQModel.load`` does, then defused on the meta device by
GPTQModel's own defuser, so the layers have the modules GPTQModel's definitions name (phi3's fused
``gate_up_proj`` as ``gate_proj`` + ``up_proj``, MoE experts as one ``nn.Linear`` per expert and
projection). The modules outside the decoder layers (embeddings, final norm, the declared output
embeddings, whatever their name) are loaded once in the checkpoint's own dtype; each decoder layer is
read by ``materialize(i)`` through transformers' own loader (the model's key renames and tensor merges,
the defuser's checkpoint mappings) into a copy of the layer as transformers builds it, defused by
GPTQModel's defuser, and put back on the meta device by ``release(i)``. Tensors come from
:class:`SafetensorsFolder` (per-tensor plain file reads, no mmap, so only tensors in flight count in
RSS). Host memory is therefore the non-layer modules plus a constant number of layers, whatever the
depth, for dense and MoE models alike, and 16-bit checkpoints stay 16-bit in host memory.

Every tensor's presence and shape are checked against the model config.json describes before any
work starts (the whole load, dry-run on the meta device), so a missing shard or expert tensor, a
contradicting or unsplittable fused shape or a pickled-only folder fails in seconds with one line
naming the tensor and the file.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import logging
import os
from collections import Counter
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger("effqat.streaming")


def _source_dtype(dtypes) -> torch.dtype:
    """The checkpoint's floating dtype (the most common one among its tensors)."""
    from .converters.checkpoint import ST_DTYPES

    floating = [ST_DTYPES[d] for d in dtypes if d in ST_DTYPES and ST_DTYPES[d].is_floating_point]
    if not floating:
        raise ValueError("the checkpoint holds no floating-point tensors")
    return Counter(floating).most_common(1)[0][0]


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each layer's turn allocates and frees buffers of many sizes (16-bit weights, fp32 copies,
    optimizer state); glibc keeps freed chunks below its mmap threshold in its arenas, so without a
    trim the resident size creeps up layer after layer even though nothing is kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_buffers_directly(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation above ``threshold`` bytes with its own mmap (returned to the
    OS on free) instead of its heap, whose threshold otherwise adapts upwards (to 32 MB) so that
    layer-sized buffers land in the heap and fragment it. Measured at hidden 2048 (12 layers):
    peak RSS 2311-2339 MiB, flat over the layers, against 2546 rising to 2828 MiB without it.
    Process-wide and glibc-only (a no-op elsewhere); ``effqat quantize`` runs in its own process."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD; fixed, no adaptation
    except (OSError, AttributeError):
        pass


def _set(module: nn.Module, name: str, device, value=None, dtype=None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)


class NotStreamable(ValueError):
    """The model cannot be read layer by layer from its shards (one line saying why; see ``StreamedModel``)."""


def refuse_unstreamable(config, definition) -> None:
    """Raise :class:`NotStreamable` for what the streamed loader does not handle: an already-quantized
    source (``quantization_config`` in config.json, e.g. gpt-oss's MXFP4 experts: effqat quantizes
    floating-point weights and never reads packed ones as if they were), and GPTQModel definitions
    that defuse extra module paths or post-process the model after the defuser (``GPTQModel.load``
    alone knows how)."""
    qcfg = getattr(config, "quantization_config", None)
    if qcfg:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
        raise NotStreamable(f"config.json declares an already-quantized checkpoint (quant_method "
                            f"{method!r}); effqat quantizes floating-point weights only: start from the "
                            "bf16/fp16 release of the model")
    for hook in ("defuser_module_paths", "after_defuser_conversion"):
        if getattr(definition, hook, None):
            raise NotStreamable(f"GPTQModel's definition for {config.model_type} post-processes the model "
                                f"after the defuser ({hook}); rerun with --in-memory")


def _layers_of(model: nn.Module, definition):
    for prefix in definition.extract_layers_node():
        try:
            layers = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return prefix, layers
    from .layout import UnsupportedArchitectureError

    raise UnsupportedArchitectureError(f"decoder layers not found at {definition.extract_layers_node()} "
                                       f"in {type(model).__name__}")


def defuse(model: nn.Module, definition, layer_prefix: Optional[str] = None) -> None:
    """GPTQModel's defuser on ``model``, as ``GPTQModel.load`` runs it after loading (fused MLP projections
    such as phi3's / glm4's ``gate_up_proj`` and fused 3-D expert tensors become per-module
    ``nn.Linear``); with ``layer_prefix`` (``"model.layers.3"``) only that decoder layer is converted."""
    import re

    import defuser
    from gptqmodel.models.loader import _convert_model_with_defuser

    from .env import third_party_stdout

    with third_party_stdout():  # the defuser's LogBar lines print to stdout whatever their level
        if layer_prefix is None:
            _convert_model_with_defuser(definition, model, cleanup_original=True)
        else:
            defuser.convert_model(model, cleanup_original=True, filter=["^" + re.escape(layer_prefix) + r"(\.|$)"])


class _Loader:
    """transformers' own checkpoint-to-model loading (``convert_and_load_state_dict_in_model`` with the
    model's conversion mapping: key renames such as mixtral's ``block_sparse_moe`` -> ``mlp``, merges of
    per-expert tensors, the defuser's checkpoint mappings), applied to a chosen subset of the tensors."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.dtype = model, dtype
        self.mapping = get_model_conversion_mapping(model)
        self.dtype_plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}

    def target_of(self, meta_state: dict) -> callable:
        """``checkpoint key -> model key`` exactly as transformers' loader renames it (for converters
        merging several tensors: the first target key)."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = copy.deepcopy(self.mapping)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        prefix = self.model.base_model_prefix

        def target(key: str) -> str:
            renamed, _ = rename_source_key(key, renamings, converters, prefix, meta_state)
            if renamed not in meta_state and key in meta_state:
                renamed, _ = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
            return renamed
        return target

    def load(self, tensors: dict, device="cpu"):
        """Load ``tensors`` (checkpoint keys) into ``self.model``; transformers' ``LoadStateDictInfo``."""
        from transformers.core_model_loading import WeightConverter, convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        mapping = copy.deepcopy(self.mapping)
        if device == "meta":
            for m in mapping:
                if isinstance(m, WeightConverter):
                    m.force_cpu = False
        cfg = LoadStateDictConfig(device_map={"": device}, dtype=self.dtype, dtype_plan=self.dtype_plan,
                                  weight_mapping=mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        # transformers' loader thread pool only casts tensors already read here; in worker threads the
        # copies land in per-thread malloc arenas that keep their pages (peak RSS varied by 0.1 GiB between
        # identical runs of a 32-expert model), so load in this thread
        sync = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, cfg)
        finally:
            if sync is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = sync
            if bars:
                hf_logging.enable_progress_bar()
        return info


class StreamedModel:
    """A causal LM whose decoder layers live on the meta device until :meth:`materialize` is called.

    Each layer gets exactly the modules ``GPTQModel.load`` gives it: the model is built from config.json
    after ``defuser.replace_fused_blocks`` (as GPTQModel.load does), a layer's tensors are read through
    transformers' own loader (its key renames and tensor merges, the defuser's checkpoint mappings) into
    the layer as transformers builds it, and GPTQModel's defuser then converts that one layer (phi3's /
    glm4's fused ``gate_up_proj`` and fused 3-D expert tensors into per-module ``nn.Linear``; a fused
    projection GPTQModel's definition names as one linear, such as phi3's ``qkv_proj``, stays one). Heads are
    the model's declared output embeddings, whatever their name.

    ``model``: the transformers model (non-layer modules real, in ``source_dtype``; layers defused).
    ``folder``: the source shards (:class:`effqat_plugin.converters.checkpoint.SafetensorsFolder`).
    """

    def __init__(self, model_dir: str, dtype: Optional[torch.dtype] = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        import defuser

        from .converters.checkpoint import SafetensorsFolder
        from .env import third_party_stdout
        from .layout import definition_for

        self.model_dir = str(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.definition = definition_for(config.model_type)
        refuse_unstreamable(config, self.definition)
        self.folder = SafetensorsFolder(model_dir)  # missing folder / shard, pickled-only weights
        self.source_dtype = _source_dtype(self.folder.dtypes.values())
        self.dtype = dtype or self.source_dtype
        with third_party_stdout():
            defuser.replace_fused_blocks(config.model_type)  # as GPTQModel.load, before the model is built
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.layers_prefix, layers = _layers_of(self.model, self.definition)
        self.loader = _Loader(self.model, self.dtype)
        self._route_and_check()
        # the layers as transformers builds them: each materialize() loads a copy, then defuses it
        self._fused_layers = [self._copy(layer) for layer in layers]
        defuse(self.model, self.definition)  # the whole model, still on the meta device
        self._defused_shapes = [{k: tuple(v.shape) for k, v in layer.state_dict().items()} for layer in layers]
        map_large_buffers_directly()
        self.layout = None
        self._resident: set = set()
        self.max_resident = 0

    # -- validation ------------------------------------------------------------------------------
    def _tied_keys(self) -> set:
        from .layout import tied_output_keys

        return tied_output_keys(self.model)

    def _route_and_check(self) -> None:
        """Which checkpoint tensors each decoder layer (and the rest of the model) is loaded from, and
        a dry run of the whole load on the meta device: every tensor the model needs must be there with
        the shape config.json implies, before any work starts."""
        from .converters.checkpoint import ST_DTYPES

        folder = self.folder
        meta_state = self.model.state_dict()
        target = self.loader.target_of(meta_state)
        prefix = self.layers_prefix + "."
        self._layer_keys = [[] for _ in range(len(self.model.get_submodule(self.layers_prefix)))]
        self._outside_keys = []
        self._sources = {}
        for key in folder.keys:
            renamed = target(key)
            self._sources.setdefault(renamed, []).append(key)
            if renamed.startswith(prefix):
                index = renamed[len(prefix):].split(".", 1)[0]
                if index.isdigit() and int(index) < len(self._layer_keys):
                    self._layer_keys[int(index)].append(key)
                    continue
            self._outside_keys.append(key)
        meta = {k: torch.empty(folder.shapes[k], dtype=ST_DTYPES.get(folder.dtypes[k], torch.float32), device="meta")
                for k in folder.keys}
        info = self.loader.load(meta, device="meta")
        for name, got, expected in sorted(info.mismatched_keys):
            sources = self._sources_of(name)
            where = ", ".join(str(folder.path / folder.key_to_file[s]) for s in sources[:1]) or str(folder.path)
            tensor = name if sources == [name] or not sources else f"{name} (from {', '.join(sources[:3])})"
            raise ValueError(f"{where}: tensor {tensor} has shape {list(got)} but config.json implies "
                             f"{list(expected)}; the weights do not belong to this config")
        missing = sorted(set(info.missing_keys) - self._tied_keys())
        for name in missing:  # merged from one tensor per expert: name the expert tensor at fault
            self._check_merged_sources(name, meta_state)
        if missing:
            raise ValueError(f"{self.model_dir}: tensor {self._checkpoint_name(missing[0])} (required by "
                             "config.json) is in no safetensors shard; incomplete or mismatched checkpoint"
                             + (f" ({len(missing)} tensors missing)" if len(missing) > 1 else ""))

    def _check_merged_sources(self, model_key: str, meta_state: dict) -> None:
        """``model_key`` was not loaded and transformers builds it from one checkpoint tensor per expert
        (a ``*`` in its reverse-mapped name): raise naming the expert tensor that is absent, or whose
        shape differs from its siblings' (with its file)."""
        pattern = self._checkpoint_name(model_key).split(" ", 1)[0]
        value = meta_state.get(model_key)
        if "*" not in pattern or value is None or value.dim() < 1:
            return
        folder = self.folder
        head, _, tail = pattern.partition("*")
        tails = {tail.lstrip(".")} | {k[len(head):].partition(".")[2] for k in self._sources.get(model_key, [])
                          if k.startswith(head)}  # gate_proj and up_proj both merge into gate_up_proj
        keys = [f"{head}{e}.{t}" for t in sorted(tails) for e in range(value.shape[0])]
        absent = [k for k in keys if k not in folder.key_to_file]
        if absent:
            raise ValueError(f"{self.model_dir}: tensor {absent[0]} (required by config.json) is in no "
                             "safetensors shard; incomplete or mismatched checkpoint"
                             + (f" ({len(absent)} expert tensors missing)" if len(absent) > 1 else ""))
        shapes = Counter(tuple(folder.shapes[k]) for k in keys)
        common = shapes.most_common(1)[0][0]
        for k in keys:
            if tuple(folder.shapes[k]) != common:
                raise ValueError(f"{folder.path / folder.key_to_file[k]}: tensor {k} has shape "
                                 f"{list(folder.shapes[k])} but the other experts' are {list(common)}; "
                                 "corrupt or mismatched checkpoint")

    def _sources_of(self, name: str) -> list:
        if name in self._sources:
            return self._sources[name]
        parent = name.rpartition(".")[0]
        return [s for t, keys in self._sources.items() if t.rpartition(".")[0] == parent for s in keys]

    def _checkpoint_name(self, model_key: str) -> str:
        """The checkpoint key transformers would have read ``model_key`` from (its reverse mapping), so
        that a missing expert tensor is named as it is spelled in the shards."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = [m.reverse_transform() for m in copy.deepcopy(self.loader.mapping)]
        try:
            renamed, _ = rename_source_key(model_key, [m for m in mapping if isinstance(m, WeightRenaming)],
                                           [m for m in mapping if isinstance(m, WeightConverter)],
                                           reverse=True)
        except Exception:  # noqa: BLE001 - naming only; the model key is still exact
            return model_key
        return model_key if renamed == model_key else f"{renamed} (model key {model_key})"

    # -- loading ---------------------------------------------------------------------------------
    def attach_layout(self, layout) -> None:
        """Load everything outside the decoder layers; from now on layers come and go one by one."""
        self.layout = layout
        self._load_keys(self._outside_keys)
        if self._tied_keys():
            self.model.tie_weights()
        self.folder.close()

    def _load_keys(self, keys) -> None:
        info = self.loader.load({k: self.folder.get(k) for k in keys})
        if info.mismatched_keys:  # the shards changed since the dry run
            name, got, expected = sorted(info.mismatched_keys)[0]
            raise ValueError(f"{self.folder.path}: tensor {name} has shape {list(got)}, config.json implies "
                             f"{list(expected)}")

    def _copy(self, layer: nn.Module) -> nn.Module:
        """A deep copy of a (meta-device) layer that still shares the model's config: the experts'
        forward reads ``config._experts_implementation``, which the defuser sets on the model's."""
        return copy.deepcopy(layer, memo={id(self.model.config): self.model.config})

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` read from the shards (source dtype, host memory) and defused, in
        place of its meta-device shell in the model; no residency bookkeeping (see :meth:`materialize`)."""
        layers = self.model.get_submodule(self.layers_prefix)
        layers[index] = self._copy(self._fused_layers[index])
        self._load_keys(self._layer_keys[index])
        defuse(self.model, self.definition, f"{self.layers_prefix}.{index}")
        self.folder.close()
        layer = layers[index]
        shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        if shapes != self._defused_shapes[index]:
            raise ValueError(f"{self.model_dir}: decoder layer {index} defuses to other modules when loaded "
                             "than on the meta device; report this model type")
        meta = [k for k, v in layer.state_dict().items() if v.is_meta]
        if meta:
            raise ValueError(f"{self.model_dir}: {self.layers_prefix}.{index}.{meta[0]} was not loaded from "
                             "the shards")
        return layer

    def materialize(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from the shards (source dtype, host memory)."""
        if index not in self._resident:
            self.load_layer(index)
            self._resident.add(index)
            self.max_resident = max(self.max_resident, len(self._resident))
        return self.model.get_submodule(self.layers_prefix)[index]

    def release(self, index: int) -> None:
        """Put decoder layer ``index`` back on the meta device (its memory is freed)."""
        layer = self.model.get_submodule(self.layers_prefix)[index]
        for name in layer.state_dict():
            _set(layer, name, "meta")
        self._resident.discard(index)
        release_freed_memory()

    def upcast_embedding_output(self, dtype: torch.dtype):
        """Hook making the input embeddings return ``dtype`` (the compute dtype), as a model upcast in
        full would: the rotary tables and the captured layer-0 inputs are then exactly the ones an
        fp32 model produces, while the embedding matrix stays in its source dtype. Returns the handle."""
        emb = self.model.get_input_embeddings()
        return emb.register_forward_hook(lambda _m, _args, out: out.to(dtype))
