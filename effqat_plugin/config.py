"""EQATConfig: the settings of one EfficientQAT run, as a GPTQModel quantize config.

It subclasses GPTQModel's own config dataclass so `GPTQModel.load(path, EQATConfig(...))` accepts it
unchanged. GPTQModel's METHOD enum is closed, so the method recorded for loaders is GPTQ (the output
*is* a GPTQ checkpoint); the EQAT identity and every setting lives in `quantize_config.json` `meta`.

Learning-rate defaults: the paper's rates (Block-AP 1e-4 for s/z at every bit width, 2e-5 (w2) /
1e-5 (w3/w4) for weights and norms; E2E-QP 2e-5 / 1e-5) assume the paper's data budget: 4096 x 2048
tokens x 2 epochs per block and 4096 x 4096 tokens for E2E-QP. ``lr_preset="auto"`` (default) gives
exactly these rates at (or above) that budget. With a smaller budget they barely move the parameters
(see the method note), so ``auto`` raises each rate by ``k = paper_tokens / run_tokens`` (at most
``max_lr_scale``, 128 by default); for the step-size rates (Block-AP s/z, E2E-QP) the raise is
``1 + (k - 1) * 3 / (2^b - 1)``, because step sizes shrink by ``2^b - 1`` per bit width while Adam
moves a parameter by about ``lr`` per step. The formulas live in ``lr_rules.py``.
Below the paper's budget the best raise depends on the model, the data, the bit width and the depth
(by held-out loss on SmolLM2-135M: w2g64 with 32 x 256 tokens 64x beats 128x from layer 4 on, with
64 x 256 tokens 128x holds throughout, w4g128 wants 32x; stories260k: 128x), so ``auto`` trains the
first layer with ``block_lr_search`` fractions of ``k`` (1/4, 1/2, 1 by default) and keeps the rates
with the lowest held-out loss, then at ``block_lr_recheck`` evenly spaced later layers tries the
current rates against half of them. Whenever the best of a search is its lowest (highest) scale, the
search goes on past that edge, halving (doubling) the scale, down to 1 (the paper's rates) and up to
``max_lr_scale`` (``BlockAP._extend_search``). Every trial is recorded in ``meta.eqat.block_ap.lr_search``;
E2E-QP uses the share of its own raise that Block-AP ended on (``BlockAPResult.lr_fraction``).
``lr_preset="paper"`` uses the paper's values unchanged; explicit ``*_lr`` arguments always win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from gptqmodel.quantization.config import FORMAT, METHOD, BaseQuantizeConfig

from . import lr_rules
from .block_loss import BLOCK_LOSSES
from .qweight import SUPPORTED_BITS

SAVE_FORMATS = ("gptq", "gptq_v2", "eqat", "bitblas", "compressed-tensors", "gguf")


@dataclass
class EQATConfig(BaseQuantizeConfig):
    """Settings of Block-AP and E2E-QP; also a valid GPTQModel quantize config (asymmetric GPTQ, or
    symmetric with ``sym=True``: every zero point fixed at ``2^(b-1)``, never trained)."""

    bits: int = field(default=2, metadata={"choices": list(SUPPORTED_BITS)})
    group_size: int = 64
    sym: bool = False
    desc_act: Optional[bool] = False
    method: METHOD = field(default=METHOD.GPTQ)
    format: FORMAT = field(default=FORMAT.GPTQ)
    offload_to_disk: bool = False

    # on-disk format written by save(): gptq (v1 zeros, GPTQModel convention) | gptq_v2 | eqat | bitblas |
    # compressed-tensors
    save_format: str = "gptq"

    # Block-AP
    block_epochs: int = 2
    block_batch_size: int = 2
    block_quant_lr: Optional[float] = None  # s and z
    block_weight_lr: Optional[float] = None  # linear weights and norm weights
    block_min_lr_ratio: float = 1 / 20
    block_val_samples: int = 16
    block_early_stop: int = 0  # patience in epochs; 0 = off. When on, the best state is restored.
    block_weight_decay: float = 0.0
    # auto preset below the paper budget: fractions of the token-budget raise k tried on layer 0
    # (the best held-out loss wins); () = always k. Then, at this many evenly spaced later layers,
    # the current rate is checked against half of it (0 = layer 0 only).
    block_lr_search: Tuple[float, ...] = (0.25, 0.5, 1.0)
    block_lr_recheck: int = 3
    # Block-AP's reconstruction loss (block_loss.py): "mse" (the paper's) | "channel_rms" (each output
    # channel divided by its fp RMS) | "token_relative" (each token's error relative to its fp norm)
    block_loss: str = "mse"

    # E2E-QP
    e2e_epochs: int = 1  # 0 disables E2E-QP
    # auto preset with fewer optimizer steps than the paper's 128: up to this many passes, continued
    # while held-out loss falls by > 1% an epoch, keeping the epoch with the lowest held-out loss
    # (lr_rules.e2e_epochs / e2e_continue; 1 = never repeat)
    e2e_max_auto_epochs: int = 4
    e2e_batch_size: int = 4
    e2e_lr: Optional[float] = None
    e2e_train_zeros: bool = False
    e2e_warmup_ratio: float = 0.03
    e2e_max_grad_norm: float = 0.3
    # share of E2E-QP's loss that is distillation from the fp model (its top-k next-token
    # distribution on the same rows, kept from Block-AP's fp stream: teacher.py) instead of the
    # corpus' next tokens: 0 = the paper's causal-LM loss only, 1 = distillation only; the held-out
    # loss that picks the epoch is the same mix
    e2e_distill: float = 0.0
    e2e_distill_topk: int = 64

    # Both phases
    # E2E-QP (and Block-AP, below) also train on this many sequences the fp model writes itself
    # (sampled before Block-AP, seed + 2, calibration length): in E2E-QP, on SmolLM2 with 64 x 256
    # wikitext tokens, they lowered w2g64 perplexity in domain (60.0 -> 51.5) and out of it (KJV 253 ->
    # 120). 0 = off (needs the model in memory). Called e2e_self_generated before Block-AP used them.
    self_generated: int = 0
    # Block-AP trains on those self-generated samples too (besides the calibration's training split):
    # SmolLM2 w2g64 49.1 -> 42.6 wikitext-2 test ppl, KJV 99.8 -> 70.2 (eqat_run.with_self_generated)
    block_self_generated: bool = True

    # GGUF (save_format "gguf", `effqat quantize ... --format gguf --gguf-type`): the llama.cpp preset
    # (``gguf_presets``), and the block type of every quantized linear it gives (resolved by the run,
    # full module names); those linears train on llama.cpp's grids (``gguf_weights``) instead of the
    # uniform one. gguf_imatrix: llama.cpp's initial fit is weighted by the layer's input statistics.
    gguf_type: Optional[str] = None
    gguf_module_types: Dict[str, str] = field(default_factory=dict)
    gguf_imatrix: bool = True

    # learning-rate defaults (see module docstring)
    lr_preset: str = "auto"  # "auto" | "paper"
    max_lr_scale: float = 128.0

    # runtime
    kernel_backend: Optional[str] = None  # reference | triton | cuda | auto; None = EFFQAT_KERNEL or auto
    seed: int = 0
    compute_device: Optional[str] = None  # None = cuda if available else cpu
    amp_dtype: Optional[str] = None  # None = bf16 on CUDA when supported, fp32 on CPU

    def allowed_quant_methods(self) -> Tuple[METHOD, ...]:
        return (METHOD.GPTQ,)

    def supported_export_formats(self) -> Tuple[FORMAT, ...]:
        return (FORMAT.GPTQ, FORMAT.GPTQ_V2)

    def default_desc_act(self) -> bool:
        return False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"EQATConfig: bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        g = self.group_size
        if not (g == -1 or (g >= 16 and g & (g - 1) == 0)):
            raise ValueError(
                f"EQATConfig: group_size={g} must be -1 (one group per output channel) or a power of "
                "two >= 16 such as 32, 64 or 128")
        if self.save_format not in SAVE_FORMATS:
            raise ValueError(f"EQATConfig: save_format={self.save_format!r}; use one of {SAVE_FORMATS}")
        if self.kernel_backend not in (None, "auto", "reference", "triton", "cuda"):
            raise ValueError(f"EQATConfig: kernel_backend={self.kernel_backend!r}; use reference, triton, cuda or auto")
        if self.lr_preset not in ("auto", "paper"):
            raise ValueError(f"EQATConfig: lr_preset={self.lr_preset!r}; use 'auto' or 'paper'")
        if any(not (0 < f <= 1) for f in self.block_lr_search):
            raise ValueError(f"EQATConfig: block_lr_search={self.block_lr_search}; use fractions in (0, 1] of the "
                             "auto raise, e.g. (0.25, 0.5, 1.0), or () to turn the search off")
        self.block_lr_search = tuple(float(f) for f in self.block_lr_search)
        if self.block_loss not in BLOCK_LOSSES:
            raise ValueError(f"EQATConfig: block_loss={self.block_loss!r}; use one of {', '.join(BLOCK_LOSSES)}")
        if self.e2e_max_auto_epochs < 1:
            raise ValueError("EQATConfig: e2e_max_auto_epochs must be >= 1")
        if self.self_generated < 0:
            raise ValueError("EQATConfig: self_generated must be >= 0")
        if not 0.0 <= self.e2e_distill <= 1.0 or self.e2e_distill_topk < 1:
            raise ValueError("EQATConfig: e2e_distill must lie in [0, 1] and e2e_distill_topk be >= 1")
        if self.block_lr_recheck < 0:
            raise ValueError("EQATConfig: block_lr_recheck must be >= 0")
        if self.block_epochs < 1 or self.block_batch_size < 1 or self.e2e_epochs < 0 or self.e2e_batch_size < 1:
            raise ValueError("EQATConfig: epochs must be >= 1 (Block-AP) / >= 0 (E2E-QP), batch sizes >= 1")
        if self.sym and self.e2e_train_zeros:
            raise ValueError("EQATConfig: sym=True fixes every zero point at 2^(b-1); e2e_train_zeros would move them")
        if (self.save_format == "gguf") != bool(self.gguf_type):
            raise ValueError("EQATConfig: save_format 'gguf' and gguf_type (a llama.cpp preset) go together")
        if self.desc_act:
            raise ValueError("EQATConfig: act-order (desc_act) does not apply to EfficientQAT")
        super().__post_init__()

    def block_lrs(self, train_tokens: int) -> Tuple[float, float]:
        """(s/z lr, weights/norms lr) for Block-AP; ``train_tokens`` = samples x seq_len x epochs."""
        return lr_rules.block_lrs(self.bits, self.lr_preset, self.max_lr_scale, train_tokens,
                                  self.block_quant_lr, self.block_weight_lr)

    def block_lr_candidates(self, train_tokens: int) -> List[Dict[str, float]]:
        """The Block-AP rates the lr search tries on the first layer; [] when there is nothing to
        choose: explicit rates, the paper preset, or a run at the paper's budget (k = 1, where ``auto``
        must equal the reference scripts exactly)."""
        if (self.lr_preset != "auto" or self.block_quant_lr is not None or self.block_weight_lr is not None
                or len(self.block_lr_search) < 2):
            return []
        k = lr_rules.lr_scale(train_tokens, lr_rules.PAPER_BLOCK_TOKENS, self.max_lr_scale)
        scales = sorted({max(1.0, k * f) for f in self.block_lr_search})
        if k <= 1.0 or len(scales) < 2:
            return []
        return [self.block_lr_trial(train_tokens, scale) for scale in scales]

    def block_lr_trial(self, train_tokens: int, scale: float) -> Dict[str, float]:
        """One candidate of the lr search: the auto rates at raise ``scale``."""
        q, w = lr_rules.block_lrs(self.bits, "auto", self.max_lr_scale, train_tokens, scale=scale)
        return {"scale": float(scale), "quant_lr": q, "weight_lr": w}

    def e2e_learning_rate(self, train_tokens: int, fraction: float = 1.0) -> float:
        """E2E-QP lr; ``train_tokens`` = samples x seq_len x epochs; ``fraction``: see ``lr_rules.e2e_lr``."""
        return lr_rules.e2e_lr(self.bits, self.lr_preset, self.max_lr_scale, train_tokens, self.e2e_lr, fraction)

    def trains_on_self_generated(self) -> bool:
        """Whether either phase would train on self-generated samples (else sampling them is wasted)."""
        return self.e2e_epochs > 0 or self.block_self_generated

    def eqat_settings(self) -> Dict[str, Any]:
        """The settings recorded in `quantize_config.json` meta.eqat."""
        names = [f for f in EQATConfig.__dataclass_fields__ if f.startswith(("block_", "e2e_"))]
        out = {n: getattr(self, n) for n in names}
        out.update(bits=self.bits, group_size=self.group_size, sym=bool(self.sym), self_generated=self.self_generated,
                   lr_preset=self.lr_preset,
                   max_lr_scale=self.max_lr_scale, seed=self.seed, save_format=self.save_format)
        if self.gguf_type:   # (uniform runs keep the settings, and resume fingerprints, they had)
            out.update(gguf_type=self.gguf_type, gguf_imatrix=bool(self.gguf_imatrix),
                       gguf_module_types=dict(sorted(self.gguf_module_types.items())))
        return out


__all__ = ["EQATConfig"]
