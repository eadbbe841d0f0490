"""One EfficientQAT run on an in-memory HF model: calibration -> Block-AP -> packed model -> E2E-QP.

The GPTQModel integration (`model.quantize()`) runs `run_eqat`; the CLI runs the same steps with the
decoder layers streamed from the checkpoint (`streamed_run`), sharing the calibration checks
(`prepare_calibration`, `prepare_e2e_data`) and the result record (`EQATResult`) defined here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from .block_ap import BlockAP, BlockAPResult
from .config import EQATConfig
from .data import CalibrationError, normalize_calibration, sample_from_model
from .e2e_qp import E2EQP, E2EReport, held_out_summary
from .layout import ModelLayout, check_fully_quantized, resolve_layout
from .loading import install_packed_linears
from .qweight import QuantizedWeight
from .runtime import Runtime, resolve_runtime, seed_everything

log = logging.getLogger("effqat")


@dataclass
class EQATResult:
    qweights: Dict[str, QuantizedWeight]
    block_ap: BlockAPResult
    e2e: Optional[E2EReport]
    n_train: int
    n_val: int
    seq_len: int
    seconds: float
    source_dtype: torch.dtype = torch.float16
    extra: dict = field(default_factory=dict)

    def meta(self, cfg: EQATConfig) -> dict:
        """What goes into quantize_config.json meta.eqat: identity, settings, data size, losses."""
        from . import __version__

        return {
            "quantizer": f"effqat:{__version__}",
            "base_model": self.extra.get("base_model"),
            "method": "EfficientQAT (Block-AP + E2E-QP), arXiv 2407.11062",
            "settings": cfg.eqat_settings(),
            "calibration": {"train_samples": self.n_train, "val_samples": self.n_val, "seq_len": self.seq_len,
                            "e2e_samples": self.extra.get("e2e_samples"), "e2e_seq_len": self.extra.get("e2e_seq_len"),
                            "self_generated": self.extra.get("self_generated", 0),
                            "block_ap_samples": self.extra.get("block_ap_samples", self.n_train),
                            # where sampled calibration / self-generated samples came from (file + sha256, or
                            # sampler dtype and placement), and why the default's samples are missing if they are
                            **{k: self.extra[k] for k in ("calibration_source", "self_generated_source",
                                                          "self_generated_skipped") if k in self.extra}},
            "block_ap": {
                "quant_lr": self.block_ap.quant_lr,
                "weight_lr": self.block_ap.weight_lr,
                "lr_search": self.block_ap.lr_search,
                "lr_fraction": self.block_ap.lr_fraction,  # E2E-QP's share of its raise (effqat e2e reads it)
                "layers": [asdict(r) for r in self.block_ap.reports],
                # MoE: experts no calibration token was routed to keep their min/max initialization
                "experts_without_tokens": sum(r.experts_without_tokens for r in self.block_ap.reports),
            },
            "e2e_qp": None if self.e2e is None else asdict(self.e2e),
            "seconds": round(self.seconds, 2),
        }


def split_calibration(ids: torch.Tensor, val_samples: int):
    """Hold out up to ``val_samples`` (at most 1/8 of the data) for per-layer validation."""
    n = ids.shape[0]
    n_val = min(val_samples, n // 8)
    if n_val <= 0:
        return ids, None
    return ids[: n - n_val], ids[n - n_val:]


def collect_qweights(hf_model: nn.Module, names, scales_dtype=torch.float16) -> Dict[str, QuantizedWeight]:
    out = {}
    for name in names:
        qw = hf_model.get_submodule(name).to_quantized_weight()
        qw.scales = qw.scales.to(scales_dtype)
        out[name] = qw
    return out


def prepare_calibration(hf_model: nn.Module, layout: ModelLayout, cfg: EQATConfig, calibration,
                        tokenizer=None, seq_len: Optional[int] = None):
    """Check group size, full coverage and calibration against the model (before hours of Block-AP);
    (ids, train_ids, val_ids). Layers may still be on the meta device: only shapes are read."""
    # a GGUF run's groups are its block types' own (16/32/256 wide, with llama.cpp's width fallbacks)
    uniform_groups = cfg.group_size != -1 and not cfg.gguf_type
    for index, layer in enumerate(layout.layers):
        for name in layout.names_in(index):
            lin = layer.get_submodule(name)
            if uniform_groups and cfg.group_size > lin.in_features:
                raise ValueError(f"group_size={cfg.group_size} is larger than in_features={lin.in_features} "
                                 f"of {layout.layer_name(index)}.{name}; use a smaller group or -1")
    check_fully_quantized(layout, layout.quantized_names(), getattr(hf_model.config, "model_type", ""))
    ids = _checked_ids(hf_model, normalize_calibration(calibration, tokenizer=tokenizer, seq_len=seq_len),
                       "calibration")
    train_ids, val_ids = split_calibration(ids, cfg.block_val_samples)
    return ids, train_ids, val_ids


def prepare_e2e_data(hf_model: nn.Module, cfg: EQATConfig, e2e_data, tokenizer=None,
                     seq_len: Optional[int] = None, default: Optional[torch.Tensor] = None):
    """E2E-QP's own training samples (``--e2e-data``), checked like calibration; ``default`` (Block-AP's
    training split) when none are given or E2E-QP is off."""
    if e2e_data is None or cfg.e2e_epochs <= 0:
        return default
    return _checked_ids(hf_model, normalize_calibration(e2e_data, tokenizer=tokenizer, seq_len=seq_len),
                        "E2E-QP data")


def self_generated_seed(seed: int) -> int:
    """Seed of E2E-QP's self-generated samples: not the calibration's (seed) and not seed + 1, which
    ``sample_from_model`` callers use for held-out evaluation text (a shorter sample of the same seed
    is a prefix of it)."""
    return seed + 2


def sample_self_generated(model: nn.Module, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``seq_len`` tokens that the (full-precision) ``model`` writes itself, from BOS
    with seed + 2. Calibration text alone (tens of thousands of tokens of one corpus) fits its topics;
    the model's own text keeps both phases close to the fp model everywhere else."""
    from .model_sampler import bos_of

    log.info("sampling %d x %d tokens from the full-precision model (seed %d) to train on besides the data",
             n, seq_len, self_generated_seed(seed))
    return sample_from_model(model, n, seq_len, seed=self_generated_seed(seed),
                             bos_token_id=bos_of(model.config))


def with_self_generated(cfg: EQATConfig, train_ids: torch.Tensor, e2e_ids: torch.Tensor,
                        self_generated: Optional[torch.Tensor]):
    """(Block-AP's training samples, E2E-QP's samples) with the self-generated ones added: to E2E-QP's
    always (when E2E-QP runs), to Block-AP's with ``cfg.block_self_generated``. On SmolLM2-135M w2g64
    with 56 wikitext calibration samples and 56 self-generated ones, training Block-AP on them too took
    wikitext-2 test / self-generated / KJV perplexity from 49.1 / 203 / 99.8 to 42.6 / 151 / 70.2
    (Block-AP alone: 89.2 / 511 / 196 -> 74.8 / 170 / 97.9), for twice Block-AP's time."""
    if self_generated is None or self_generated.shape[0] == 0:
        return train_ids, e2e_ids
    sg = self_generated.to(train_ids.dtype)
    if sg.shape[1] != train_ids.shape[1]:
        raise CalibrationError(f"self-generated samples have {sg.shape[1]} tokens, the calibration "
                               f"{train_ids.shape[1]}")
    block_train = torch.cat([train_ids, sg]) if cfg.block_self_generated else train_ids
    if cfg.e2e_epochs > 0 and e2e_ids.shape[1] != sg.shape[1]:
        log.warning("E2E-QP data has %d tokens per sample, the self-generated samples %d: E2E-QP does not "
                    "train on them", e2e_ids.shape[1], sg.shape[1])
        return block_train, e2e_ids
    return block_train, torch.cat([e2e_ids, sg]) if cfg.e2e_epochs > 0 else e2e_ids


def _checked_ids(hf_model: nn.Module, ids: torch.Tensor, what: str) -> torch.Tensor:
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CalibrationError(f"{what} must have at least 1 sample of >= 2 tokens, got {tuple(ids.shape)}")
    vocab = hf_model.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise CalibrationError(f"{what} token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")
    return ids


def run_eqat(hf_model: nn.Module, cfg: EQATConfig, calibration, tokenizer=None, definition=None,
             seq_len: Optional[int] = None, layout: Optional[ModelLayout] = None,
             show_progress: bool = True, work_dir: Optional[str] = None,
             offload_dir: Optional[str] = None, e2e_data=None,
             self_generated: Optional[torch.Tensor] = None) -> EQATResult:
    """Quantize ``hf_model`` in place with EfficientQAT and return the learned integers.

    ``work_dir``: Block-AP persists each finished layer there and resumes from it when re-run with
    the same settings and data. ``offload_dir``: Block-AP's activation streams are memory-mapped
    files there instead of host RAM. ``e2e_data``: E2E-QP trains on these samples (any form
    ``calibration`` accepts, any sequence length) instead of Block-AP's, as the paper trains E2E-QP on
    other, larger data; its held-out loss is still measured on Block-AP's validation split.
    ``self_generated``: samples the fp model wrote (``sample_self_generated``, calibration length),
    else ``cfg.self_generated`` of them are sampled here; see ``with_self_generated``.
    """
    t0 = time.time()
    seed_everything(cfg.seed)
    rt: Runtime = resolve_runtime(cfg.compute_device, cfg.amp_dtype)
    layout = layout or resolve_layout(hf_model, definition, cfg)
    ids, train_ids, val_ids = prepare_calibration(hf_model, layout, cfg, calibration, tokenizer, seq_len)
    model_type = getattr(hf_model.config, "model_type", "")
    e2e_ids = prepare_e2e_data(hf_model, cfg, e2e_data, tokenizer, seq_len, default=train_ids)
    if self_generated is None and cfg.self_generated > 0 and cfg.trains_on_self_generated():
        # while the model is still full precision
        self_generated = sample_self_generated(hf_model, cfg.self_generated, ids.shape[1], cfg.seed)
    block_train, e2e_ids = with_self_generated(cfg, train_ids, e2e_ids, self_generated)
    n_self = 0 if self_generated is None else int(self_generated.shape[0])

    source_dtype = next(hf_model.parameters()).dtype
    if rt.device.type == "cpu" and source_dtype != torch.float32:
        hf_model.float()  # CPU runs compute in fp32; the checkpoint is written back in 16-bit
    was_training = hf_model.training
    hf_model.eval()
    block_ap = BlockAP(hf_model, layout, cfg, rt, show_progress)
    block = block_ap.run(block_train, val_ids, work_dir=work_dir, offload_dir=offload_dir)
    check_fully_quantized(layout, block.qweights.keys(), model_type)  # what Block-AP really quantized
    e2e = None
    install_packed_linears(hf_model, block.qweights, cfg.e2e_train_zeros,
                           next(hf_model.parameters()).device)
    if cfg.e2e_epochs > 0:
        on_device = rt.device.type != "cpu"
        if on_device:
            hf_model.to(rt.device)
        from .kernels import use_backend

        with use_backend(cfg.kernel_backend):
            e2e = E2EQP(hf_model, cfg, rt, show_progress, lr_fraction=block.lr_fraction).run(
                e2e_ids, val_ids, teacher=block_ap.teacher)
        if on_device:
            hf_model.to("cpu")
    hf_model.train(was_training)
    qweights = collect_qweights(hf_model, block.qweights.keys())
    result = EQATResult(qweights=qweights, block_ap=block, e2e=e2e, n_train=train_ids.shape[0],
                        n_val=0 if val_ids is None else val_ids.shape[0], seq_len=ids.shape[1],
                        seconds=time.time() - t0,
                        source_dtype=source_dtype if source_dtype in (torch.float16, torch.bfloat16) else torch.float16,
                        extra={"base_model": getattr(hf_model.config, "_name_or_path", None) or None,
                               "e2e_samples": int(e2e_ids.shape[0]) if e2e is not None else 0,
                               "e2e_seq_len": int(e2e_ids.shape[1]), "self_generated": n_self,
                               "block_ap_samples": int(block_train.shape[0])})
    log.info("EQAT done in %.1fs: %d quantized linears at w%dg%d%s", result.seconds, len(qweights), cfg.bits,
             cfg.group_size, held_out_summary(e2e))
    return result
