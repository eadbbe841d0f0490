"""E2E-QP: with W_int and z frozen in packed low-bit form, train only the step sizes end to end.

The model's quantized linears are `PackedQuantLinear` modules (our kernels), so memory scales with
bits; the causal-LM loss flows into their fp32 step sizes (the master copy), everything else is
frozen. One trainer serves every entry point (the plugin's in-process run through
``eqat_run.run_eqat`` and the ``effqat e2e`` command, single process or ``accelerate launch``):

* built on ``accelerate``: DDP / FSDP across processes or GPUs, gradient accumulation, mixed
  precision (``no`` on CPU, bf16 on CUDA unless the runtime says otherwise), gradient checkpointing;
* optimizer and schedule as the reference: AdamW (weight decay 0), linear warm-up (ratio 0.03) then
  cosine to 0, max grad norm 0.3, step sizes clamped to [1e-4, 1e4] after every step;
* loss = the HF causal-LM loss, token-weighted over the *global* batch (``num_items_in_batch``), so
  micro-batch x accumulation x processes gives the same update as one big batch, also for
  instruction data whose micro-batches hold different numbers of target tokens; with
  ``cfg.e2e_distill`` > 0, mixed with distillation from the fp model's top-k next-token
  distribution (``teacher.py``), token-weighted the same way;
* held-out loss before / during / after training; resumable state (trainable tensors + AdamW moments
  + step) written atomically every ``save_every`` steps.

Samples are shuffled every epoch, as the reference's HF Trainer does: epoch ``e`` visits them in
``randperm(N)`` drawn from a generator seeded with ``seed + e``, so the order depends only on the
run's seed and the epoch (the same on every process, and again after a resume).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import lr_rules
from .runtime import Runtime

if TYPE_CHECKING:  # config.py imports gptqmodel (slow); E2E-QP only reads the e2e_* fields
    from .config import EQATConfig  # noqa: F401

log = logging.getLogger("effqat.e2e_qp")

S_MIN, S_MAX = 1e-4, 1e4  # the quantizer's legal step-size range (quantizer.S_MIN / S_MAX)
STATE_VERSION = 1


@dataclass
class E2EReport:
    steps: int
    lr: float
    train_loss: float
    val_loss_before: Optional[float]
    val_loss_after: Optional[float]
    seconds: float
    peak_memory_mb: float
    # added with the accelerate trainer
    total_steps: int = 0
    epochs: int = 0
    global_batch_size: int = 0
    micro_batch_size: int = 0
    grad_accum_steps: int = 1
    world_size: int = 1
    mixed_precision: str = "no"
    trainable_values: int = 0
    train_tokens: int = 0
    resumed_from_step: int = 0
    completed: bool = True
    eval_history: List[Dict[str, float]] = field(default_factory=list)
    # 1-based epoch whose step sizes were kept; 0: none of them, Block-AP's (no epoch lowered the held-out loss)
    best_epoch: int = 0
    # epochs actually trained: ``epochs`` is the plan (the cosine runs over it), the auto rule stops
    # earlier once held-out loss stops falling (lr_rules.e2e_continue); 0 in reports of older versions
    epochs_run: int = 0
    # share of the loss (and of the held-out loss) that is distillation from the fp model (cfg.e2e_distill)
    distill: float = 0.0


@dataclass
class E2ESettings:
    """The E2E-QP fields of :class:`EQATConfig`, without importing GPTQModel (the CLI and the
    distributed workers use this). ``E2EQP`` accepts either."""

    bits: int = 2
    e2e_epochs: int = 1
    e2e_max_auto_epochs: int = 4
    e2e_batch_size: int = 32  # global batch (sequences per optimizer step, all processes)
    e2e_lr: Optional[float] = None
    e2e_train_zeros: bool = False
    e2e_warmup_ratio: float = 0.03
    e2e_max_grad_norm: float = 0.3
    e2e_distill: float = 0.0  # share of the loss that is distillation (needs a teacher: EQATConfig)
    lr_preset: str = "auto"
    max_lr_scale: float = 128.0
    seed: int = 0

    def e2e_learning_rate(self, train_tokens: int, fraction: float = 1.0) -> float:
        return lr_rules.e2e_lr(self.bits, self.lr_preset, self.max_lr_scale, train_tokens, self.e2e_lr, fraction)


@dataclass
class E2EOptions:
    """How to run (not what to learn): batching, precision, distribution, evaluation, resume."""

    micro_batch_size: Optional[int] = None  # per process; None = global batch / processes (no accumulation)
    gradient_checkpointing: bool = False
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None = from the runtime (no on CPU, bf16 on CUDA)
    fsdp: bool = False
    eval_every: int = 0  # optimizer steps between held-out evaluations (0 = before and after only)
    eval_batch_size: Optional[int] = None  # default: the micro batch
    state_dir: Optional[str] = None  # resumable state is written here (atomically)
    save_every: int = 0  # optimizer steps between state saves (0 = only when stopping early)
    resume: bool = False  # continue from ``state_dir`` when it holds a state
    stop_after: Optional[int] = None  # stop after this many optimizer steps in total (state is saved)
    pad_token_id: int = 0


# ------------------------------------------------------------------------------------------------
def quantized_modules(model: nn.Module):
    from .kernels import PackedQuantLinear

    return [m for m in model.modules() if isinstance(m, PackedQuantLinear)]


def kgrid_modules(model: nn.Module):
    """Linears on a llama.cpp K grid (GGUF runs): their trainable step sizes are d and dmin."""
    from .gguf_weights import KGridLinear

    return [m for m in model.modules() if isinstance(m, KGridLinear)]


def optimizer_groups(model: nn.Module, params: List[nn.Parameter], bits: int) -> List[dict]:
    """AdamW groups of ``params``, each with its ``lr_mult`` of the run's rate (set for ``bits``): 1
    for uniform step sizes, the relative rates of ``gguf_weights`` for llama.cpp grids' scales."""
    mult = {k: v for m in kgrid_modules(model) for k, v in m.lr_multipliers(bits).items()}
    plain = [p for p in params if id(p) not in mult]
    groups = [{"params": plain, "lr_mult": 1.0}] if plain else []
    return groups + [{"params": [p], "lr_mult": mult[id(p)]} for p in params if id(p) in mult]


def trainable_step_sizes(model: nn.Module, train_zeros: bool) -> List[nn.Parameter]:
    """Freeze everything but the step sizes (and zero points when asked) of the packed linears, and
    the fp16 super-block scales of K-grid linears."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in kgrid_modules(model):
        for p in m.step_parameters():
            p.requires_grad_(True)
            params.append(p)
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


class EpochShuffle(torch.utils.data.Sampler):
    """Sample order of one epoch: a permutation seeded by ``seed + epoch`` (set ``epoch`` before
    iterating). Deterministic, so every process and a resumed run walk the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def clamp_step_sizes(model: nn.Module) -> None:
    for m in quantized_modules(model):
        m.scales.clamp_(min=S_MIN, max=S_MAX)


# ------------------------------------------------------------------------------------------------
def _mixed_precision_for(rt: Runtime, asked: Optional[str]) -> str:
    if asked is not None:
        asked = {"fp32": "no", "none": "no", "bfloat16": "bf16", "float16": "fp16"}.get(asked.lower(), asked.lower())
        if asked not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed precision {asked!r}: use no, bf16 or fp16")
        return asked
    if rt.amp_dtype is None:
        return "no"
    return "bf16" if rt.amp_dtype == torch.bfloat16 else "fp16"


def _distributed_running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_accelerator(cpu: bool, mixed_precision: str, grad_accum: int, fsdp: bool = False):
    """An ``Accelerator`` with these settings, even when one with other settings exists already.

    accelerate keeps process-wide singletons (``PartialState`` / ``AcceleratorState``) that refuse a
    second ``Accelerator`` with another precision or device. In a single process (no process group)
    nothing else depends on them once a run is over, so a mismatching state is reset; inside a
    distributed job the first settings stay and a mismatch is a clear error.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    shared = AcceleratorState._shared_state
    if shared:
        dev = shared.get("device")
        same = (shared.get("_mixed_precision") == mixed_precision
                and (dev is None or (dev.type == "cpu") == cpu)
                and bool(shared.get("fsdp_plugin")) == bool(fsdp))
        if not same:
            if _distributed_running():
                raise ValueError("accelerate is already initialised in this distributed job with other "
                                 "settings (mixed precision / device / FSDP); use one setting per job")
            AcceleratorState._reset_state(reset_partial_state=True)
    elif PartialState._shared_state and not _distributed_running():
        dev = PartialState._shared_state.get("device")
        if dev is not None and (dev.type == "cpu") != cpu:
            PartialState._reset_state()
    kwargs: Dict[str, Any] = dict(
        cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
        # W_int / z buffers are frozen and identical on every rank: never re-broadcast them
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        # use_orig_params: the flat parameters mix frozen and trainable tensors
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=False)
    return Accelerator(**kwargs)


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """HF activation (gradient) checkpointing, non-reentrant: the inputs of each checkpointed block do
    not require grad (frozen embeddings), which the reentrant variant would silently not train."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if on:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # pragma: no cover
        model.gradient_checkpointing_disable()


def _as_dataset(data):
    from .e2e_data import TokenDataset

    if data is None or isinstance(data, TokenDataset):
        return data
    if isinstance(data, torch.Tensor):
        return TokenDataset(data)
    raise TypeError(f"E2E-QP data must be an [N, T] LongTensor or an e2e_data.TokenDataset, got {type(data).__name__}")


class TeacherRows(torch.utils.data.Dataset):
    """A ``TokenDataset`` whose items also carry the fp model's top-k next-token log-probabilities
    (``teacher.TeacherLogits``) for E2E-QP's distillation loss."""

    def __init__(self, base, teacher, what: str):
        if not isinstance(base.input_ids, torch.Tensor):
            raise ValueError(f"E2E-QP distillation needs equal-length {what} rows (calibration-style data)")
        self.base = base
        self.token_ids, self.logprobs = teacher.for_rows(base.input_ids, what)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {**self.base[i], "teacher_ids": self.token_ids[i], "teacher_logp": self.logprobs[i]}

    def num_tokens(self) -> int:
        return self.base.num_tokens()


def mixed_loss_sum(logits: torch.Tensor, batch: Dict[str, torch.Tensor], distill: float) -> torch.Tensor:
    """(1 - distill) x the causal-LM loss + distill x the distillation loss, both summed over the
    batch's target tokens."""
    from .teacher import distill_nll_sum

    total = torch.zeros((), device=logits.device, dtype=torch.float32)
    if distill < 1.0:
        labels = batch["labels"][:, 1:]
        total = total + (1.0 - distill) * torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="sum")
    if distill > 0.0:
        total = total + distill * distill_nll_sum(logits, batch["teacher_ids"], batch["teacher_logp"],
                                                  batch["labels"])
    return total


def _atomic_state_write(state_dir: str, tensors: Dict[str, torch.Tensor], info: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(state_dir, exist_ok=True)
    final = os.path.join(state_dir, "e2e_state")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, "state.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_state(state_dir: str):
    """(tensors, info) of the newest complete state under ``state_dir``, or None."""
    from safetensors.torch import load_file

    for name in ("e2e_state", "e2e_state.old"):  # .old survives a crash between the two renames
        d = os.path.join(state_dir, name)
        if os.path.isfile(os.path.join(d, "state.json")) and os.path.isfile(os.path.join(d, "state.safetensors")):
            with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
                info = json.load(f)
            return load_file(os.path.join(d, "state.safetensors")), info
    return None


# ------------------------------------------------------------------------------------------------
class E2EQP:
    """``E2EQP(model, cfg, runtime).run(train, val) -> E2EReport``; trains the model in place.

    ``cfg``: an :class:`EQATConfig` or :class:`E2ESettings` (``e2e_batch_size`` is the global batch).
    ``train`` / ``val``: ``[N, T]`` token ids (loss on every token) or an ``e2e_data.TokenDataset``
    (labels -100 where no loss is taken, e.g. instruction sources and padding).
    """

    def __init__(self, model: nn.Module, cfg, runtime: Runtime, show_progress: bool = True,
                 options: Optional[E2EOptions] = None, lr_fraction: float = 1.0):
        """``lr_fraction``: share of the auto preset's raise to use: ``BlockAPResult.lr_fraction`` of
        the Block-AP run that made the model (``meta.eqat.block_ap.lr_fraction`` in its checkpoint)."""
        self.model, self.cfg, self.rt, self.show_progress = model, cfg, runtime, show_progress
        self.lr_fraction = lr_fraction
        self.opts = options or E2EOptions()
        self.accelerator = None
        self.distill = float(getattr(cfg, "e2e_distill", 0.0))

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data, batch_size: int) -> float:
        """Mean next-token NLL over the labelled tokens of ``data``, split across processes; with
        distillation (``cfg.e2e_distill``), the training loss' mix of it and the distillation loss."""
        from .e2e_data import collate

        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        n = len(data)
        mine = list(range(rank, n, world))
        n_batches = math.ceil(math.ceil(n / world) / batch_size)  # same on every rank (FSDP needs it)
        total = torch.zeros((), dtype=torch.float64, device=acc.device)
        count = torch.zeros((), dtype=torch.float64, device=acc.device)
        was_training = model.training
        model.eval()
        for b in range(n_batches):
            idx = mine[b * batch_size:(b + 1) * batch_size]
            weight = 1.0 if idx else 0.0
            batch = {k: v.to(acc.device) for k, v in collate([data[i] for i in (idx or [0])],
                                                             self.opts.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           use_cache=False).logits
            total += weight * mixed_loss_sum(logits, batch, self.distill).double()
            count += weight * (batch["labels"][:, 1:] != -100).sum().double()
        model.train(was_training)
        total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
        return float(total / count.clamp(min=1))

    # -- resumable state -------------------------------------------------------------------------
    def _named_trainable(self, unwrapped: nn.Module):
        return [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]

    def _fingerprint(self, **kw) -> dict:
        return {k: (round(v, 12) if isinstance(v, float) else v) for k, v in kw.items()}

    def _save_state(self, unwrapped, optimizer, info: dict) -> None:
        acc = self.accelerator
        if self.opts.fsdp:
            raise NotImplementedError("resumable state is not supported with FSDP yet; run without --save-every")
        if acc.is_main_process:
            opt = getattr(optimizer, "optimizer", optimizer)
            tensors, adam_steps = {}, {}
            for name, p in self._named_trainable(unwrapped):
                tensors[name] = p.data
                st = opt.state.get(p, {})
                if "exp_avg" in st:
                    tensors[name + "::exp_avg"] = st["exp_avg"]
                    tensors[name + "::exp_avg_sq"] = st["exp_avg_sq"]
                    adam_steps[name] = float(st["step"])
            _atomic_state_write(self.opts.state_dir, tensors, {**info, "adam_steps": adam_steps})
        acc.wait_for_everyone()

    def _load_state(self, unwrapped, optimizer, fingerprint: dict) -> Optional[dict]:
        got = read_state(self.opts.state_dir)
        if got is None:
            return None
        tensors, info = got
        if info.get("version") != STATE_VERSION or info.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.opts.state_dir}: the saved E2E-QP state was made with other settings "
                             f"({info.get('fingerprint')} vs {fingerprint}); remove it or start without --resume")
        opt = getattr(optimizer, "optimizer", optimizer)
        dev = self.accelerator.device
        with torch.no_grad():
            for name, p in self._named_trainable(unwrapped):
                if name not in tensors:
                    raise ValueError(f"{self.opts.state_dir}: saved state lacks {name}")
                p.data.copy_(tensors[name].to(p.device, p.dtype))
                if name + "::exp_avg" in tensors:
                    opt.state[p] = {
                        "step": torch.tensor(info["adam_steps"][name], dtype=torch.float32),
                        "exp_avg": tensors[name + "::exp_avg"].to(dev, p.dtype),
                        "exp_avg_sq": tensors[name + "::exp_avg_sq"].to(dev, p.dtype),
                    }
        return info

    # -- training ------------------------------------------------------------------------------
    def run(self, train: Union[torch.Tensor, Any], val: Optional[Union[torch.Tensor, Any]] = None,
            teacher=None) -> E2EReport:
        """``teacher``: the fp model's logits on these rows (``teacher.TeacherLogits``, from Block-AP),
        needed when ``cfg.e2e_distill`` > 0."""
        from torch.utils.data import DataLoader

        from .e2e_data import collate

        cfg, rt, opts, model = self.cfg, self.rt, self.opts, self.model
        t0 = time.time()
        rt.reset_peak()
        train_ds, val_ds = _as_dataset(train), _as_dataset(val)
        if train_ds is None or len(train_ds) == 0:
            raise ValueError("E2E-QP needs at least one training sample")
        if val_ds is not None and len(val_ds) == 0:
            val_ds = None
        if self.distill > 0:
            if teacher is None:
                raise ValueError("E2E-QP distillation (e2e_distill > 0) needs the fp model's logits, which "
                                 "Block-AP keeps; it is not available when E2E-QP runs on its own")
            train_ds = TeacherRows(train_ds, teacher, "training")
            val_ds = None if val_ds is None else TeacherRows(val_ds, teacher, "held-out")
        mp = _mixed_precision_for(rt, opts.mixed_precision)
        cpu = rt.device.type == "cpu"

        # batch geometry: global batch = micro batch x accumulation x processes
        probe_world = (torch.distributed.get_world_size() if _distributed_running()
                       else int(os.environ.get("WORLD_SIZE", "1")))
        global_bs = int(cfg.e2e_batch_size)
        mb = opts.micro_batch_size or max(1, global_bs // probe_world)
        if global_bs % (mb * probe_world):
            raise ValueError(f"global batch {global_bs} is not a multiple of micro batch {mb} x {probe_world} "
                             "process(es)")
        accum = global_bs // (mb * probe_world)
        acc = self.accelerator = make_accelerator(cpu, mp, accum, opts.fsdp)
        world = acc.num_processes
        if opts.fsdp and acc.distributed_type != "FSDP":
            raise ValueError(f"FSDP was asked for but accelerate runs {acc.distributed_type} here (accelerate "
                             "shards with FSDP only on GPUs, under `accelerate launch`); drop --fsdp to use DDP")
        if world != probe_world:  # pragma: no cover - defensive
            raise RuntimeError(f"accelerate reports {world} processes, the environment {probe_world}")
        torch.manual_seed(cfg.seed)

        params = trainable_step_sizes(model, cfg.e2e_train_zeros)
        n_trainable = sum(p.numel() for p in params)
        gc_was = _checkpointing_on(model)
        if opts.gradient_checkpointing and not gc_was:
            _set_checkpointing(model, True)
        was_training = model.training
        model.train()

        order = EpochShuffle(len(train_ds), cfg.seed)
        loader = DataLoader(train_ds, batch_size=mb, sampler=order,
                            collate_fn=lambda b: collate(b, opts.pad_token_id))
        import warnings

        with warnings.catch_warnings():  # torch 2.14 DDP: broadcast_buffers=False is what we mean (no init sync)
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            if opts.fsdp:
                if kgrid_modules(model):
                    raise NotImplementedError("E2E-QP with FSDP does not train K-grid (GGUF) scales; run without --fsdp")
                wrapped = acc.prepare(model)
                params = [p for p in wrapped.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)
                optimizer, loader = acc.prepare(optimizer, loader)
            else:
                optimizer = torch.optim.AdamW(optimizer_groups(model, params, cfg.bits), lr=1.0, weight_decay=0.0)
                wrapped, optimizer, loader = acc.prepare(model, optimizer, loader)
        unwrapped = acc.unwrap_model(wrapped)

        steps_per_epoch = math.ceil(len(loader) / accum)
        epochs = lr_rules.e2e_epochs(cfg.e2e_epochs, steps_per_epoch, cfg.lr_preset,
                                     getattr(cfg, "e2e_max_auto_epochs", 1))
        total = epochs * steps_per_epoch
        train_tokens_budget = epochs * train_ds.num_tokens()
        lr = cfg.e2e_learning_rate(train_tokens_budget, self.lr_fraction)
        warmup = int(round(cfg.e2e_warmup_ratio * total))
        eval_bs = opts.eval_batch_size or mb
        fingerprint = self._fingerprint(n_train=len(train_ds), global_batch=global_bs, micro_batch=mb,
                                        world=world, epochs=epochs, lr=lr, warmup=warmup,
                                        train_zeros=bool(cfg.e2e_train_zeros), n_trainable=n_trainable,
                                        **({"distill": self.distill} if self.distill else {}))

        start_step, running, history, val_before, train_tokens = 0, float("nan"), [], None, 0
        info = None
        # the step sizes the run starts from (Block-AP's; a resumed run is handed the same model before
        # its state is loaded): E2E-QP keeps them when no epoch lowers the held-out loss
        start_values = [p.detach().to("cpu", copy=True) for p in params] if val_ds is not None else None
        if opts.resume:
            if not opts.state_dir:
                raise ValueError("resume needs a state folder")
            info = self._load_state(unwrapped, optimizer, fingerprint)
        if info is not None:
            start_step, running = int(info["step"]), float(info["train_loss"])
            history, val_before = list(info["eval_history"]), info["val_loss_before"]
            train_tokens = int(info.get("train_tokens", 0))
            log.info("E2E-QP: resuming from step %d of %d (%s)", start_step, total, opts.state_dir)
        elif val_ds is not None:
            val_before = self.evaluate(wrapped, val_ds, eval_bs)
        if acc.is_main_process:
            log.info("E2E-QP: %d steps (%d epoch(s) x %d), lr %.3g, global batch %d = %d micro x %d accum x %d "
                     "process(es), mixed precision %s, %d trainable tensors (%d values)%s", total,
                     epochs, steps_per_epoch, lr, global_bs, mb, accum, world, mp, len(params),
                     n_trainable, "" if val_before is None else f", val loss before {val_before:.4f}")

        def state_info(step):
            return {"version": STATE_VERSION, "fingerprint": fingerprint, "step": step, "train_loss": running,
                    "eval_history": history, "val_loss_before": val_before, "train_tokens": train_tokens}

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc="E2E-QP",
                   disable=not (self.show_progress and acc.is_local_main_process))
        step = start_step
        stop_at = total if opts.stop_after is None else min(total, int(opts.stop_after))
        # epochs added by the auto rule, with held-out data: evaluate at each epoch's end, keep the
        # best step sizes, and stop once held-out loss no longer falls (an explicit epoch count trains
        # exactly that). The cosine is planned over all ``epochs``: see lr_rules.e2e_continue.
        keep_best = epochs > cfg.e2e_epochs and val_ds is not None
        # (val loss, epoch, host copies of the trainable tensors); epoch 0 is the state Block-AP left
        initial = None if val_before is None or start_values is None else (val_before, 0, start_values)
        best = initial if keep_best else None
        stopped = False  # by the auto rule, after epoch ``epochs_run``
        epochs_run = start_step // steps_per_epoch
        try:
            for epoch in range(start_step // steps_per_epoch, epochs):
                order.epoch = epoch
                skip = (step - epoch * steps_per_epoch) * accum
                epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
                it = iter(epoch_loader)
                while step < stop_at:
                    micro = list(islice(it, accum))
                    if not micro:
                        break
                    torch.manual_seed(cfg.seed + step)  # dropout (if any) reproducible across resumes
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_mult", 1.0) * warmup_cosine(step, total, warmup)
                    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
                    n_items = acc.reduce(torch.tensor(local, device=acc.device, dtype=torch.int64), "sum")
                    n_items = n_items.clamp(min=1).to(torch.float32)
                    step_loss = torch.zeros((), device=acc.device, dtype=torch.float32)
                    for j, batch in enumerate(micro):
                        sync = j == len(micro) - 1
                        ctx = contextlib.nullcontext() if sync else acc.no_sync(wrapped)
                        with ctx:
                            hf_loss = {} if self.distill else {"labels": batch["labels"], "num_items_in_batch": n_items}
                            out = wrapped(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                          use_cache=False, **hf_loss)
                            loss = (mixed_loss_sum(out.logits, batch, self.distill) / n_items if self.distill
                                    else out.loss)
                            # loss = this micro-batch's token-loss sum / global token count; backward
                            # divides by `accum` and DDP averages over processes: undo both
                            acc.backward(loss * (accum * world))
                        step_loss += loss.detach().float()
                    step_loss = float(acc.reduce(step_loss, "sum"))
                    if not math.isfinite(step_loss):
                        raise FloatingPointError(f"E2E-QP: loss became {step_loss} at step {step}; lower the lr")
                    acc.clip_grad_norm_(list(wrapped.parameters()) if opts.fsdp else params, cfg.e2e_max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    clamp_step_sizes(unwrapped)  # keep step sizes in the quantizer's legal range
                    running = step_loss if step == 0 or not math.isfinite(running) else 0.9 * running + 0.1 * step_loss
                    train_tokens += int(n_items)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.3f}")
                    if val_ds is not None and opts.eval_every and step % opts.eval_every == 0 and step < total:
                        v = self.evaluate(wrapped, val_ds, eval_bs)
                        history.append({"step": step, "val_loss": v, "val_ppl": math.exp(min(v, 50.0))})
                        if acc.is_main_process:
                            log.info("E2E-QP: step %d/%d, train loss %.4f, val loss %.4f", step, total, running, v)
                    if opts.state_dir and opts.save_every and step % opts.save_every == 0 and step < stop_at:
                        self._save_state(unwrapped, optimizer, state_info(step))
                if keep_best and step == (epoch + 1) * steps_per_epoch:
                    v = self.evaluate(wrapped, val_ds, eval_bs)
                    history.append({"step": step, "epoch": epoch + 1, "val_loss": v,
                                    "val_ppl": math.exp(min(v, 50.0))})
                    if acc.is_main_process:
                        log.info("E2E-QP: epoch %d/%d, train loss %.4f, val loss %.4f", epoch + 1, epochs, running, v)
                    earlier = [h["val_loss"] for h in history[:-1] if "epoch" in h]
                    if val_before is not None:
                        earlier.append(val_before)
                    if best is None or v < best[0]:
                        best = (v, epoch + 1, [p.detach().to("cpu", copy=True) for p in params])
                    if (epoch + 1 < epochs and epoch + 1 >= cfg.e2e_epochs and earlier
                            and not lr_rules.e2e_continue(min(earlier), v)):
                        stopped = True
                        if acc.is_main_process:
                            log.info("E2E-QP: held-out loss fell by less than %g%% in epoch %d; stopping after "
                                     "%d of %d planned epochs", 100 * lr_rules.E2E_MIN_GAIN, epoch + 1,
                                     epoch + 1, epochs)
                if step == (epoch + 1) * steps_per_epoch:
                    epochs_run = epoch + 1
                if step >= stop_at or stopped:
                    break
        except KeyboardInterrupt:
            if opts.state_dir and not opts.fsdp and step > start_step:
                self._save_state(unwrapped, optimizer, state_info(step))
                log.warning("E2E-QP interrupted at step %d; state saved to %s (continue with resume)", step,
                            opts.state_dir)
            raise
        finally:
            bar.close()
        completed = step >= total or stopped
        if not completed and opts.state_dir:
            self._save_state(unwrapped, optimizer, state_info(step))
            if acc.is_main_process:
                log.info("E2E-QP: stopped after step %d of %d; state saved to %s", step, total, opts.state_dir)

        val_after, best_epoch = None, epochs_run
        if completed and best is None and val_ds is not None:   # a fixed epoch count: the last epoch, or epoch 0
            val_after = self.evaluate(wrapped, val_ds, eval_bs)
            history.append({"step": step, "val_loss": val_after, "val_ppl": math.exp(min(val_after, 50.0))})
            if initial is not None and val_after > initial[0]:
                best = initial
        if completed and best is not None:
            val_after, best_epoch = best[0], best[1]
            if best_epoch != epochs_run:
                with torch.no_grad():
                    for p, saved in zip(params, best[2]):
                        p.data.copy_(saved.to(p.device))
            if start_step and any(h.get("epoch", epochs + 1) <= start_step // steps_per_epoch
                                  and h["val_loss"] < best[0] for h in history) and acc.is_main_process:
                log.warning("E2E-QP: an epoch before the resume had a lower held-out loss; its step sizes were "
                            "not saved, so epoch %d's are kept", best_epoch)
            if acc.is_main_process and best_epoch == 0:
                log.warning("E2E-QP: no epoch lowered the held-out loss below Block-AP's (%.4f); kept Block-AP's "
                            "step sizes (best_epoch 0 in meta.eqat.e2e_qp)", best[0])
            elif acc.is_main_process:
                log.info("E2E-QP: kept epoch %d of %d trained (lowest held-out loss)", best_epoch, epochs_run)
        for p in unwrapped.parameters():
            p.requires_grad_(False)
        if opts.gradient_checkpointing and not gc_was:
            _set_checkpointing(unwrapped, False)
        unwrapped.train(was_training)
        # drop accelerate's mixed-precision forward wrapper from the caller's model, and the optimizer
        # state (2x the step sizes) with the accelerator's references; FSDP keeps its wrapper, which
        # the caller needs to gather the sharded parameters (``self.wrapped``)
        self.wrapped = wrapped if opts.fsdp else None
        self.trained_model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
        if not opts.fsdp:
            del optimizer, loader
            acc.free_memory()
        report = E2EReport(steps=step, lr=lr, train_loss=running, val_loss_before=val_before,
                           val_loss_after=val_after, seconds=time.time() - t0, peak_memory_mb=rt.peak_memory_mb(),
                           total_steps=total, epochs=epochs, global_batch_size=global_bs,
                           micro_batch_size=mb, grad_accum_steps=accum, world_size=world, mixed_precision=mp,
                           trainable_values=n_trainable, train_tokens=train_tokens, resumed_from_step=start_step,
                           completed=completed, eval_history=history, best_epoch=best_epoch,
                           epochs_run=epochs_run, distill=self.distill)
        if val_before is not None and val_after is not None and acc.is_main_process:
            log.info("E2E-QP: val loss %.4f -> %.4f%s, %.1fs", val_before, val_after,
                     f" (distillation mix {self.distill:g})" if self.distill else
                     f" (ppl {math.exp(val_before):.2f} -> {math.exp(val_after):.2f})", report.seconds)
        return report


def report_dict(report: E2EReport) -> dict:
    return asdict(report)


def held_out_summary(report: Optional[E2EReport]) -> str:
    """', val ppl X' for the log line that ends a run ('' without a held-out loss); a distilling run's
    held-out loss is not a perplexity."""
    if report is None or report.val_loss_after is None:
        return ""
    if report.distill:
        return f", held-out loss {report.val_loss_after:.4f} (distillation mix {report.distill:g})"
    return f", val ppl {math.exp(report.val_loss_after):.2f}"
