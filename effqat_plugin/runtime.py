"""Device, precision and memory bookkeeping shared by Block-AP and E2E-QP."""
from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = plain fp32 compute
    stream_dtype: torch.dtype  # dtype of the activation streams kept between layers

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory since the last reset on CUDA, peak process RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_runtime(device: Optional[str] = None, amp: Optional[str] = None) -> Runtime:
    """CPU: fp32 everywhere. CUDA: fp32 master weights with bf16 autocast (fp16 where bf16 is missing)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
    names = {"fp32": None, "float32": None, "none": None, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if amp is not None:
        if amp.lower() not in names:
            raise ValueError(f"amp dtype {amp!r}: use one of fp32, bf16, fp16")
        amp_dtype = names[amp.lower()]
    elif dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = None
    stream_dtype = amp_dtype or torch.float32
    return Runtime(device=dev, amp_dtype=amp_dtype, stream_dtype=stream_dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
