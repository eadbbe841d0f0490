"""Decoder layers' ``forward`` briefly replaced, so that the model's own forward drives a pass.

Two passes need the model's own loop over its decoder layers without running those layers: capturing
the arguments each layer is called with (``block_ap.capture_layer_calls``) and computing the fp
model's logits from Block-AP's fp stream (``teacher.capture_teacher``). Both swap every layer's
instance ``forward`` and must put back exactly what was there: an instance attribute set by a hook
(accelerate's offload hooks do this) is restored, and a class ``forward`` stays reachable by deleting
the instance attribute again.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch.nn as nn


@contextlib.contextmanager
def replaced_forwards(layers: Sequence[nn.Module], make_forward: Callable[[int], Callable]):
    """For the ``with`` block, ``layers[i].forward`` is ``make_forward(i)``; afterwards each layer's
    own instance ``forward`` again (or none)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = make_forward(i)
        yield
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old
