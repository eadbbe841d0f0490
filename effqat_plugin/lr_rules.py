"""Learning-rate rules of Block-AP and E2E-QP (kept free of GPTQModel imports: the E2E-QP CLI and its
distributed workers use them too). Rationale in ``config.py``'s module docstring.

``auto`` at (or above) the paper's token budget returns the reference scripts' rates exactly, at
every bit width: Block-AP s/z 1e-4, weights and norms 2e-5 (w2) / 1e-5 (w3, w4); E2E-QP 2e-5 (w2) /
1e-5 (w3, w4). Below that budget each rate is raised by ``k = min(max_scale, paper_tokens /
run_tokens)``; for the step-size rates (Block-AP s/z and E2E-QP) only the *extra* part ``k - 1`` is
shrunk by ``3 / (2^b - 1)`` (step sizes are ``2^b - 1`` times smaller at b bits than at 2 bits,
while Adam moves a parameter by about ``lr`` per step), so the factor is 1 at the paper's budget.
"""
from __future__ import annotations

from typing import Optional, Tuple

PAPER_BLOCK_TOKENS = 4096 * 2048 * 2  # samples x tokens x epochs, per block
PAPER_E2E_TOKENS = 4096 * 4096 * 1
PAPER_E2E_STEPS = 4096 // 32  # samples / global batch: optimizer steps of the paper's one epoch


def paper_block_lrs(bits: int) -> Tuple[float, float]:
    """(quant-param lr for s/z, weight lr for linear weights and norms) of the reference scripts
    (1e-4 for s/z at every bit width)."""
    return 1e-4, (2e-5 if bits == 2 else 1e-5)


def paper_e2e_lr(bits: int) -> float:
    return 2e-5 if bits == 2 else 1e-5


def lr_scale(tokens: int, reference_tokens: int, max_scale: float) -> float:
    """How much to raise a paper learning rate when a run sees fewer tokens than the paper's."""
    if tokens <= 0:
        return 1.0
    return float(min(max_scale, max(1.0, reference_tokens / tokens)))


def step_size_factor(bits: int) -> float:
    """Step sizes shrink by 2^b - 1 per bit width; 1x at 2 bits."""
    return 3.0 / ((1 << bits) - 1)


def grid_rate_factor(run_bits: int, grid_intervals: int) -> float:
    """E2E-QP's step-size rate for a llama.cpp grid with ``grid_intervals`` = q_hi - q_lo steps across
    its range, relative to the run's rate (set for a uniform grid of ``run_bits``, 2^b - 1 steps): its
    steps are that much smaller (the same reasoning as :func:`step_size_factor`). 1 on the preset's
    own type (Q2_K's 3 in a Q2_K run); 3/15 on a Q4_0 fallback of a Q2_K run. Measured on SmolLM2-135M
    at Q3_K_M (one E2E-QP epoch of 14 steps, README): with the run's rate on every grid the KJV
    perplexity was 19.1, with this factor 10.2 (and wikitext-2 22.6 -> 19.6)."""
    return ((1 << run_bits) - 1) / grid_intervals


def step_size_scale(k: float, bits: int) -> float:
    """The raise ``k`` applied to a step-size rate: ``1 + (k - 1) * 3 / (2^b - 1)``; exactly 1 when
    ``k`` is 1 (paper budget), ``k`` at 2 bits."""
    return 1.0 + (k - 1.0) * step_size_factor(bits)


def block_lrs(bits: int, preset: str, max_scale: float, train_tokens: int,
              quant_lr: Optional[float] = None, weight_lr: Optional[float] = None,
              scale: Optional[float] = None) -> Tuple[float, float]:
    """(s/z lr, weights/norms lr). ``scale`` overrides the token-budget raise ``k`` (auto preset only)."""
    q, w = paper_block_lrs(bits)
    if preset == "auto":
        k = lr_scale(train_tokens, PAPER_BLOCK_TOKENS, max_scale) if scale is None else float(scale)
        q, w = q * step_size_scale(k, bits), w * k
    return (q if quant_lr is None else quant_lr), (w if weight_lr is None else weight_lr)   # 0 = frozen


def e2e_lr(bits: int, preset: str, max_scale: float, train_tokens: int, lr: Optional[float] = None,
           fraction: float = 1.0) -> float:
    """E2E-QP's rate; ``fraction`` (auto preset) scales the token-budget raise ``k`` (never below 1):
    the share of Block-AP's raise its lr search ended on (``BlockAPResult.lr_fraction``). Both phases
    move the same step sizes on the same calibration data, so a model that wants a smaller raise in
    Block-AP gets the same share in E2E-QP; a share above 1 (the search went past the full raise)
    still stops at ``max_scale``."""
    base = paper_e2e_lr(bits)
    if preset == "auto":
        k = min(max_scale, max(1.0, lr_scale(train_tokens, PAPER_E2E_TOKENS, max_scale) * fraction))
        base *= step_size_scale(k, bits)
    return lr or base



def e2e_epochs(epochs: int, steps_per_epoch: int, preset: str, max_epochs: int) -> int:
    """E2E-QP's passes over its data: ``epochs``, or under ``auto`` with fewer optimizer steps than
    the paper's 128, as many passes as reach them, at most ``max_epochs`` (never fewer than asked).

    A raised lr does not make up for steps. SmolLM2-135M w2g64, 120 samples (30 steps per epoch, lr
    raised 128x), one cosine schedule over 1 / 2 / 3 epochs: held-out loss 3.06 / 2.81 / 2.81 (the
    3-epoch run passed 2.72 after its second epoch), wikitext-2 test perplexity 51.5 / 46.9 / 53.6,
    KJV 120 / 109 / 133. Hence at most 2 by default, and the trainer keeps the added epoch only if its
    held-out loss is lower (``E2EReport.best_epoch``). A fixed cap of 2 stopped a 270M model whose
    held-out loss still fell 2% in its second epoch (3.97 -> 3.89), so ``max_epochs`` is now a plan
    (default 4: at 30 steps per epoch, 120 steps, about the paper's 128) and the trainer stops
    earlier once an epoch no longer improves held-out loss by ``E2E_MIN_GAIN`` (``e2e_continue``)."""
    if preset != "auto" or epochs <= 0 or steps_per_epoch <= 0 or epochs * steps_per_epoch >= PAPER_E2E_STEPS:
        return epochs
    return max(epochs, min(max_epochs, -(-PAPER_E2E_STEPS // steps_per_epoch)))


# An auto epoch must lower held-out loss by at least this share of the best so far to earn the next
# one: 1% of a ~3 nats loss is 0.03 nats, ~3% perplexity, about the spread the 8-row held-out split
# showed between SmolLM2's 2- and 3-epoch runs (2.81 / 2.81), so smaller gains are treated as noise.
E2E_MIN_GAIN = 0.01


def e2e_continue(best_before: float, loss: float, min_gain: float = E2E_MIN_GAIN) -> bool:
    """Whether E2E-QP trains another planned epoch: the epoch just finished lowered the held-out loss
    by more than ``min_gain`` (relative) below the best before it (the loss before training counts).

    The cosine schedule is planned over all epochs (``e2e_epochs``' maximum) and not restarted: a
    stop leaves the lr part-way down, which did not hurt where it was measured (SmolLM2 w2g64, a
    cosine over 3 epochs passed held-out 2.72 after its second, below the 2.81 a cosine over 2 ended
    on), while a restart would repeat warm-up and the high-lr phase from an already good point; the
    trainer keeps the best epoch's step sizes either way."""
    return loss < best_before * (1.0 - min_gain)
