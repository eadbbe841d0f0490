"""EfficientQAT on a model folder that is never held whole in memory: streamed Block-AP, then either an
incremental write or E2E-QP on the packed model.

The counterpart of ``eqat_run.run_eqat`` (which quantizes a model already in memory) for the CLI:
decoder layers come from the safetensors shards one at a time (``streaming.StreamedModel``), each
finished layer goes to the Block-AP work folder (``resume.LayerStore``, which also makes the run
resumable), and the checkpoint is assembled from that folder one layer at a time
(``converters.incremental``). The result is byte-for-byte what the in-memory path writes: same
Block-AP numerics (layers are upcast exactly as a fully upcast model would be), same tensor order.

With E2E-QP, the model is rebuilt from what Block-AP wrote, packed (2-4 bits per weight plus the
16-bit non-layer modules), so that phase too fits where the fp model would not.
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Optional

import torch

from .block_ap import BlockAP
from .config import EQATConfig
from .layout import check_fully_quantized, definition_for, resolve_layout
from .eqat_run import EQATResult, collect_qweights, prepare_calibration, prepare_e2e_data, with_self_generated
from .resume import LayerStore
from .runtime import resolve_runtime, seed_everything
from .streaming import StreamedModel

log = logging.getLogger("effqat")


def _out_dtype(source: torch.dtype) -> torch.dtype:
    """The 16-bit dtype the checkpoint's non-quantized tensors are written in (as ``run_eqat``)."""
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def _layer_index(key: str, prefix: str) -> Optional[tuple]:
    if not key.startswith(prefix):
        return None
    index, _, rest = key[len(prefix):].partition(".")
    return int(index), rest


class StreamedQuantization:
    """One run: ``block_ap()``, then ``finish()``: ``save()`` (incremental, no E2E-QP) or ``e2e_and_save()``."""

    def __init__(self, model_dir: str, cfg: EQATConfig, work_dir: str, tokenizer=None,
                 show_progress: bool = True):
        self.cfg, self.work_dir, self.tokenizer, self.show_progress = cfg, work_dir, tokenizer, show_progress
        self.rt = resolve_runtime(cfg.compute_device, cfg.amp_dtype)
        self.model_dir = model_dir
        self.sm = StreamedModel(model_dir)
        self.model = self.sm.model
        self.layout = resolve_layout(self.model, definition_for(self.model.config.model_type), cfg)
        self.result: Optional[EQATResult] = None
        self.gguf_plan = None
        self._teacher = None   # the fp model's logits for E2E-QP's distillation (BlockAP.teacher)
        if cfg.save_format == "gguf":   # every linear's llama.cpp block type, before anything trains
            from .gguf_run import describe, plan_types

            self.gguf_plan = plan_types(model_dir, self.model, self.quantized_names, cfg.gguf_type)
            cfg.gguf_module_types = dict(self.gguf_plan.modules)
            log.info("GGUF %s: %s", cfg.gguf_type, describe(self.gguf_plan))

    @property
    def quantized_names(self) -> list:
        return self.layout.quantized_names()

    def block_ap(self, calibration, seq_len: Optional[int] = None, offload_dir: Optional[str] = None,
                 e2e_data=None, self_generated: Optional[torch.Tensor] = None) -> EQATResult:
        """Block-AP over the streamed layers; ``e2e_data`` (as ``run_eqat``'s) is checked now, before
        hours of Block-AP, and used by :meth:`e2e_and_save`; ``self_generated`` samples join both
        phases' training data (``with_self_generated``)."""
        t0 = time.time()
        ids, train_ids, val_ids = prepare_calibration(self.model, self.layout, self.cfg, calibration,
                                                      self.tokenizer, seq_len)
        e2e_ids = prepare_e2e_data(self.model, self.cfg, e2e_data, self.tokenizer, seq_len, default=train_ids)
        block_train, e2e_ids = with_self_generated(self.cfg, train_ids, e2e_ids, self_generated)
        self.sm.attach_layout(self.layout)
        # The in-memory path runs a CPU model upcast to fp32 and a CUDA model in its own dtype.
        compute = torch.float32 if self.rt.device.type == "cpu" else self.sm.dtype
        handle = self.sm.upcast_embedding_output(compute) if compute != self.sm.dtype else None
        seed_everything(self.cfg.seed)
        try:
            block_ap = BlockAP(self.model, self.layout, self.cfg, self.rt, self.show_progress,
                               layer_source=self.sm, keep_qweights=False)
            block = block_ap.run(block_train, val_ids, work_dir=self.work_dir, offload_dir=offload_dir)
            self._teacher = block_ap.teacher
        finally:
            if handle is not None:
                handle.remove()
        store = LayerStore.reopen(self.work_dir)  # what Block-AP really quantized (as run_eqat checks)
        done = [name for i in range(len(self.layout.layers)) for name in store.module_shapes(i)]
        check_fully_quantized(self.layout, done, self.model.config.model_type)
        self.result = EQATResult(
            qweights={}, block_ap=block, e2e=None, n_train=train_ids.shape[0],
            n_val=0 if val_ids is None else val_ids.shape[0], seq_len=ids.shape[1], seconds=time.time() - t0,
            source_dtype=_out_dtype(self.sm.source_dtype),
            extra={"base_model": getattr(self.model.config, "_name_or_path", None) or None,
                   "e2e_samples": 0, "e2e_seq_len": int(e2e_ids.shape[1]),
                   "self_generated": 0 if self_generated is None else int(self_generated.shape[0]),
                   "block_ap_samples": int(block_train.shape[0])})
        self._t0 = t0
        self._calibration = (e2e_ids, val_ids)
        return self.result

    def finish(self, out_dir: str, fmt: Optional[str] = None, overwrite: bool = False,
               max_shard_size: str = "4GB") -> dict:
        """After :meth:`block_ap`: E2E-QP and save when the config asks for E2E-QP, else the
        incremental save; returns the save report."""
        step = self.e2e_and_save if self.cfg.e2e_epochs > 0 else self.save
        return step(out_dir, fmt=fmt, overwrite=overwrite, max_shard_size=max_shard_size)

    # -- incremental write (no E2E-QP) -------------------------------------------------------------
    def _items(self, store: LayerStore):
        """Non-quantized tensors in state-dict order (as ``non_quantized_tensors``), then the modules."""
        from .layout import tied_output_keys

        dtype = self.result.source_dtype
        prefixes = tuple(n + "." for n in self.quantized_names)
        tied = tied_output_keys(self.model)
        layer_prefix = self.layout.layers_prefix + "."
        cached = (None, None, None)  # layer index, its trained state, the layer as read from the shards
        for key, value in self.model.state_dict().items():
            if key.startswith(prefixes) or key in tied:
                continue
            where = _layer_index(key, layer_prefix)
            if where is not None:
                index, rest = where
                if cached[0] != index:
                    if cached[2] is not None:
                        self.sm.release(cached[0])
                    cached = (index, store.load_state(index), None)
                value = cached[1].get(rest)
                if value is None:  # not trained (non-float buffer): from the source shards, as loaded
                    if cached[2] is None:
                        cached = (index, cached[1], self.sm.load_layer(index).state_dict())
                    value = cached[2][rest]
            if value.is_floating_point():
                value = value.to(dtype)
            yield key, value.contiguous()
        if cached[2] is not None:
            self.sm.release(cached[0])
        self.sm.folder.close()
        for index in range(len(self.layout.layers)):
            saved = store.load(index)
            prefix = self.layout.layer_name(index)
            for name in self.layout.names_in(index):
                yield f"{prefix}.{name}", saved.qweights[f"{prefix}.{name}"]
            del saved

    def save(self, out_dir: str, fmt: Optional[str] = None, overwrite: bool = False,
             max_shard_size: str = "4GB") -> dict:
        """Write the checkpoint from the work folder, one layer at a time."""
        from .converters.incremental import spec_from_shapes

        store = LayerStore.reopen(self.work_dir)
        if self.gguf_plan is not None:
            self.result.seconds = time.time() - self._t0
            return self._write_gguf(out_dir, overwrite, self._items(store))
        specs = {}
        for index in range(len(self.layout.layers)):
            for name, s in store.module_shapes(index).items():
                specs[name] = spec_from_shapes(name, s["bits"], s["group_size"], s["weight_shape"],
                                               s["zeros_shape"], s["has_bias"])
        self.result.seconds = time.time() - self._t0
        return self._write(out_dir, fmt, overwrite, max_shard_size, specs, self._items(store))

    def _write_gguf(self, out_path: str, overwrite: bool, items) -> dict:
        from .gguf_run import write_gguf_file

        report = write_gguf_file(out_path, self.model_dir, self.model, self.tokenizer, self.result.source_dtype,
                                 items, self.gguf_plan, overwrite=overwrite, meta=self.result.meta(self.cfg))
        log.info("saved GGUF %s to %s", self.cfg.gguf_type, out_path)
        return report

    def _write(self, out_dir, fmt, overwrite, max_shard_size, specs, items) -> dict:
        from .converters.incremental import save_quantized_stream
        from .integration import stage_config_files

        fmt = fmt or self.cfg.save_format
        staging = stage_config_files(self.model, self.tokenizer, self.result.source_dtype)
        try:
            report = save_quantized_stream(out_dir, fmt=fmt, specs=specs, items=items,
                                           config_dir_or_files=staging, meta={"eqat": self.result.meta(self.cfg)},
                                           overwrite=overwrite, max_shard_size=max_shard_size,
                                           sym=self.cfg.sym)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("saved %s checkpoint to %s (written module by module)", fmt, out_dir)
        return report

    # -- E2E-QP on the packed model ----------------------------------------------------------------
    def packed_model(self):
        """The model as Block-AP left it: packed linears from the work folder, trained norms, the
        non-layer modules in the dtype the in-memory path trains them in."""
        from accelerate.utils import set_module_tensor_to_device

        from .loading import install_packed_linears

        store = LayerStore.reopen(self.work_dir)
        if self.rt.device.type == "cpu":
            self.model.float()  # as run_eqat: CPU E2E-QP trains in fp32
        for index in range(len(self.layout.layers)):
            linear_prefixes = tuple(n + "." for n in self.layout.names_in(index))
            saved = store.load(index)
            layer = self.layout.layers[index]
            source = None  # the layer as read from the shards, for what Block-AP did not train
            for name, meta_value in layer.state_dict().items():
                if name.startswith(linear_prefixes) or not meta_value.is_meta:
                    continue
                value = saved.state.get(name)
                if value is None:
                    if source is None:
                        source = self.sm.load_layer(index).state_dict()
                        layer = self.layout.layers[index]
                        if self.rt.device.type == "cpu":
                            layer.float()  # as the rest of the model (non-persistent buffers too)
                    value = source[name]
                set_module_tensor_to_device(layer, name, "cpu", value=value,
                                            dtype=meta_value.dtype if value.is_floating_point() else None)
            del source
            install_packed_linears(self.model, saved.qweights, self.cfg.e2e_train_zeros, torch.device("cpu"))
        self.sm.folder.close()
        return self.model

    def e2e_and_save(self, out_dir: str, fmt: Optional[str] = None, overwrite: bool = False,
                     max_shard_size: str = "4GB") -> dict:
        from .e2e_qp import E2EQP, held_out_summary
        from .kernels import use_backend

        model = self.packed_model()
        train_ids, val_ids = self._calibration
        on_device = self.rt.device.type != "cpu"
        if on_device:
            model.to(self.rt.device)
        with use_backend(self.cfg.kernel_backend):
            self.result.e2e = E2EQP(model, self.cfg, self.rt, self.show_progress,
                                   lr_fraction=self.result.block_ap.lr_fraction).run(train_ids, val_ids,
                                                                                     teacher=self._teacher)
        self.result.extra["e2e_samples"] = int(train_ids.shape[0])
        if on_device:
            model.to("cpu")
        self.result.seconds = time.time() - self._t0
        e2e = self.result.e2e
        log.info("EQAT done in %.1fs%s", self.result.seconds, held_out_summary(e2e))
        if self.gguf_plan is not None:
            return self._write_gguf(out_dir, overwrite, self._packed_items(model))
        return self._write(out_dir, fmt, overwrite, max_shard_size, self._packed_specs(model),
                           self._packed_items(model))

    def _packed_specs(self, model) -> dict:
        from .converters.incremental import spec_from_shapes
        from .qweight import n_groups_for

        specs = {}
        for name in self.quantized_names:
            m = model.get_submodule(name)
            specs[name] = spec_from_shapes(name, m.bits, m.group_size, (m.out_features, m.in_features),
                                           (m.out_features, n_groups_for(m.in_features, m.group_size)),
                                           m.bias is not None)
        return specs

    def _packed_items(self, model):
        """As ``save_eqat_checkpoint`` orders them, one module unpacked at a time."""
        from .integration import non_quantized_tensors

        names = self.quantized_names
        yield from non_quantized_tensors(model, names, self.result.source_dtype).items()
        for name in names:
            module = model.get_submodule(name)
            if hasattr(module, "to_frozen"):   # a llama.cpp block type (gguf_weights)
                yield name, module.to_frozen()
            else:
                yield name, collect_qweights(model, [name])[name]


class InMemoryQuantization:
    """The ``block_ap`` / ``finish`` interface of :class:`StreamedQuantization` on the whole model loaded
    through ``GPTQModel.load`` (``effqat quantize --in-memory``): ``run_eqat`` runs Block-AP and, when
    configured, E2E-QP in :meth:`block_ap`. Same result as the streamed run (the architecture matrix
    checks it tensor for tensor); host memory grows with the model (fp32)."""

    def __init__(self, model_dir: str, cfg: EQATConfig, work_dir: str, show_progress: bool = True):
        from gptqmodel import GPTQModel

        self.cfg, self.work_dir, self.show_progress = cfg, work_dir, show_progress
        self.qmodel = GPTQModel.load(model_dir, cfg, dtype=torch.float32)
        self.model, self.tokenizer = self.qmodel.model, self.qmodel.tokenizer
        self.result: Optional[EQATResult] = None

    def block_ap(self, calibration, seq_len: Optional[int] = None, offload_dir: Optional[str] = None,
                 e2e_data=None, self_generated: Optional[torch.Tensor] = None) -> EQATResult:
        self.qmodel.quantize(calibration, seq_len=seq_len, show_progress=self.show_progress,
                             work_dir=self.work_dir, offload_dir=offload_dir, e2e_data=e2e_data,
                             self_generated=self_generated)
        self.result = self.qmodel._eqat_result
        return self.result

    def save(self, out_dir: str, fmt: Optional[str] = None, overwrite: bool = False,
             max_shard_size: str = "4GB") -> dict:
        return self.qmodel.save(out_dir, max_shard_size=max_shard_size, overwrite=overwrite, fmt=fmt)

    finish = save  # E2E-QP already ran inside block_ap (run_eqat does both phases)
