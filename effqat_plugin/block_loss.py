"""Block-AP's reconstruction loss between a layer's quantized output and its fp output.

``mse`` (default) is the paper's: the mean squared error over all tokens and channels. On models whose
residual stream grows with depth and carries a few huge ("massive") dimensions (Gemma-like), that
mean is dominated by those dimensions and by the deep layers' scale; the normalized losses weight
every channel (``channel_rms``) or every token (``token_relative``) alike:

* ``channel_rms``: MSE with each output channel divided by the fp output's RMS of that channel over
  the layer's *training* calibration tokens (fitted once per layer, before training, so the held-out
  rows stay out of it and every candidate rate of the lr search is scored with the same weights);
* ``token_relative``: each token's squared error divided by the squared norm of its fp output,
  averaged over tokens.

The same loss trains the layer and scores it on the held-out rows (epoch selection, lr search), so
within a layer all held-out losses are comparable; across layers and across loss kinds they are not
(normalized losses are scale-free ratios, MSE is in the stream's units), so compare runs of different
``block_loss`` by perplexity, not by the per-layer numbers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BLOCK_LOSSES = ("mse", "channel_rms", "token_relative")
_EPS = 1e-12


class BlockLoss:
    """``loss(y, target)`` of kind ``kind``; ``channel_rms`` needs ``fit`` on the layer's fp outputs first."""

    def __init__(self, kind: str = "mse"):
        if kind not in BLOCK_LOSSES:
            raise ValueError(f"block_loss={kind!r}; use one of {BLOCK_LOSSES}")
        self.kind = kind
        self.inv_rms: Optional[torch.Tensor] = None  # [hidden], channel_rms only

    @torch.no_grad()
    def fit(self, fp_out: torch.Tensor, n_train: int, batch_size: int) -> "BlockLoss":
        """Per-channel RMS of the fp output over the first ``n_train`` rows (the training split),
        accumulated in float64 batch by batch (the stream may be memory-mapped)."""
        if self.kind != "channel_rms":
            return self
        total = torch.zeros(fp_out.shape[-1], dtype=torch.float64)
        count = 0
        for i in range(0, n_train, batch_size):
            x = fp_out[i:min(i + batch_size, n_train)].to(torch.float64)
            total += x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            count += x.numel() // x.shape[-1]
        rms = (total / max(count, 1)).sqrt()
        # a (nearly) dead channel gets a weight of at most 1000 / the median channel's RMS, not an
        # infinite one (the median, unlike the mean, is not moved by a few massive channels)
        floor = max(float(rms.median()) * 1e-3, _EPS)
        self.inv_rms = (1.0 / rms.clamp_min(floor)).to(torch.float32)
        return self

    def __call__(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return F.mse_loss(y, target)
        if self.kind == "channel_rms":
            w = self.inv_rms.to(y.device)
            return F.mse_loss(y * w, target * w)
        err = (y - target).pow(2).sum(-1)
        return (err / target.pow(2).sum(-1).clamp_min(_EPS)).mean()
