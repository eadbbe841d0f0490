"""Learning-rate rules of Block-AP and E2E-QP (kept free of GPTQModel imports: the E2E-QP CLI and its
distributed workers use them too). Rationale in ``config.py``'s module docstring."""
from __future__ import annotations

from typing import Optional, Tuple

PAPER_BLOCK_TOKENS = 4096 * 2048 * 2  # samples x tokens x epochs, per block
PAPER_E2E_TOKENS = 4096 * 4096 * 1


def paper_block_lrs(bits: int) -> Tuple[float, float]:
    """(quant-param lr for s/z, weight lr for linear weights and norms) from the paper."""
    return 1e-4, (2e-5 if bits == 2 else 1e-5)


def paper_e2e_lr(bits: int) -> float:
    return 2e-5 if bits == 2 else 1e-5


def lr_scale(tokens: int, reference_tokens: int, max_scale: float) -> float:
    """How much to raise a paper learning rate when a run sees fewer tokens than the paper's."""
    if tokens <= 0:
        return 1.0
    return float(min(max_scale, max(1.0, reference_tokens / tokens)))


def step_size_factor(bits: int) -> float:
    """Step sizes shrink by 2^b - 1 per bit width; 1x at 2 bits, where the paper tuned its rates."""
    return 3.0 / ((1 << bits) - 1)


def block_lrs(bits: int, preset: str, max_scale: float, train_tokens: int,
              quant_lr: Optional[float] = None, weight_lr: Optional[float] = None) -> Tuple[float, float]:
    q, w = paper_block_lrs(bits)
    if preset == "auto":
        k = lr_scale(train_tokens, PAPER_BLOCK_TOKENS, max_scale)
        q, w = q * k * step_size_factor(bits), w * k
    return quant_lr or q, weight_lr or w


def e2e_lr(bits: int, preset: str, max_scale: float, train_tokens: int, lr: Optional[float] = None) -> float:
    base = paper_e2e_lr(bits)
    if preset == "auto":
        base *= lr_scale(train_tokens, PAPER_E2E_TOKENS, max_scale) * step_size_factor(bits)
    return lr or base
