"""Decoder layers read from the safetensors shards when their turn comes, and released after.

The model is built on the meta device from config.json (accelerate's ``init_empty_weights``: parameters
take no memory, non-persistent buffers such as rotary ``inv_freq`` are computed for real). The modules
outside the decoder layers (embeddings, final norm, head) are loaded once in the checkpoint's own
dtype; each decoder layer is filled from the shards by ``materialize(i)`` (per-tensor plain file
reads through :class:`SafetensorsFolder`, no mmap, so only tensors in flight count in RSS) and put
back on the meta device by ``release(i)``. Host memory is therefore the non-layer modules plus a
constant number of layers, whatever the depth, and 16-bit checkpoints stay 16-bit in host memory.

Every tensor's presence and shape are checked against the model config.json describes before any
work starts, so a missing shard, a contradicting shape or a pickled-only folder fails in seconds
with one line naming the file.
"""
from __future__ import annotations

import ctypes
import gc
import logging
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
    """The model cannot be read layer by layer from its shards as they are (see ``moe_modules``)."""


def moe_modules(model: nn.Module) -> list:
    """Names of the model's mixture-of-experts modules. transformers 5 builds experts fused
    (``experts.gate_up_proj`` ``[experts, 2*inter, hidden]``) and renames checkpoint keys while loading
    (GPTQModel's defuser, once active in the process, builds them per expert under other names); only
    ``GPTQModel.load`` (transformers' loader plus the defuser) reliably gives the per-expert linears EQAT
    quantizes, so MoE models are not streamed from their shards as they are."""
    return [name for name, m in model.named_modules()
            if any(t in type(m).__name__.lower() for t in ("moe", "expert"))
            or any(p.dim() >= 3 for p in m.parameters(recurse=False))]


class StreamedModel:
    """A causal LM whose decoder layers live on the meta device until :meth:`materialize` is called.

    ``model``: the transformers model (non-layer modules real, in ``source_dtype``).
    ``folder``: the source shards (:class:`effqat_plugin.converters.checkpoint.SafetensorsFolder`).
    """

    def __init__(self, model_dir: str, dtype: Optional[torch.dtype] = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .converters.checkpoint import SafetensorsFolder

        self.model_dir = str(model_dir)
        self.folder = SafetensorsFolder(model_dir)  # missing folder / shard, pickled-only weights
        self.source_dtype = _source_dtype(self.folder.dtypes.values())
        self.dtype = dtype or self.source_dtype
        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        moe = moe_modules(self.model)
        if moe:
            raise NotStreamable(f"mixture-of-experts modules such as {moe[0]}")
        map_large_buffers_directly()  # only for streamed runs (the in-memory fallback keeps glibc's default)
        self.layout = None
        self._resident: set = set()
        self.max_resident = 0
        self._check_tensors()

    # -- validation ------------------------------------------------------------------------------
    def _tied_keys(self) -> set:
        from .layout import tied_output_keys

        return tied_output_keys(self.model)

    def _check_tensors(self) -> None:
        folder, tied = self.folder, self._tied_keys()
        for key, value in self.model.state_dict().items():
            where = folder.key_to_file.get(key)
            if where is None:
                if key in tied:
                    continue
                raise ValueError(f"{self.model_dir}: tensor {key} (required by config.json) is in no "
                                 "safetensors shard; incomplete or mismatched checkpoint")
            got = tuple(folder.shapes[key])
            if got != tuple(value.shape):
                raise ValueError(f"{folder.path / where}: tensor {key} has shape {list(got)} but config.json "
                                 f"implies {list(value.shape)}; the weights do not belong to this config")

    # -- loading ---------------------------------------------------------------------------------
    def attach_layout(self, layout) -> None:
        """Load everything outside the decoder layers; from now on layers come and go one by one."""
        self.layout = layout
        prefix = layout.layers_prefix + "."
        tied = self._tied_keys()
        for key, value in self.model.state_dict().items():
            if key.startswith(prefix) or key in tied and key not in self.folder.key_to_file:
                continue
            self._load(self.model, key, key, value.dtype)
        if tied:
            self.model.tie_weights()
        self.folder.close()

    def _load(self, module: nn.Module, name: str, key: str, dtype: torch.dtype) -> None:
        tensor = self.folder.get(key)
        _set(module, name, "cpu", value=tensor, dtype=dtype if tensor.is_floating_point() else None)

    def materialize(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from the shards (source dtype, host memory)."""
        layer = self.layout.layers[index]
        if index not in self._resident:
            prefix = self.layout.layer_name(index) + "."
            for name, value in layer.state_dict().items():
                self._load(layer, name, prefix + name, value.dtype)
            self.folder.close()
            self._resident.add(index)
            self.max_resident = max(self.max_resident, len(self._resident))
        return layer

    def release(self, index: int) -> None:
        """Put decoder layer ``index`` back on the meta device (its memory is freed)."""
        layer = self.layout.layers[index]
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
