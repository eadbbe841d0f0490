"""Where the decoder layers and their quantizable linears are, taken from GPTQModel's definitions.

GPTQModel already maintains a module tree for ~190 architectures; reusing it (instead of hard-coding
Llama names, as the original EfficientQAT does) is what makes every architecture it lists work here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass
class ModelLayout:
    layers_prefix: str  # e.g. "model.layers"
    layers: nn.ModuleList
    linear_names: List[str]  # names inside one layer, e.g. "self_attn.q_proj", in execution order

    def layer_name(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"


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
    names = [n for group in groups for n in group]
    layer0 = layers[0]
    linear_names = []
    for n in names:
        try:
            m = layer0.get_submodule(n)
        except AttributeError:
            continue  # optional module in this variant (e.g. a bias-free model's missing projection)
        if isinstance(m, nn.Linear):
            linear_names.append(n)
    if not linear_names:
        raise UnsupportedArchitectureError(
            f"no nn.Linear modules found in {type(layer0).__name__} for {names}; fused or MoE expert "
            "layouts are not supported by the EQAT trainer yet")
    return ModelLayout(layers_prefix=prefix, layers=layers, linear_names=linear_names)


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
