"""Block-AP: train every parameter of one decoder layer at a time against its full-precision output.

Two activation streams travel through the network: the fp stream (outputs of the original layers,
i.e. the targets) and the quant stream (outputs of the already-quantized layers, i.e. what the
quantized model really feeds the next layer). Only one decoder layer is resident on the compute
device at a time and the streams live in host memory, so peak device memory does not grow with depth.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .block_loss import BlockLoss
from .config import EQATConfig
from .layer_report import LayerReport
from .layer_forward import replaced_forwards
from .layout import ModelLayout, set_submodule
from .qweight import QuantizedWeight
from .quantizer import FakeQuantLinear
from .resume import LayerStore, run_fingerprint
from .runtime import Runtime
from .teacher import capture_teacher
from .transfer import batches_to_device, modules_on

log = logging.getLogger("effqat.block_ap")


class _StopForward(Exception):
    pass


@dataclass
class BlockAPResult:
    qweights: Dict[str, QuantizedWeight]
    reports: List[LayerReport] = field(default_factory=list)
    quant_lr: float = 0.0  # the rates of the last layer (those the lr search ended on)
    weight_lr: float = 0.0
    lr_scale: float = 0.0
    lr_fraction: float = 1.0  # lr_scale / the full auto raise (1.0 without a search); E2E-QP follows it

    @property
    def lr_search(self) -> List[dict]:
        return [{"layer": r.index, "trials": r.lr_search} for r in self.reports if r.lr_search]


def _to_device(obj, device, dtype=None):
    """Move tensors nested in kwargs (tuples of rotary cos/sin, masks) to ``device``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def allocate_stream(shape, dtype: torch.dtype, offload_dir: Optional[str], name: str) -> torch.Tensor:
    """An activation stream in host RAM, or memory-mapped from a file in ``offload_dir`` so that
    paper-scale calibration (thousands of samples x 2048 tokens x hidden) does not need the RAM."""
    if offload_dir is None:
        return torch.empty(*shape, dtype=dtype)
    os.makedirs(offload_dir, exist_ok=True)
    path = os.path.join(offload_dir, f"{name}.stream")
    if os.path.exists(path):
        os.remove(path)
    numel = 1
    for d in shape:
        numel *= int(d)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(*shape)


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerCall:
    """What one decoder layer is called with besides its hidden states: extra positional arguments
    and keyword arguments (attention mask, position ids, rotary cos/sin, ...)."""

    args: tuple
    kwargs: dict


@torch.no_grad()
def capture_layer_calls(hf_model: nn.Module, layout: ModelLayout, ids: torch.Tensor, device) -> List[LayerCall]:
    """The arguments the model's own forward passes to *each* decoder layer, captured at batch size 1
    so that they broadcast over any batch.

    Layers are not all called alike: Gemma 2/3 alternate sliding-window and full-attention masks and
    use another rotary base on local layers; other models build per-layer position inputs. Replaying
    layer 0's arguments for every layer would silently train later layers on the wrong inputs, so
    every layer's ``forward`` is briefly replaced by a recorder that passes its hidden states through
    unchanged: the model's loop computes each layer's real arguments without running (or even
    materializing) any layer weights.
    """
    layers = layout.layers
    calls: List[Optional[LayerCall]] = [None] * len(layers)
    last = len(layers) - 1

    def recorder(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[index] = LayerCall(args=tuple(args[1:]), kwargs=dict(kwargs))
            if index == last:
                raise _StopForward
            return hidden
        return forward

    try:
        with replaced_forwards(layers, recorder):
            hf_model(input_ids=ids[:1].to(device), use_cache=False)
    except _StopForward:
        pass
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called by {type(hf_model).__name__}.forward; "
                           "cannot capture their inputs")
    for call in calls:
        for key in ("past_key_value", "past_key_values"):
            call.kwargs.pop(key, None)
        call.kwargs["use_cache"] = False
    return [LayerCall(_to_device(c.args, "cpu"), _to_device(c.kwargs, "cpu")) for c in calls]


@torch.no_grad()
def capture_layer_inputs(hf_model: nn.Module, layout: ModelLayout, ids: torch.Tensor, batch_size: int,
                         runtime: Runtime, offload_dir: Optional[str] = None) -> Tuple[torch.Tensor, List[LayerCall]]:
    """Hidden states entering decoder layer 0 for every sample, and the arguments each decoder layer
    is called with (``capture_layer_calls``)."""
    layer0 = layout.layers[0]
    captured: Dict[str, object] = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    device = runtime.device
    # embeddings / rotary / norms on the compute device for the pass; layers stay put (the hook stops
    # the forward before layer 0 runs, and Block-AP moves one layer at a time)
    with modules_on(modules_outside_layers(hf_model, layout), device):
        calls = capture_layer_calls(hf_model, layout, ids, device)
        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)

        def run(batch):
            try:
                hf_model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            return captured["hidden"]

        try:
            hidden = allocate_stream((ids.shape[0], ids.shape[1], hf_model.config.hidden_size),
                                     runtime.stream_dtype, offload_dir, "fp")
            for i in range(0, ids.shape[0], batch_size):
                hidden[i:i + batch_size] = run(ids[i:i + batch_size]).to("cpu", runtime.stream_dtype)
        finally:
            handle.remove()
    return hidden, calls


def modules_outside_layers(hf_model, layout: ModelLayout) -> List[nn.Module]:
    """Embeddings, rotary embedding, final norm, head: everything not in a decoder layer."""
    inside_layers = {id(m) for m in layout.layers.modules()}  # the layers and everything in them
    return [m for m in hf_model.modules() if id(m) not in inside_layers]


MIN_LR_SCALE = 1.0  # the lr search never goes below the paper's rates (BlockAP._extend_search)

_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.")


class RoutedTokenCounter:
    """Counts the calibration rows that reach each quantized linear of a layer during training.

    An MoE expert the router never picks receives no gradient, so its weights, scales and zero
    points keep their min/max initialization; ``experts_without_tokens`` makes that visible.
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.rows = dict.fromkeys(modules, 0)
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def count(_module, args):
            x = args[0]
            self.rows[name] += x.numel() // max(x.shape[-1], 1)
        return count

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def experts(self) -> Tuple[int, int]:
        """(experts, experts none of whose linears saw a token)."""
        seen: Dict[str, int] = {}
        for name, rows in self.rows.items():
            m = _EXPERT.match(name)
            if m:
                seen[m.group(1)] = seen.get(m.group(1), 0) + rows
        return len(seen), sum(1 for rows in seen.values() if rows == 0)


@dataclass
class _TrainedLayer:
    qweights: Dict[str, QuantizedWeight]
    state: Dict[str, torch.Tensor]  # trained parameters outside the quantized linears
    train_loss: float
    best_epoch: int
    steps: int
    experts: int
    experts_without_tokens: int


def _cosine(step: int, total: int, min_ratio: float) -> float:
    if total <= 1:
        return 1.0
    progress = min(1.0, step / (total - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BlockAP:
    """Runs Block-AP over all decoder layers of ``hf_model`` in place."""

    def __init__(self, hf_model: nn.Module, layout: ModelLayout, cfg: EQATConfig, runtime: Runtime,
                 show_progress: bool = True, layer_source=None, keep_qweights: bool = True):
        """``layer_source``: optional object with ``materialize(i)`` / ``release(i)``, called around
        each layer's turn, for models whose decoder layers are not resident (see ``streaming.py``).
        ``keep_qweights=False``: finished layers' integers are not accumulated in the result (they
        are in the work folder), so host memory does not grow with depth.

        With E2E-QP distilling (``cfg.e2e_distill``), :attr:`teacher` holds the fp model's top-k
        next-token log-probabilities on every calibration row after :meth:`run` (``teacher.py``)."""
        self.model, self.layout, self.cfg, self.rt = hf_model, layout, cfg, runtime
        self.show_progress = show_progress
        self.layer_source = layer_source
        self.keep_qweights = keep_qweights
        self.teacher = None
        self._block_loss = BlockLoss(getattr(cfg, "block_loss", "mse"))  # refitted per layer (quantize_layer)

    def steps_per_layer(self, n_train: int) -> int:
        return self.cfg.block_epochs * math.ceil(n_train / self.cfg.block_batch_size)

    def run(self, train_ids: torch.Tensor, val_ids: Optional[torch.Tensor],
            work_dir: Optional[str] = None, offload_dir: Optional[str] = None) -> BlockAPResult:
        """Quantize every layer; with ``work_dir``, each finished layer is persisted and a restarted
        run with the same settings and data continues from the next layer (same result).

        The two activation streams are updated in place layer by layer (two stream-sized buffers in
        all); with ``offload_dir`` they are memory-mapped files there instead of RAM (removed at the end).
        """
        cfg = self.cfg
        n_train = train_ids.shape[0]
        all_ids = train_ids if val_ids is None else torch.cat([train_ids, val_ids])
        train_tokens = n_train * train_ids.shape[1] * cfg.block_epochs
        quant_lr, weight_lr = cfg.block_lrs(train_tokens)
        self.train_tokens = train_tokens
        self.lr_candidates = cfg.block_lr_candidates(train_tokens) if val_ids is not None else []
        n_layers = len(self.layout.layers)
        n = cfg.block_lr_recheck if self.lr_candidates else 0
        self.lr_recheck_layers = sorted({round(n_layers * j / (n + 1)) for j in range(1, n + 1)} - {0})
        log.info("Block-AP: %d layers, %d train / %d val samples x %d tokens, %d steps per layer, "
                 "lr s/z %.3g, lr weights/norms %.3g", n_layers, n_train,
                 all_ids.shape[0] - n_train, train_ids.shape[1], self.steps_per_layer(n_train), quant_lr, weight_lr)
        if self.lr_candidates:
            log.info("Block-AP: choosing the rates on layer 0 among %s by held-out loss (extended past the edge "
                     "while the lowest or highest scale wins, within [%g, %g]), checked against half of them on "
                     "layers %s", ", ".join(f"scale {c['scale']:g}" for c in self.lr_candidates), MIN_LR_SCALE,
                     cfg.max_lr_scale, self.lr_recheck_layers or "none")
        store = None
        if work_dir is None and not self.keep_qweights:
            raise ValueError("keep_qweights=False needs a work_dir: finished layers live only there")
        if work_dir is not None:
            store = LayerStore(work_dir, run_fingerprint(self.model, self.layout, cfg, all_ids, n_train))
        try:
            return self._run_layers(all_ids, n_train, quant_lr, weight_lr, store, work_dir, offload_dir)
        finally:
            if offload_dir is not None:
                for name in ("fp", "quant"):
                    path = os.path.join(offload_dir, f"{name}.stream")
                    if os.path.exists(path):
                        os.remove(path)

    def _run_layers(self, all_ids, n_train, quant_lr, weight_lr, store, work_dir, offload_dir) -> BlockAPResult:
        cfg, rt = self.cfg, self.rt
        n_layers = len(self.layout.layers)
        fp_stream, self.layer_calls = capture_layer_inputs(self.model, self.layout, all_ids,
                                                            cfg.block_batch_size, rt, offload_dir)
        quant_stream = allocate_stream(fp_stream.shape, fp_stream.dtype, offload_dir, "quant")
        quant_stream.copy_(fp_stream)
        result = BlockAPResult(qweights={}, quant_lr=quant_lr, weight_lr=weight_lr)
        done = store.completed() if store else 0
        if done:
            log.info("Block-AP: resuming from %s, layers 0..%d already done", work_dir, done - 1)
            last = store.load(done - 1).report
            if last.lr_scale:  # the rates the lr search had arrived at hold for the next layers
                result.quant_lr, result.weight_lr, result.lr_scale = last.quant_lr, last.weight_lr, last.lr_scale
        layers = tqdm(range(n_layers), desc="Block-AP layers", disable=not self.show_progress)
        for index in layers:
            if self.layer_source is not None:
                self.layer_source.materialize(index)
            if index < done:
                saved = store.load(index)
                fp_stream, quant_stream = self.replay_layer(index, fp_stream, quant_stream, saved)
                qweights, report = saved.qweights, saved.report
            else:
                fp_stream, quant_stream, qweights, report, state = self.quantize_layer(
                    index, fp_stream, quant_stream, n_train, result.quant_lr, result.weight_lr,
                    self._lr_trials(index, result.lr_scale))
                if report.lr_search:
                    result.quant_lr, result.weight_lr, result.lr_scale = report.quant_lr, report.weight_lr, report.lr_scale
                report.lr_scale = result.lr_scale  # what a resume after this layer continues with
                if store:
                    store.save(index, qweights, state, report)
            if self.layer_source is not None:
                self.layer_source.release(index)
            if self.keep_qweights:
                result.qweights.update(qweights)
            del qweights
            result.reports.append(report)
            val = "n/a" if report.val_loss is None else f"{report.val_loss:.3e}"
            moe = (f", experts without calibration tokens {report.experts_without_tokens}/{report.experts}"
                   if report.experts else "")
            log.info("Block-AP layer %d/%d: train loss %.3e, val loss %s, %.1fs, peak memory %.0f MB%s%s",
                     index + 1, n_layers, report.train_loss, val, report.seconds,
                     report.peak_memory_mb, moe, " (restored)" if index < done else "")
        if result.lr_scale and self.lr_candidates:
            result.lr_fraction = result.lr_scale / max(c["scale"] for c in self.lr_candidates)
        if getattr(cfg, "e2e_distill", 0.0) > 0 and cfg.e2e_epochs > 0:
            # fp_stream now holds the fp model's hidden states leaving its last layer
            outside = modules_outside_layers(self.model, self.layout)
            self.teacher = capture_teacher(self.model, self.layout.layers, outside, all_ids, fp_stream,
                                           cfg.e2e_distill_topk, cfg.block_batch_size, rt.device)
            log.info("Block-AP: kept the fp model's top-%d next-token log-probabilities on %d x %d tokens for "
                     "E2E-QP's distillation", self.teacher.token_ids.shape[-1], all_ids.shape[0], all_ids.shape[1])
        return result

    def _lr_trials(self, index: int, scale: float) -> List[dict]:
        """The rates the lr search tries on layer ``index``: layer 0 all candidates, a recheck layer
        the current raise and half of it (deeper layers, fed by more quantization error, overfit a
        small calibration set sooner), other layers none (the current rates). ``quantize_layer`` extends
        either list past its edge while an edge wins (``_extend_search``)."""
        if index == 0:
            return [dict(c) for c in self.lr_candidates]
        if index in self.lr_recheck_layers and scale / 2 >= 1.0:
            return [self.cfg.block_lr_trial(self.train_tokens, s) for s in (scale / 2, scale)]
        return []

    def _extend_search(self, trials: List[dict]) -> Optional[dict]:
        """The next candidate when the best so far lies at an edge of the scales tried: half the lowest
        when the lowest wins, double the highest when the highest wins; None when the best is interior
        or the edge is a bound.

        Bounds: ``MIN_LR_SCALE`` (1 = the paper's rates, tuned for 2 x 4096 x 2048 tokens per block: a
        run that sees fewer tokens has no reason to move its parameters less than that) and
        ``max_lr_scale`` above (the user's cap on any raise; under the default 128 the full raise of
        a small run already sits on it, so upward steps only happen for runs nearer the paper's budget).
        A candidate whose training diverged (``diverged``, no ``val_loss``) ranks below every other,
        so the search never goes past it and, if all diverged, goes downwards."""
        scales = [t["scale"] for t in trials]
        scored = [t for t in trials if "val_loss" in t]
        best = min(scored, key=lambda t: t["val_loss"]) if scored else {"scale": min(scales)}
        if best["scale"] <= min(scales) and best["scale"] > MIN_LR_SCALE:
            return self.cfg.block_lr_trial(self.train_tokens, max(MIN_LR_SCALE, best["scale"] / 2))
        if scored and best["scale"] >= max(scales) and best["scale"] < self.cfg.max_lr_scale:
            return self.cfg.block_lr_trial(self.train_tokens, min(self.cfg.max_lr_scale, best["scale"] * 2))
        return None

    # -- one layer -------------------------------------------------------------------------------

    def _forward(self, index: int, layer, x):
        """Layer ``index`` (or its trainable copy) on ``x`` with the arguments the model gives it."""
        call = self.layer_calls[index]
        args, kwargs = _to_device((call.args, call.kwargs), self.rt.device)
        with self.rt.autocast():
            return _layer_output(layer(x, *args, **kwargs))

    @torch.no_grad()
    def _propagate(self, index: int, layer, stream: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` over the stream in place: samples are independent, so each batch's output
        overwrites its own input (halves stream memory; the input stream is not needed afterwards)."""
        for i, j, x in batches_to_device(stream, self.cfg.block_batch_size, self.rt.device):
            stream[i:j] = self._forward(index, layer, x).to("cpu", stream.dtype)
        return stream

    def _loss_on(self, index: int, layer, inputs, targets, start, stop) -> float:
        """Mean ``block_loss`` of ``layer`` over rows ``start:stop`` (the held-out rows, in practice)."""
        total, count = 0.0, 0
        bs = self.cfg.block_batch_size
        with torch.no_grad():
            for i in range(start, stop, bs):
                j = min(i + bs, stop)
                y = self._forward(index, layer, inputs[i:j].to(self.rt.device, torch.float32))
                total += self._block_loss(y.float(), targets[i:j].to(self.rt.device, torch.float32)).item() * (j - i)
                count += j - i
        return total / max(count, 1)

    def quantize_layer(self, index: int, fp_in: torch.Tensor, q_in: torch.Tensor, n_train: int,
                       quant_lr: float, weight_lr: float, candidates: Optional[List[dict]] = None):
        """Train layer ``index``, freeze it, and advance both streams through it.

        ``candidates`` (lr search, ``_lr_trials``): dicts with ``scale`` / ``quant_lr`` / ``weight_lr``;
        the layer is trained once per candidate from the same start and the one whose frozen layer has
        the lowest held-out loss is kept (each candidate's loss is written into its dict). While the
        best lies at an edge of the scales tried, one more candidate beyond it is appended
        (``_extend_search``), so the report lists every candidate in the order tried. The streams are
        touched once, so a search costs extra training only, no extra stream memory.
        """
        t0 = time.time()
        self.rt.reset_peak()
        original = self.layout.layers[index]
        fp_out = self._propagate(index, copy.deepcopy(original).to(self.rt.device, torch.float32), fp_in)
        self._block_loss.fit(fp_out, n_train, self.cfg.block_batch_size)
        searching = bool(candidates) and len(candidates) > 1
        trials = list(candidates) if searching else [{"quant_lr": quant_lr, "weight_lr": weight_lr}]
        best, tried = None, 0
        while tried < len(trials) or (searching and self._append(trials)):
            trial = trials[tried]
            tried += 1
            try:
                trained = self._train_layer(index, original, fp_out, q_in, n_train, trial["quant_lr"],
                                            trial["weight_lr"])
            except FloatingPointError as e:
                if not searching:
                    raise
                trial["diverged"] = True   # no val_loss: strict JSON has no inf, and it ranks last anyway
                log.info("Block-AP layer %d, lr scale %g diverged (%s)", index, trial.get("scale", 0), e)
                continue
            if searching:
                held_out = self._quantized_layer(index, original, trained.state, trained.qweights)
                trial["val_loss"] = self._loss_on(index, held_out, q_in, fp_out, n_train, q_in.shape[0])
                del held_out
                log.info("Block-AP layer %d, lr scale %g (s/z %.3g, weights %.3g): held-out loss %.4e",
                         index, trial.get("scale", 0), trial["quant_lr"], trial["weight_lr"], trial["val_loss"])
                if best is not None and trial["val_loss"] >= best[0]["val_loss"]:
                    continue
            best = (trial, trained)
        if best is None:
            raise FloatingPointError(f"Block-AP layer {index}: training diverged at every lr scale tried "
                                     f"({[t['scale'] for t in trials]}); set lower rates (--block-quant-lr / --block-weight-lr)")
        trial, trained = best
        fp_out_done, q_out, val_loss = self._finish_layer(index, original, trained.state, trained.qweights,
                                                          fp_out, q_in, n_train)
        report = LayerReport(index=index, train_loss=trained.train_loss, val_loss=val_loss,
                             best_epoch=trained.best_epoch, seconds=time.time() - t0,
                             peak_memory_mb=self.rt.peak_memory_mb(), steps=trained.steps,
                             experts=trained.experts, experts_without_tokens=trained.experts_without_tokens,
                             quant_lr=trial["quant_lr"], weight_lr=trial["weight_lr"],
                             lr_scale=trial.get("scale", 0.0),
                             lr_search=list(trials) if searching else [])
        return fp_out_done, q_out, trained.qweights, report, trained.state

    def _append(self, trials: List[dict]) -> bool:
        nxt = self._extend_search(trials)
        if nxt is not None:
            trials.append(nxt)
        return nxt is not None

    def _train_layer(self, index: int, original: nn.Module, fp_out: torch.Tensor, q_in: torch.Tensor,
                     n_train: int, quant_lr: float, weight_lr: float) -> "_TrainedLayer":
        """Block-AP proper on one layer: a trainable fp32 copy with fake-quantized linears, trained on
        the quant stream against the fp targets; returns the frozen integers and the other trained
        parameters. Neither the model nor the streams are modified."""
        cfg, rt = self.cfg, self.rt
        layer = copy.deepcopy(original).to(rt.device, torch.float32)
        imatrix = self._importance(index, layer, q_in, n_train)
        fq: Dict[str, nn.Module] = {}
        for name in self.layout.names_in(index):
            fq[name] = self._trainable(index, name, layer.get_submodule(name), imatrix.get(name)).to(rt.device)
            set_submodule(layer, name, fq[name])
        quant_params = [p for m in fq.values() for p in m.quant_parameters()]
        quant_ids = {id(p) for p in quant_params}
        other_params = [p for p in layer.parameters() if id(p) not in quant_ids and p.is_floating_point()]
        for p in layer.parameters():
            p.requires_grad_(True)
        # fields of another scale than a uniform grid's step (GGUF K types) get their own relative rates
        mult = {k: v for m in fq.values() for k, v in getattr(m, "lr_multipliers", dict)().items()}
        groups = [([p], quant_lr * mult[id(p)]) for p in quant_params if id(p) in mult]
        plain = [p for p in quant_params if id(p) not in mult]
        groups = ([(plain, quant_lr)] if plain or not groups else []) + groups + [(other_params, weight_lr)]
        opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups],
                                weight_decay=cfg.block_weight_decay)
        base_lrs = [lr for _, lr in groups]
        scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler() else None

        bs = cfg.block_batch_size
        steps = self.steps_per_layer(n_train)
        n_total = q_in.shape[0]
        has_val = n_total > n_train
        best = (float("inf"), None, -1)
        bad_epochs, step, train_loss = 0, 0, float("nan")
        bar = tqdm(total=steps, desc=f"layer {index}", leave=False, disable=not self.show_progress)
        routed = RoutedTokenCounter(fq)
        for epoch in range(cfg.block_epochs):
            epoch_loss, seen = 0.0, 0
            for i in range(0, n_train, bs):
                j = min(i + bs, n_train)
                factor = _cosine(step, steps, cfg.block_min_lr_ratio)
                for group, lr in zip(opt.param_groups, base_lrs):
                    group["lr"] = lr * factor
                x = q_in[i:j].to(rt.device, torch.float32)
                target = fp_out[i:j].to(rt.device, torch.float32)
                loss = self._block_loss(self._forward(index, layer, x).float(), target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Block-AP layer {index}: loss became {loss.item()} at step {step}; "
                                             "lower the learning rates (--block-quant-lr/--block-weight-lr)")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                epoch_loss += loss.item() * (j - i)
                seen += j - i
                step += 1
                bar.update(1)
            train_loss = epoch_loss / max(seen, 1)
            routed.remove()  # one pass over the training samples is counted; validation rows are not
            monitor = self._loss_on(index, layer, q_in, fp_out, n_train, n_total) if has_val else train_loss
            bar.set_postfix(train=f"{train_loss:.2e}", val=f"{monitor:.2e}" if has_val else "-")
            if monitor < best[0]:
                keep = copy.deepcopy(layer.state_dict()) if cfg.block_early_stop else None
                best, bad_epochs = (monitor, keep, epoch), 0
            else:
                bad_epochs += 1
                if cfg.block_early_stop and bad_epochs >= cfg.block_early_stop:
                    log.info("Block-AP layer %d: early stop after epoch %d (best %d)", index, epoch, best[2])
                    break
        bar.close()
        if cfg.block_early_stop and best[1] is not None:
            layer.load_state_dict(best[1])

        # freeze: integers + fp16 scales; the quant stream then sees exactly what the checkpoint computes
        prefix = self.layout.layer_name(index)
        qweights = {f"{prefix}.{name}": m.freeze(torch.float16) for name, m in fq.items()}
        experts, idle = routed.experts()
        return _TrainedLayer(qweights=qweights, state=self._trained_state(index, layer), train_loss=train_loss,
                             best_epoch=best[2], steps=step, experts=experts, experts_without_tokens=idle)

    def _trainable(self, index: int, name: str, linear: nn.Module, imatrix) -> nn.Module:
        """Block-AP's fake-quantized form of one linear: effqat's uniform grid, or the llama.cpp block
        type the run's GGUF preset gave this module (``gguf_weights.trainable``)."""
        qtype = self.cfg.gguf_module_types.get(f"{self.layout.layer_name(index)}.{name}")
        if qtype is None:
            return FakeQuantLinear(linear, self.cfg.bits, self.cfg.group_size, sym=self.cfg.sym)
        from .gguf_weights import trainable

        return trainable(linear, qtype, imatrix)

    @torch.no_grad()
    def _importance(self, index: int, layer: nn.Module, q_in: torch.Tensor, n_train: int) -> Dict[str, torch.Tensor]:
        """Per GGUF-typed linear of layer ``index``: the mean square of each input column over the
        training samples of the quant stream (what ``llama-imatrix`` collects, on the inputs the
        quantized layer really gets), for llama.cpp's fit at initialization. Empty for uniform runs."""
        prefix = self.layout.layer_name(index)
        names = [n for n in self.layout.names_in(index) if f"{prefix}.{n}" in self.cfg.gguf_module_types]
        if not names or not self.cfg.gguf_imatrix:
            return {}
        sums = {n: torch.zeros(layer.get_submodule(n).in_features, dtype=torch.float64) for n in names}
        rows = dict.fromkeys(names, 0)

        def hook(name):
            def collect(_module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] += (x * x).sum(0).cpu()
                rows[name] += x.shape[0]
            return collect

        handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            for _, _, x in batches_to_device(q_in, self.cfg.block_batch_size, self.rt.device, stop=n_train):
                self._forward(index, layer, x)
        finally:
            for h in handles:
                h.remove()
        return {n: (sums[n] / max(rows[n], 1)).float() for n in names}

    def _trained_state(self, index: int, layer: nn.Module) -> Dict[str, torch.Tensor]:
        """The trained parameters outside the quantized linears (norms, other biases), fp32 on CPU."""
        linear_prefixes = tuple(n + "." for n in self.layout.names_in(index))
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in layer.state_dict().items()
                if not k.startswith(linear_prefixes) and v.is_floating_point()}

    def _quantized_layer(self, index: int, original: nn.Module, state, qweights) -> nn.Module:
        """fp32 copy of the layer as the checkpoint computes it: trained norms, dequantized linears."""
        layer = copy.deepcopy(original).to(self.rt.device, torch.float32)
        layer.load_state_dict(state, strict=False)
        prefix = self.layout.layer_name(index)
        for name in self.layout.names_in(index):
            qw = qweights[f"{prefix}.{name}"]
            plain = nn.Linear(qw.in_features, qw.out_features, bias=qw.bias is not None).to(self.rt.device)
            plain.weight.data = qw.dequantize(torch.float32).to(self.rt.device)
            if qw.bias is not None:
                plain.bias.data = qw.bias.detach().float().to(self.rt.device)
            set_submodule(layer, name, plain)
        return layer.requires_grad_(False)

    def _finish_layer(self, index, original, state, qweights, fp_out, q_in, n_train):
        layer = self._quantized_layer(index, original, state, qweights)
        n_total = q_in.shape[0]
        val_loss = self._loss_on(index, layer, q_in, fp_out, n_train, n_total) if n_total > n_train else None
        q_out = self._propagate(index, layer, q_in)
        self._write_back(original, layer)
        return fp_out, q_out, val_loss

    def replay_layer(self, index: int, fp_in: torch.Tensor, q_in: torch.Tensor, saved):
        """Recompute both streams through an already-finished layer (resume) exactly as the first run did."""
        original = self.layout.layers[index]
        fp_out = self._propagate(index, copy.deepcopy(original).to(self.rt.device, torch.float32), fp_in)
        layer = self._quantized_layer(index, original, saved.state, saved.qweights)
        q_out = self._propagate(index, layer, q_in)
        self._write_back(original, layer)
        return fp_out, q_out

    def _write_back(self, original: nn.Module, trained: nn.Module) -> None:
        """Copy the trained non-linear parameters (norms, biases of non-quantized parts) into the model.

        Quantized linears are swapped for packed modules afterwards by the caller; here their fp
        weights get the dequantized values so the model is consistent even before that swap.
        """
        trained_state = trained.state_dict()
        with torch.no_grad():
            for name, tensor in original.state_dict(keep_vars=True).items():
                if name in trained_state and trained_state[name].shape == tensor.shape:
                    tensor.data.copy_(trained_state[name].to(tensor.device, tensor.dtype))
