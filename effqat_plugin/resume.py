"""Block-AP's work folder: one safetensors file per finished decoder layer, so a crash at layer 61 of 80
costs one layer, not the run.

Each layer file holds the layer's frozen integers, zeros, fp16 scales and biases, plus its other
trained parameters (norms) in fp32, and the layer report in the file's metadata. Files are written
to a temporary name and renamed, and `progress.json` is rewritten the same way afterwards, so a kill
at any instant leaves either the old or the new state. A fingerprint of the model, settings and
calibration data guards against resuming a different run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .jsonio import write_json_atomic
from .layer_report import LayerReport
from .qweight import QuantizedWeight

PROGRESS = "progress.json"


def run_fingerprint(hf_model, layout, cfg, ids: torch.Tensor, n_train: int) -> str:
    """Hash of everything that determines Block-AP's result (model weights excluded: config + names)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in cfg.eqat_settings().items() if not k.startswith("e2e_")}
    if not settings.get("sym"):   # asymmetric runs keep the fingerprints they had before sym existed
        settings.pop("sym", None)
    if settings.get("block_loss") == "mse":   # likewise for runs before block_loss existed
        settings.pop("block_loss", None)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(hf_model.config.to_json_string(use_diff=False).encode())
    h.update(json.dumps([layout.layers_prefix, layout.linear_names, n_train]).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class SavedLayer:
    qweights: Dict[str, QuantizedWeight]
    state: Dict[str, torch.Tensor]
    report: object


class LayerStore:
    def __init__(self, work_dir: str, fingerprint: str):
        self.dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        self.progress_path = os.path.join(work_dir, PROGRESS)
        self.progress = {"fingerprint": fingerprint, "layers": []}
        if os.path.exists(self.progress_path):
            with open(self.progress_path) as f:
                try:
                    found = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.progress_path} is corrupt ({e}); delete {work_dir} to start over") from None
            if found.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"work folder {work_dir} belongs to a run with other settings, model or calibration data; "
                    "resume only with the same command, or delete the folder / pick another --work-dir")
            self.progress = found

    def completed(self) -> int:
        """Number of leading layers whose files are present."""
        n = 0
        for index in self.progress["layers"]:
            if index != n or not os.path.isfile(self._file(index)):
                break
            n += 1
        return n

    def _file(self, index: int) -> str:
        return os.path.join(self.dir, f"layer_{index:05d}.safetensors")

    def save(self, index: int, qweights: Dict[str, QuantizedWeight], state: Dict[str, torch.Tensor], report) -> None:
        tensors, layout = {}, {}
        for name, qw in qweights.items():
            fields, layout[name] = _frozen_fields(qw)
            tensors.update({f"q.{name}.{k}": v.contiguous() for k, v in fields.items() if v is not None})
            if qw.bias is not None:
                tensors[f"q.{name}.bias"] = qw.bias.contiguous()
        for key, value in state.items():
            tensors[f"s.{key}"] = value.contiguous()
        meta = {"report": json.dumps(asdict(report)), "layout": json.dumps(layout)}
        path = self._file(index)
        save_file(tensors, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)
        self.progress["layers"] = sorted(set(self.progress["layers"]) | {index})
        write_json_atomic(self.progress_path, self.progress)

    def load(self, index: int) -> SavedLayer:
        with safe_open(self._file(index), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layout = json.loads(meta["layout"])
        qweights = {name: _frozen_from({k[len(name) + 3:]: v for k, v in tensors.items()
                                        if k.startswith(f"q.{name}.")}, spec)
                    for name, spec in layout.items()}
        state = {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}
        return SavedLayer(qweights=qweights, state=state, report=LayerReport(**json.loads(meta["report"])))

    @classmethod
    def reopen(cls, work_dir: str) -> "LayerStore":
        """The store of a finished (or running) Block-AP in ``work_dir``, for reading its layers back."""
        store = cls.__new__(cls)
        store.dir = work_dir
        store.progress_path = os.path.join(work_dir, PROGRESS)
        with open(store.progress_path) as f:
            store.progress = json.load(f)
        return store

    def load_state(self, index: int) -> Dict[str, torch.Tensor]:
        """Only the trained non-quantized parameters (norms) of layer ``index``; integers left on disk."""
        with safe_open(self._file(index), "pt") as f:
            return {k[2:]: f.get_tensor(k) for k in f.keys() if k.startswith("s.")}

    def module_shapes(self, index: int) -> Dict[str, dict]:
        """Per quantized linear of layer ``index``: bits, group size, int_weight / zeros shapes and
        whether it has a bias, read from the file header alone (no tensor data)."""
        with safe_open(self._file(index), "pt") as f:
            layout = json.loads(f.metadata()["layout"])
            keys = set(f.keys())
            out = {}
            for name, spec in layout.items():
                if "gguf" in spec:   # a llama.cpp block type: no uniform-grid shapes
                    out[name] = dict(spec, has_bias=f"q.{name}.bias" in keys)
                    continue
                out[name] = dict(spec, weight_shape=tuple(f.get_slice(f"q.{name}.int_weight").get_shape()),
                                 zeros_shape=tuple(f.get_slice(f"q.{name}.zeros").get_shape()),
                                 has_bias=f"q.{name}.bias" in keys)
        return out


# the frozen forms a layer file holds: effqat's uniform grid (QuantizedWeight), a llama.cpp K grid
# (KGridParams: q, sc, m int8; d, dmin fp16) or llama.cpp's own rows of a 32-wide type (BlockRows)
_KGRID_FIELDS = ("q", "sc", "d", "dmin", "m")


def _frozen_fields(qw):
    """(tensors, layout entry) of one frozen weight."""
    from .gguf_weights import BlockRows
    from .quantizer import KGridParams

    if isinstance(qw, KGridParams):
        return {k: getattr(qw, k) for k in _KGRID_FIELDS}, {"gguf": qw.qtype, "kind": "kgrid"}
    if isinstance(qw, BlockRows):
        return {"rows": qw.data}, {"gguf": qw.qtype, "kind": "rows", "in_features": qw.in_features}
    return ({"int_weight": qw.int_weight, "zeros": qw.zeros, "scales": qw.scales},
            {"bits": qw.bits, "group_size": qw.group_size})


def _frozen_from(t: Dict[str, torch.Tensor], spec: dict):
    from .gguf_weights import BlockRows
    from .quantizer import KGridParams

    if spec.get("kind") == "kgrid":
        return KGridParams(spec["gguf"], t["d"], t["sc"], t["q"], t.get("dmin"), t.get("m"), bias=t.get("bias"))
    if spec.get("kind") == "rows":
        return BlockRows(spec["gguf"], t["rows"], spec["in_features"], bias=t.get("bias"))
    return QuantizedWeight(int_weight=t["int_weight"], zeros=t["zeros"], scales=t["scales"], bits=spec["bits"],
                           group_size=spec["group_size"], bias=t.get("bias"))
