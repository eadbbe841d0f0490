"""What Block-AP reports about one decoder layer: its losses, time, memory, rates and lr search.

Its own module because two others hold it: ``block_ap`` makes one per layer and ``resume`` stores and
reloads it with the layer's file (neither imports the other for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LayerReport:
    index: int
    train_loss: float
    val_loss: Optional[float]
    best_epoch: int
    seconds: float
    peak_memory_mb: float
    steps: int
    experts: int = 0  # MoE experts with quantized linears in this layer
    experts_without_tokens: int = 0  # of those, how many no training token was routed to (left at min/max init)
    quant_lr: float = 0.0  # the rates this layer was trained with (0.0 in work folders of older versions)
    weight_lr: float = 0.0
    lr_scale: float = 0.0  # their raise over the paper's rates when the lr search chose them, else 0.0
    # where the lr search ran on this layer: each candidate's scale, rates and held-out loss (the lowest
    # loss won and holds for the following layers)
    lr_search: List[dict] = field(default_factory=list)
