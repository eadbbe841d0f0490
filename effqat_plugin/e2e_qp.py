"""E2E-QP: with W_int and z frozen in packed low-bit form, train only the step sizes end to end.

The model's quantized linears are `PackedQuantLinear` modules (our kernels), so memory scales with
bits; the causal-LM loss flows into their fp32 step sizes. Optimizer, schedule and clipping follow the
reference (AdamW without weight decay, warm-up then cosine, max grad norm 0.3).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import EQATConfig
from .evaluation import causal_lm_loss
from .runtime import Runtime

log = logging.getLogger("effqat.e2e_qp")


@dataclass
class E2EReport:
    steps: int
    lr: float
    train_loss: float
    val_loss_before: Optional[float]
    val_loss_after: Optional[float]
    seconds: float
    peak_memory_mb: float


def quantized_modules(model: nn.Module):
    from .kernels import PackedQuantLinear

    return [m for m in model.modules() if isinstance(m, PackedQuantLinear)]


def trainable_step_sizes(model: nn.Module, train_zeros: bool) -> List[nn.Parameter]:
    """Freeze everything but the step sizes (and zero points when asked) of the packed linears."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in quantized_modules(model):
        m.scales.requires_grad_(True)
        params.append(m.scales)
        if train_zeros:
            if not m.zeros.is_floating_point():
                raise ValueError("train_zeros needs PackedQuantLinear modules built with train_zeros=True")
            m.zeros.requires_grad_(True)
            params.append(m.zeros)
    if not params:
        raise ValueError("E2E-QP found no quantized linear layers in the model")
    return params


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class E2EQP:
    def __init__(self, model: nn.Module, cfg: EQATConfig, runtime: Runtime, show_progress: bool = True):
        self.model, self.cfg, self.rt, self.show_progress = model, cfg, runtime, show_progress

    def run(self, train_ids: torch.Tensor, val_ids: Optional[torch.Tensor]) -> E2EReport:
        cfg, rt, model = self.cfg, self.rt, self.model
        t0 = time.time()
        rt.reset_peak()
        params = trainable_step_sizes(model, cfg.e2e_train_zeros)
        bs = cfg.e2e_batch_size
        steps = cfg.e2e_epochs * math.ceil(train_ids.shape[0] / bs)
        lr = cfg.e2e_learning_rate(steps)
        warmup = int(round(cfg.e2e_warmup_ratio * steps))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler() else None
        was_training = model.training
        model.train()
        val_before = causal_lm_loss(model, val_ids, bs, rt) if val_ids is not None else None
        log.info("E2E-QP: %d steps, lr %.3g, %d trainable step-size tensors (%d values)%s", steps, lr,
                 len(params), sum(p.numel() for p in params),
                 "" if val_before is None else f", val loss before {val_before:.4f}")
        step, running = 0, float("nan")
        bar = tqdm(total=steps, desc="E2E-QP", disable=not self.show_progress)
        for _epoch in range(cfg.e2e_epochs):
            for i in range(0, train_ids.shape[0], bs):
                for group in opt.param_groups:
                    group["lr"] = lr * warmup_cosine(step, steps, warmup)
                batch = train_ids[i:i + bs].to(rt.device)
                with rt.autocast():
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"E2E-QP: loss became {loss.item()} at step {step}; lower --e2e-lr")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.e2e_max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.e2e_max_grad_norm)
                    opt.step()
                with torch.no_grad():  # keep step sizes in the quantizer's legal range
                    for m in quantized_modules(model):
                        m.scales.clamp_(min=1e-4, max=1e4)
                running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}")
        bar.close()
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
        val_after = causal_lm_loss(model, val_ids, bs, rt) if val_ids is not None else None
        report = E2EReport(steps=step, lr=lr, train_loss=running, val_loss_before=val_before,
                           val_loss_after=val_after, seconds=time.time() - t0, peak_memory_mb=rt.peak_memory_mb())
        if val_before is not None:
            log.info("E2E-QP: val loss %.4f -> %.4f (ppl %.2f -> %.2f), %.1fs", val_before, val_after,
                     math.exp(val_before), math.exp(val_after), report.seconds)
        return report
