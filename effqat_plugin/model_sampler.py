"""Sequences a model folder's fp model writes itself, drawn wherever the model fits.

The default recipe trains both phases on text the fp model writes (``--self-generated``); that needs
the whole model, which the streamed run never holds. Rather than giving up when an fp32 copy does not
fit in host memory (the old rule, which silently dropped the samples for nearly every real model),
the model is placed for sampling only (:func:`plan_placement`):

* on the compute device, whole, when its weights in the sampling dtype plus the KV cache fit in the
  memory allowed there (on CPU: half the free host memory; on CUDA: 90% of the free device memory);
* else through accelerate's big-model offload (``device_map`` from ``infer_auto_device_map`` with
  ``max_memory``, the rest on the host and then on disk in a temporary folder): the layers that do
  not fit are brought to the compute device in turn at every decoding step. Slow, but every model
  can be sampled.

The sampling dtype (:func:`sample_dtype`): ``auto`` is the checkpoint's own 16-bit dtype on CUDA, and
fp32 on CPU, where the run computes in fp32 too and half-precision matmuls are slow; any other can be
asked for (``--self-generated-dtype``) so quality can be compared. The tokens themselves come from
``data.sample_from_model`` with a CPU generator, so they depend on the seed and the probabilities
only: the offloaded model computes the same operations on the same device and gives the same tokens
as the model held whole (checked in the tests at fp32 on CPU).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .data import sample_from_model
from .memory_plan import SAMPLE_BATCH, decode_cache_bytes

log = logging.getLogger("effqat")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
CUDA_FREE_SHARE = 0.9  # of the device's free memory, the rest left to the allocator and kernels
HOST_FREE_SHARE = 0.5  # of the free host memory (the old rule's share)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sample_dtype(choice: str, source_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's own dtype on CUDA (fp32 only for an fp32 checkpoint), fp32 on CPU."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ValueError(f"sampling dtype {choice!r}: use one of {', '.join(DTYPE_CHOICES)}")
        return DTYPES[choice]
    if device.type == "cpu":
        return torch.float32
    return source_dtype if source_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def free_host_bytes() -> int:
    if not hasattr(os, "sysconf"):
        return 0
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return free_host_bytes()


def text_config(config):
    """The decoder's part of a transformers config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_size_of(model_dir: str) -> int:
    """The vocabulary size in ``model_dir``'s config.json (no weights read)."""
    from transformers import AutoConfig

    return int(text_config(AutoConfig.from_pretrained(model_dir)).vocab_size)


def kv_cache_bytes(config, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """``memory_plan.decode_cache_bytes`` for a transformers ``config`` decoding in ``dtype``."""
    text = text_config(config)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    return decode_cache_bytes(batch, seq_len, int(getattr(text, "num_hidden_layers", 0) or 0),
                              int(getattr(text, "num_key_value_heads", None) or heads),
                              int(getattr(text, "head_dim", None) or (int(getattr(text, "hidden_size", 0)) // heads)),
                              int(getattr(text, "vocab_size", 0) or 0), torch.empty((), dtype=dtype).element_size())


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class SamplingMemoryError(ValueError):
    """Too little memory on the compute device even for accelerate's offload (one line for the user)."""


@dataclass
class Placement:
    """Where the sampling model goes: ``device``, ``dtype``, whole or offloaded (``offload``), and why."""
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int
    budget: int  # bytes of weights allowed on the compute device
    offload: bool
    host_budget: int = 0  # CUDA with offload: weights kept in host memory before going to disk

    def describe(self) -> str:
        where = (f"offloaded with accelerate ({_size(self.budget)} of {_size(self.weight_bytes)} of weights on "
                 f"{self.device.type}, the rest on host/disk)" if self.offload
                 else f"whole on {self.device.type} ({_size(self.weight_bytes)})")
        return f"{dtype_name(self.dtype)}, {where}"

    def record(self) -> dict:
        return {"device": self.device.type, "dtype": dtype_name(self.dtype),
                "placement": "offload" if self.offload else "whole",
                "weights_gb": round(self.weight_bytes / 1e9, 3)}


def weight_bytes(model_dir: str, dtype: torch.dtype) -> int:
    """The checkpoint's tensors in ``dtype`` (from the safetensors headers; nothing is read)."""
    from .converters.checkpoint import SafetensorsFolder

    folder = SafetensorsFolder(model_dir)
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(elem * math.prod(shape) for shape in folder.shapes.values())


def source_dtype_of(model_dir: str) -> torch.dtype:
    from .converters.checkpoint import SafetensorsFolder
    from .streaming import _source_dtype

    return _source_dtype(SafetensorsFolder(model_dir).dtypes.values())


def plan_placement(model_dir: str, n: int, seq_len: int, device: torch.device, dtype_choice: str = "auto",
                   max_memory: Optional[int] = None) -> Placement:
    """Whole on ``device`` when the weights and the KV cache fit in ``max_memory`` bytes (default: the
    share of the free memory above), else offloaded, with what is left after the KV cache for weights."""
    from transformers import AutoConfig

    dtype = sample_dtype(dtype_choice, source_dtype_of(model_dir), device)
    weights = weight_bytes(model_dir, dtype)
    kv = kv_cache_bytes(AutoConfig.from_pretrained(model_dir), min(n, SAMPLE_BATCH), seq_len, dtype)
    share = CUDA_FREE_SHARE if device.type == "cuda" else HOST_FREE_SHARE
    allowed = int(max_memory) if max_memory is not None else int(share * free_device_bytes(device))
    budget = max(0, allowed - kv)
    host = int(HOST_FREE_SHARE * free_host_bytes()) if device.type == "cuda" else 0
    return Placement(device=device, dtype=dtype, weight_bytes=weights, budget=min(budget, weights),
                     offload=weights > budget, host_budget=host)


def offload_device_map(model_dir: str, placement: Placement) -> dict:
    """accelerate's device map for ``placement``: decoder layers whole on the compute device while
    ``placement.budget`` lasts, then in host memory (CUDA), then on disk."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=placement.dtype)
    key = (placement.device.index or 0) if placement.device.type == "cuda" else "cpu"
    max_memory = {key: placement.budget}
    if placement.device.type == "cuda":
        max_memory["cpu"] = placement.host_budget
    device_map = infer_auto_device_map(meta, max_memory=max_memory, dtype=placement.dtype,
                                       no_split_module_classes=getattr(meta, "_no_split_modules", None) or [])
    if all(d == "disk" for d in device_map.values()):
        raise SamplingMemoryError(f"too little memory to sample from {model_dir} even with offload: "
                         f"{placement.budget / 1e6:.1f} MB allowed on {placement.device.type}, "
                         "not enough for its largest module; allow more (--max-memory) or sample elsewhere")
    return device_map


@contextmanager
def loaded_for_sampling(model_dir: str, placement: Placement, offload_root: Optional[str] = None):
    """The model of ``model_dir`` as ``placement`` says, in eval mode; its offload folder (a temporary
    folder under ``offload_root``, default the system's) is removed afterwards."""
    from transformers import AutoModelForCausalLM

    tmp = None
    try:
        if placement.offload:
            device_map = offload_device_map(model_dir, placement)
            tmp = tempfile.mkdtemp(prefix="effqat-sample-offload-", dir=offload_root)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype, device_map=device_map,
                                                         offload_folder=tmp)
        elif placement.device.type == "cpu":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype)
        else:  # straight onto the device: no whole host copy on the way
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype,
                                                         device_map={"": str(placement.device)})
        yield model.eval()
    finally:
        model = None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if placement.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()  # Block-AP gets the device back


def bos_of(config) -> int:
    bos = getattr(config, "bos_token_id", None)
    return 1 if bos is None else int(bos)


def draw(model_dir: str, n: int, seq_len: int, seed: int, placement: Placement, loaded=None,
         offload_root: Optional[str] = None):
    """``(ids [n, seq_len], record)``: ``n`` sequences from BOS at temperature 1 with ``seed``;
    ``loaded``: a model already in memory in the placement's dtype and device (the in-memory run's),
    used as it is instead of loading another copy. ``record`` (dtype, placement, seconds) goes to
    meta.eqat."""
    t0 = time.time()
    if loaded is not None:  # already whole in memory, whatever the budget says
        placement = replace(placement, offload=False, budget=placement.weight_bytes)
    log.info("sampling %d x %d tokens from the fp model (seed %d): %s", n, seq_len, seed, placement.describe())
    held = nullcontext(loaded) if loaded is not None else loaded_for_sampling(model_dir, placement, offload_root)
    with held as model:
        ids = sample_from_model(model, n, seq_len, seed=seed, bos_token_id=bos_of(model.config))
    seconds = time.time() - t0
    record = {**placement.record(), "seed": seed, "seconds": round(seconds, 2),
              "seconds_per_1k_tokens": round(1000 * seconds / max(1, n * seq_len), 3)}
    return ids, record


def matches(model, placement: Placement) -> bool:
    """Whether an in-memory ``model`` (the in-memory run's) has the dtype and device ``placement``
    samples in, so it can be sampled as it is instead of loading another copy (even when a fresh copy
    would not fit: this one is there already)."""
    p = next(model.parameters())
    return p.dtype == placement.dtype and p.device.type == placement.device.type
