"""Where the decoder layers and their quantizable linears are, taken from GPTQModel's definitions.

GPTQModel already maintains a module tree for ~190 architectures; reusing it (instead of hard-coding
Llama names, as the original EfficientQAT does) is what makes every architecture it lists work here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import torch.nn as nn


class UnsupportedArchitectureError(ValueError):
    pass


class PartialQuantizationError(ValueError):
    """Weight matrices inside the decoder layers would be left in floating point without the user
    asking for it (a checkpoint must never quietly keep part of a layer in 16-bit)."""


@dataclass
class ModelLayout:
    """Decoder layers and, per layer, the linears Block-AP quantizes.

    Names are resolved for every layer, not taken from layer 0: models such as DeepSeek V2/V3 start
    with dense MLP layers and continue with MoE layers (routed + shared experts), so layer 0's names
    do not exist in layer 1 and layer 1's experts do not exist in layer 0.
    """

    layers_prefix: str  # e.g. "model.layers"
    layers: nn.ModuleList
    names_per_layer: List[List[str]]  # per layer: names inside it, e.g. "self_attn.q_proj", in execution order
    kept_by_design: Tuple[str, ...] = ()  # relative names the definition marks ':!' (norms, routers)
    n_experts: Optional[int] = None  # routed experts per MoE layer (None: dense model)
    dynamic: Optional[dict] = field(default=None, repr=False)  # GPTQModel ``dynamic`` rules of the run

    def layer_name(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def names_in(self, index: int) -> List[str]:
        """The quantized linears of decoder layer ``index`` (relative names)."""
        return self.names_per_layer[index]

    @property
    def linear_names(self) -> List[str]:
        """Every relative name quantized in at least one layer (first-seen order); use ``names_in``
        for what one layer holds."""
        seen = {}
        for names in self.names_per_layer:
            seen.update(dict.fromkeys(names))
        return list(seen)

    def quantized_names(self) -> List[str]:
        """Full module names of every linear Block-AP quantizes, layer by layer."""
        return [f"{self.layer_name(i)}.{n}" for i, names in enumerate(self.names_per_layer) for n in names]


def definition_for(model_type: str):
    """GPTQModel's definition class for a HF ``model_type``; error when GPTQModel has none."""
    from gptqmodel.models.auto import MODEL_MAP, SUPPORTED_MODELS

    key = (model_type or "").lower()
    if key not in SUPPORTED_MODELS or key not in MODEL_MAP:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no GPTQModel 7.7 model definition, so its decoder layers "
            "cannot be located; supported types include " + ", ".join(sorted(MODEL_MAP)[:12]) + ", ...")
    return MODEL_MAP[key]


def resolve_layout(hf_model: nn.Module, definition=None, quantize_config=None) -> ModelLayout:
    """Decoder layers and linear names of ``hf_model`` according to its GPTQModel definition."""
    if definition is None:
        definition = definition_for(getattr(hf_model.config, "model_type", ""))
    prefixes = definition.extract_layers_node()
    layers = None
    for prefix in prefixes:
        try:
            layers = hf_model.get_submodule(prefix)
            break
        except AttributeError:
            continue
    if layers is None or not isinstance(layers, (nn.ModuleList, list)):
        raise UnsupportedArchitectureError(
            f"decoder layers not found at {prefixes} in {type(hf_model).__name__}")
    groups = definition.simple_layer_modules(hf_model.config, quantize_config)
    # dict.fromkeys: some definitions list a name more than once (qwen2_moe's shared expert)
    candidates = list(dict.fromkeys(n for group in groups for n in group))
    dynamic = getattr(quantize_config, "dynamic", None)
    names_per_layer = []
    for index, layer in enumerate(layers):
        names = []
        for n in candidates:
            try:
                m = layer.get_submodule(n)
            except AttributeError:
                continue  # not in this layer (dense vs MoE layer, bias-free variant, ...)
            if isinstance(m, nn.Linear) and not _user_excluded(dynamic, f"{prefix}.{index}.{n}", n):
                names.append(n)
        names_per_layer.append(names)
    if not any(names_per_layer):
        raise UnsupportedArchitectureError(
            f"no nn.Linear modules found in {type(layers[0]).__name__} for {candidates}; fused or MoE "
            "expert layouts are not supported by the EQAT trainer yet")
    from gptqmodel.models.base import NOT_QUANTIZE_FLAG

    full = definition.full_layer_modules(hf_model.config)
    kept = tuple(n.split(":", 1)[0] for group in full for n in group if NOT_QUANTIZE_FLAG in n)
    return ModelLayout(layers_prefix=prefix, layers=layers, names_per_layer=names_per_layer,
                       kept_by_design=kept, n_experts=n_routed_experts(hf_model.config), dynamic=dynamic)


def n_routed_experts(config) -> Optional[int]:
    """Routed experts per MoE layer under the config's name for it (None for a dense model)."""
    for attr in ("n_routed_experts", "num_local_experts", "num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# A router's name: "gate", "router" or "<something>_gate" ("shared_expert_gate"), never "gate_proj".
_ROUTER_NAME = re.compile(r"(^|\.)(\w+_)?(gate|router)$")


def _is_router(layout: ModelLayout, module_name: str, shape) -> bool:
    """MoE routers stay in floating point, as in GPTQModel: a "gate"/"router" module of an MoE model
    whose rows score the experts (or the one shared expert)."""
    return (layout.n_experts is not None and bool(_ROUTER_NAME.search(module_name))
            and shape[0] in (layout.n_experts, 1))


def unquantized_weight_matrices(layout: ModelLayout, quantized: Iterable[str]) -> List[str]:
    """Floating-point parameters with two or more dims inside the decoder layers that are not in
    ``quantized`` (full module names), not kept by design (':!' names of the definition, MoE
    routers) and not excluded by the user (``dynamic`` negative rules); as "name (shape)"."""
    quantized = set(quantized)
    found = []
    for index, layer in enumerate(layout.layers):
        prefix = layout.layer_name(index)
        for pname, p in layer.named_parameters():
            if not p.is_floating_point() or p.dim() < 2:
                continue  # norms, biases, integer buffers
            module = pname.rpartition(".")[0]
            if f"{prefix}.{module}" in quantized or module in layout.kept_by_design:
                continue
            if _is_router(layout, module, p.shape) or _user_excluded(layout.dynamic, f"{prefix}.{module}", module):
                continue
            found.append(f"{prefix}.{pname} {tuple(p.shape)}")
    return found


def check_fully_quantized(layout: ModelLayout, quantized: Iterable[str], model_type: str = "") -> None:
    """Raise ``PartialQuantizationError`` naming every weight matrix that would stay in floating point."""
    left = unquantized_weight_matrices(layout, quantized)
    if left:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise PartialQuantizationError(
            f"{len(left)} weight matrices inside the decoder layers would stay unquantized: {shown}. "
            f"GPTQModel's definition for {model_type or 'this model'} does not cover them (or the model was "
            "not defused: fused projections and experts become per-module linears in GPTQModel.load and "
            "effqat quantize); exclude them on purpose with a GPTQModel dynamic rule such as "
            "{'-:<regex>': {}} in the config")


def _user_excluded(dynamic, full_name: str, relative_name: str) -> bool:
    """True when a GPTQModel ``dynamic`` negative rule (``"-:<regex>"``) names the module."""
    if not dynamic:
        return False
    from gptqmodel.quantization.config import dynamic_get

    return any(dynamic_get(dynamic, module_name=n) is False for n in (full_name, relative_name))


def set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def tied_output_keys(hf_model) -> set:
    """State-dict keys of the output embedding when it is tied to the input one (not written)."""
    if not getattr(hf_model.config, "tie_word_embeddings", False):
        return set()
    out_emb = hf_model.get_output_embeddings()
    if out_emb is None:
        return set()
    return {k for k, _ in hf_model.named_parameters(remove_duplicate=False)
            if k.endswith(".weight") and hf_model.get_submodule(k.rsplit(".", 1)[0]) is out_emb}
