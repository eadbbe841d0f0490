"""The CLI run's self-generated samples: read from a file, drawn from the model, or skipped, and why.

One place decides, for the streamed and the in-memory run alike (``commands.quantize.train``), where
the ``--self-generated`` samples come from: a ``--self-generated-from`` file (checked against the
model and ``--seq-len`` before anything is trained), or the fp model itself through
``model_sampler`` (on the compute device, or offloaded), with seed ``eqat_run.self_generated_seed``.
When the default recipe would train on them and this run does not, the reason is kept
(:attr:`SelfGenerated.skipped`) so the output line, ``meta.eqat`` and the model card can say so:
a weaker recipe is never a silent one.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger("effqat")

# What training without them costs, from the README ("How the default got there", SmolLM2 w2g64)
COST = ("on SmolLM2 w2g64 (effqat README, 'How the default got there') the default recipe, with them in both "
        "phases, scored 42.6 wikitext-2 / 70.2 KJV perplexity; with them in E2E-QP only 49.1 / 99.8; "
        "without them 60.0 / 253")


@dataclass
class SelfGenerated:
    ids: Optional[torch.Tensor] = None
    record: dict = field(default_factory=dict)  # meta.eqat calibration.self_generated_source
    skipped: Optional[str] = None  # why the default recipe's samples are missing from this run

    def warning(self) -> Optional[str]:
        return None if self.skipped is None else f"trained without self-generated samples: {self.skipped}; {COST}"


def checked_file(path: str, model_dir: str, seq_len: int, requested="auto"):
    """``--self-generated-from`` read and checked against the model's vocabulary, ``--seq-len`` and an
    explicit ``--self-generated`` count (``requested``; config.json only: run before any model is
    loaded, so bad input costs seconds and writes nothing)."""
    from .model_sampler import vocab_size_of
    from .sample_file import check_against, read_sample_file

    sample = read_sample_file(path)
    check_against(sample, vocab_size_of(model_dir), seq_len, n=None if requested == "auto" else int(requested))
    return sample


def _offload_room(root: str) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def resolve(args, cfg, model_dir: str, n_train: int, seq_len: int, loaded=None,
            sample_file=None, offload_root: Optional[str] = None) -> SelfGenerated:
    """The samples ``args`` ask for (``--self-generated``, ``--self-generated-from``,
    ``--self-generated-dtype``, ``--calib``): ``n_train`` of them for ``auto`` when there is calibration
    text; ``loaded``: the in-memory run's fp model, sampled as it is when it is what the sampler would
    load; ``sample_file``: the already checked ``--self-generated-from`` file."""
    from .eqat_run import self_generated_seed
    from .model_sampler import SamplingMemoryError, draw, matches, plan_placement
    from .runtime import resolve_runtime

    requested, path = args.self_generated, getattr(args, "self_generated_from", None)
    if not cfg.trains_on_self_generated():
        reason = "--e2e-epochs 0 with --no-block-self-generated (no phase trains on them)"
        return SelfGenerated(skipped=reason if args.calib or path else None)
    if path:
        sample = sample_file or checked_file(path, model_dir, seq_len, requested)
        n = sample.input_ids.shape[0] if requested == "auto" else int(requested)
        if n == 0:
            return SelfGenerated(skipped="--self-generated 0 was given")
        file_seed = sample.metadata.get("seed")
        if file_seed is not None and file_seed != str(args.seed):
            log.warning("%s was drawn for --seed %s, this run has --seed %d: it trains on them all the same, "
                        "but not as `--self-generated N --seed %d` would", path, file_seed, args.seed, args.seed)
        log.info("self-generated samples: %d x %d from %s (sha256 %s)", n, seq_len, path, sample.sha256[:12])
        return SelfGenerated(ids=sample.input_ids[:n], record={"source": "file", **sample.record(), "used": n})
    if requested == "auto":
        if not args.calib:  # the calibration is self-generated already: more of the same adds nothing
            return SelfGenerated()
        n = int(n_train)
    elif int(requested) == 0:
        return SelfGenerated(skipped="--self-generated 0 was given" if args.calib else None)
    else:
        n = int(requested)
    device = resolve_runtime(cfg.compute_device, cfg.amp_dtype).device
    placement = plan_placement(model_dir, n, seq_len, device, getattr(args, "self_generated_dtype", "auto"))
    target = getattr(args, "out_dir", None) or getattr(args, "out_root", None) or "."
    root = offload_root or os.path.dirname(os.path.abspath(target))  # beside the output: room for a model
    use = loaded if loaded is not None and matches(loaded, placement) else None
    elsewhere = "; sample elsewhere (`effqat sample`) and pass --self-generated-from"
    if placement.offload and use is None:
        needed = placement.weight_bytes - placement.budget - placement.host_budget
        if requested == "auto" and needed > _offload_room(root):
            return SelfGenerated(skipped=(
                f"--self-generated auto: the model ({placement.weight_bytes / 1e9:.1f} GB in "
                f"{str(placement.dtype).replace('torch.', '')}) fits neither in the memory allowed for "
                f"sampling nor on the disk under {root}" + elsewhere))
    try:
        ids, record = draw(model_dir, n, seq_len, self_generated_seed(args.seed), placement, loaded=use,
                           offload_root=root)
    except SamplingMemoryError as e:
        if requested != "auto":
            raise
        return SelfGenerated(skipped=f"--self-generated auto: {e}" + elsewhere)
    return SelfGenerated(ids=ids, record={"source": "sampled", **record})
