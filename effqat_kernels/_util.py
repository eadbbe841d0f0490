"""Output allocation shared by the Triton and CUDA backends.

With ``POISON`` on (tests set it, or env ``EFFQAT_KERNEL_POISON=1``) every buffer a kernel is
supposed to overwrite is filled with NaN first, so a kernel that skips elements cannot pass.
"""
from __future__ import annotations

import os

import torch

POISON = os.environ.get("EFFQAT_KERNEL_POISON", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
