"""Writing a quantized folder from tensors produced one at a time, with nothing buffered in RAM.

``save_quantized`` takes every module in memory; a model bigger than host RAM cannot do that.
:func:`save_quantized_stream` takes the modules' shapes up front (enough to decide the folder's bits,
group size and per-module overrides, exactly as ``save_quantized`` decides them) and then drains a
generator of ``(name, QuantizedWeight | Tensor)``. :class:`SpoolingShardWriter` appends each tensor's
bytes to a spool file as it arrives and writes the shard (header, then the spooled bytes) when it is
full, so the folder is byte-for-byte what :class:`ShardWriter` writes for the same sequence while
host memory holds one tensor at a time.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .checkpoint import ST_NAMES, DerivedTensor, ShardWriter, safetensors_header
from .convert import save_modules
from .format_base import ModuleSpec


class SpoolingShardWriter(ShardWriter):
    """:class:`ShardWriter`'s shards and bytes, without holding a shard's tensors in memory."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict | None = None, source=None):
        super().__init__(folder, max_bytes, metadata, source)
        self.entries: list[tuple[str, torch.dtype, list, int]] = []
        self._spool = None
        self._spool_path = None

    def add(self, name: str, t: torch.Tensor):
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        if t.dtype not in ST_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        self.names.add(name)
        if isinstance(t, DerivedTensor):
            t = t.materialize()
        t = t.detach().cpu().contiguous()
        nb = t.numel() * t.element_size()
        if self.entries and self.buf_bytes + nb > self.max_bytes:
            self.flush()
        if self._spool is None:
            self._spool_path = self.folder / f".spool-{len(self.parts):05d}"
            self._spool = open(self._spool_path, "wb")
        if nb:
            self._spool.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.entries.append((name, t.dtype, list(t.shape), nb))
        self.buf_bytes += nb
        self.total += nb

    def flush(self):
        if not self.entries:
            return
        self._spool.close()
        tmp_name = f"part-{len(self.parts):05d}.safetensors"
        with open(self.folder / tmp_name, "wb") as f, open(self._spool_path, "rb") as spool:
            f.write(safetensors_header(self.entries, self.metadata))   # write_safetensors' header
            shutil.copyfileobj(spool, f, 16 << 20)
        os.remove(self._spool_path)
        self.parts.append((tmp_name, [e[0] for e in self.entries]))
        self.entries, self._spool, self._spool_path = [], None, None
        self.buf_bytes = 0


def spec_from_shapes(name: str, bits: int, group_size: int, weight_shape, zeros_shape, has_bias: bool) -> ModuleSpec:
    """The :class:`ModuleSpec` of a module known only by its ``[out, in]`` and ``[out, groups]`` shapes."""
    out_f, in_f = (int(d) for d in weight_shape)
    return ModuleSpec(name=name, in_features=in_f, out_features=out_f, n_groups=int(zeros_shape[1]),
                      bits=int(bits), group_size=int(group_size), has_bias=bool(has_bias))


def save_quantized_stream(dst, *, fmt: str, specs: Mapping[str, ModuleSpec], items: Iterable,
                          config_dir_or_files, meta: dict | None = None, overwrite: bool = False,
                          max_shard_size: str = "4GB", sym: bool = False) -> dict:
    """``save_quantized`` for modules that arrive one by one from ``items``; same folder, same bytes.

    ``specs`` must name every quantized module ``items`` yields (and nothing else), in any order;
    ``items`` yields the other tensors and the modules in the order they go to the shards.
    """
    if not specs:
        raise ValueError("save_quantized_stream: no quantized modules given")
    return save_modules(dst, fmt, specs, items, config_dir_or_files, meta, overwrite, max_shard_size,
                        shard_writer=SpoolingShardWriter, sym=sym)
