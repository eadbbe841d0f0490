"""Perplexity of fp and quantized models on token data (the quality number every table reports)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .runtime import Runtime


@torch.no_grad()
def causal_lm_loss(model: nn.Module, ids: torch.Tensor, batch_size: int, runtime: Runtime) -> float:
    """Mean next-token NLL over all predicted tokens of ``ids`` (exp of it is the perplexity)."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        batch = ids[i:i + batch_size].to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=batch, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int, runtime: Runtime) -> float:
    return math.exp(causal_lm_loss(model, ids, batch_size, runtime))
