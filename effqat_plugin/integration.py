"""Registers EfficientQAT with GPTQModel: `quantize()` and `save()` of a model loaded with EQATConfig.

GPTQModel 7.7 picks its quantization processor with a hard-coded if/elif and its layer-scope hooks
are private and change often, so instead of threading Block-AP through its looper we wrap the two
public entry points on `BaseQModel`: models loaded with an `EQATConfig` run our pipeline, every other
model runs GPTQModel's code untouched. The checkpoint is written by our format registry
(`effqat_plugin.converters.save_quantized`), which loads in `GPTQModel.from_quantized` unmodified.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from typing import Optional

import torch

from .config import EQATConfig
from .layout import definition_for, tied_output_keys

log = logging.getLogger("effqat")

_PATCHED = False


def _eqat_quantize(self, calibration=None, tokenizer=None, seq_len: Optional[int] = None,
                   show_progress: bool = True, work_dir: Optional[str] = None,
                   offload_dir: Optional[str] = None, e2e_data=None, self_generated=None, **_ignored):
    """Block-AP (+ E2E-QP when ``e2e_epochs > 0``) on ``self.model`` in place; ``work_dir`` makes
    Block-AP resumable (see ``resume.py``); ``offload_dir`` keeps its activation streams in
    memory-mapped files instead of RAM; ``e2e_data`` gives E2E-QP its own training samples;
    ``self_generated``: samples the fp model wrote, for both phases (else ``self_generated``
    of them are sampled)."""
    from .eqat_run import run_eqat

    if getattr(self, "_eqat_result", None) is not None or self.quantized:
        raise EnvironmentError("quantize() was called on a model that is already quantized")
    if self.quantize_config.save_format == "gguf":
        raise NotImplementedError("save_format='gguf' (training on llama.cpp's block types) runs through the "
                                  "streamed CLI: effqat quantize MODEL OUT.gguf --format gguf --gguf-type PRESET")
    if calibration is None:
        raise ValueError("quantize() needs calibration data: a LongTensor [N, T], a list of "
                         "{'input_ids': ...} dicts or a list of strings")
    definition = definition_for(getattr(self.model.config, "model_type", ""))
    result = run_eqat(self.model, self.quantize_config, calibration,
                      tokenizer=tokenizer or getattr(self, "tokenizer", None), definition=definition,
                      seq_len=seq_len, show_progress=show_progress, work_dir=work_dir,
                      offload_dir=offload_dir, e2e_data=e2e_data, self_generated=self_generated)
    self._eqat_result = result
    return {"eqat": result.meta(self.quantize_config)}


def non_quantized_tensors(hf_model, quantized_names, dtype: torch.dtype):
    """Every tensor of the state dict that is not part of a quantized linear, tied copies dropped."""
    prefixes = tuple(n + "." for n in quantized_names)
    tied = tied_output_keys(hf_model)
    tensors = {}
    for key, value in hf_model.state_dict().items():
        if key.startswith(prefixes) or key in tied:
            continue
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.detach().cpu().contiguous()
    return tensors


def stage_config_files(hf_model, tokenizer, dtype: torch.dtype) -> str:
    """A temporary folder with config.json (dtype = ``dtype``), generation config and tokenizer."""
    staging = tempfile.mkdtemp(prefix=".effqat-config-")
    config = hf_model.config
    old_dtype = getattr(config, "dtype", None)
    config.dtype = dtype
    config.save_pretrained(staging)
    config.dtype = old_dtype
    gen = getattr(hf_model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(staging)
        except (ValueError, OSError) as e:  # invalid sampling combos refuse to save; not fatal
            log.warning("generation_config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    return staging


def save_eqat_checkpoint(hf_model, tokenizer, result, cfg: EQATConfig, save_dir: str, fmt: Optional[str] = None,
                         overwrite: bool = False, max_shard_size: str = "4GB") -> dict:
    """Write the learned integers as a checkpoint `GPTQModel.from_quantized` loads (atomic)."""
    from .converters import save_quantized

    fmt = fmt or cfg.save_format
    dtype = result.source_dtype
    tensors = non_quantized_tensors(hf_model, result.qweights.keys(), dtype)
    staging = stage_config_files(hf_model, tokenizer, dtype)
    try:
        meta = {"eqat": result.meta(cfg)}
        report = save_quantized(save_dir, fmt=fmt, qweights=result.qweights, tensors=tensors,
                                config_dir_or_files=staging, meta=meta, overwrite=overwrite,
                                max_shard_size=max_shard_size, sym=cfg.sym)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved %s checkpoint to %s", fmt, save_dir)
    return report


def _eqat_save(self, save_dir: str, max_shard_size="4GB", overwrite: bool = False, fmt: Optional[str] = None,
               **_ignored):
    result = getattr(self, "_eqat_result", None)
    if result is None:
        raise EnvironmentError("save(): call quantize() first; nothing has been quantized yet")
    if isinstance(max_shard_size, int):
        max_shard_size = f"{max_shard_size}B"
    return save_eqat_checkpoint(self.model, getattr(self, "tokenizer", None), result, self.quantize_config,
                                os.fspath(save_dir), fmt=fmt, overwrite=overwrite, max_shard_size=max_shard_size)


def register() -> None:
    """Wrap `BaseQModel.quantize` / `save` so EQATConfig models take the EfficientQAT path (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from gptqmodel.models.base import BaseQModel

    original_quantize, original_save = BaseQModel.quantize, BaseQModel.save

    @functools.wraps(original_quantize)
    def quantize(self, *args, **kwargs):
        if isinstance(getattr(self, "quantize_config", None), EQATConfig):
            return _eqat_quantize(self, *args, **kwargs)
        return original_quantize(self, *args, **kwargs)

    @functools.wraps(original_save)
    def save(self, *args, **kwargs):
        if isinstance(getattr(self, "quantize_config", None), EQATConfig) and \
                getattr(self, "_eqat_result", None) is not None:
            return _eqat_save(self, *args, **kwargs)
        return original_save(self, *args, **kwargs)

    BaseQModel.quantize, BaseQModel.save = quantize, save
    _PATCHED = True
