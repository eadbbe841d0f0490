"""Batches of a host-side activation stream on the compute device, each copy overlapped with compute.

Block-AP's streams live in host memory (or memory-mapped files) and go to the device one batch at a
time. On CUDA a plain ``.to(device)`` from pageable memory is synchronous, so the GPU idles during
every copy. Here batches are staged in two pinned buffers and copied with ``non_blocking=True`` on a
side CUDA stream: while the caller computes on batch k, batch k+1 is already on its way. On CPU (the
twin every test runs) the same batches come from plain slicing; the values are identical either way.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn


@contextlib.contextmanager
def modules_on(modules: Iterable[nn.Module], device, dtype: Optional[torch.dtype] = None):
    """For the ``with`` block, each of ``modules``' own parameters and buffers (not their children's)
    on ``device``, the floating ones in ``dtype`` when given; afterwards the very tensors they held
    before. Block-AP's capture passes run the modules outside the decoder layers this way."""
    saved = []
    for module in modules:
        for p in module.parameters(recurse=False):
            saved.append((p, None, p.data))
            p.data = p.data.to(device=device, dtype=dtype if dtype is not None and p.is_floating_point() else None)
        for name, b in list(module.named_buffers(recurse=False)):
            saved.append((module, name, b))
            module._buffers[name] = b.to(device=device,
                                         dtype=dtype if dtype is not None and b.is_floating_point() else None)
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):   # a tied tensor is saved twice: the first holds the original
            if name is None:
                owner.data = old
            else:
                owner._buffers[name] = old


def batches_to_device(stream: torch.Tensor, batch_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, start: int = 0,
                      stop: Optional[int] = None) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(i, j, stream[i:j] on device in dtype)`` for consecutive batches in ``[start, stop)``."""
    stop = stream.shape[0] if stop is None else stop
    spans = [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
    device = torch.device(device)
    if device.type != "cuda" or not spans:
        for i, j in spans:
            yield i, j, stream[i:j].to(device, dtype)
        return
    yield from _cuda_prefetch(stream, spans, batch_size, device, dtype)


def _cuda_prefetch(stream, spans, batch_size, device, dtype):
    copy_stream = torch.cuda.Stream(device)
    shape = (batch_size,) + tuple(stream.shape[1:])
    pinned = [torch.empty(shape, dtype=stream.dtype, pin_memory=True) for _ in range(2)]
    done = [None, None]  # copy-finished event of each staging buffer

    def issue(k: int):
        slot = k % 2
        if done[slot] is not None:
            done[slot].synchronize()  # the buffer's previous copy must be finished before refilling it
        i, j = spans[k]
        buf = pinned[slot][: j - i]
        buf.copy_(stream[i:j])
        with torch.cuda.stream(copy_stream):
            on_device = buf.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(copy_stream)
        done[slot] = event
        return on_device, event

    pending = issue(0)
    compute = torch.cuda.current_stream(device)
    for k, (i, j) in enumerate(spans):
        on_device, event = pending
        compute.wait_event(event)
        on_device.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        if k + 1 < len(spans):
            pending = issue(k + 1)  # the next copy runs while the caller computes on this batch
        yield i, j, on_device.to(dtype)
