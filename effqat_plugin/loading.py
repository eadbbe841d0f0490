"""Load any model folder effqat deals with (fp, EQAT, GPTQ v1/v2, BitBLAS) as a runnable torch model.

Quantized folders are read through our format registry and run on our own kernels
(`PackedQuantLinear`), so evaluation works on CPU for every format, BitBLAS included. GPTQ folders can
also be loaded through GPTQModel itself (``runtime="gptqmodel"``) to measure what its users get.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


def is_quantized_folder(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "quantize_config.json")):
        return True
    from .converters.checkpoint import open_safetensors

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open_safetensors(Path(path) / name) as f:
                return any(k.endswith((".qweight", ".weight_packed")) for k in f.keys())  # + compressed-tensors
    return False


def check_linear_shapes(hf_model: nn.Module, qweights, path) -> None:
    """Every quantized module must replace an nn.Linear of the same shape in the config's model."""
    for name, qw in qweights.items():
        try:
            lin = hf_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: {name} is quantized in the checkpoint but config.json's model "
                             "has no such module") from None
        shape = (getattr(lin, "out_features", None), getattr(lin, "in_features", None))
        if shape != (qw.out_features, qw.in_features):
            raise ValueError(f"{path}: {name} is {qw.out_features}x{qw.in_features} in the checkpoint but "
                             f"{shape[0]}x{shape[1]} in config.json's model (wrong config.json or corrupt tensors)")


def check_tensor_shapes(hf_model: nn.Module, tensors, path) -> None:
    """Non-quantized tensors (embeddings, norms, lm_head) must have the shapes config.json implies."""
    state = hf_model.state_dict()
    for k, t in tensors.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {k} has shape {list(t.shape)} in the checkpoint but "
                             f"{list(state[k].shape)} in config.json's model")


def _empty_model(config, dtype):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layout
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # MoE experts fused into 3-D tensors (transformers 5) are split into per-expert linears, the way
    # GPTQModel.load does before quantizing, so that checkpoints name e.g. mlp.experts.3.up_proj
    import defuser

    defuser.convert_model(model, cleanup_original=True)
    return model


def install_packed_linears(hf_model: nn.Module, qweights, train_zeros: bool, device) -> None:
    """Swap each quantized nn.Linear for a PackedQuantLinear holding its learned integers (or, for a
    weight on a llama.cpp block type, its E2E-QP module: ``gguf_weights.e2e_module``)."""
    from .gguf_weights import e2e_module, is_gguf_weight
    from .kernels import PackedQuantLinear
    from .layout import set_submodule

    for name, qw in qweights.items():
        if is_gguf_weight(qw):
            module = e2e_module(qw)
        else:
            module = PackedQuantLinear.from_quantized_weight(qw, train_zeros=train_zeros)
        set_submodule(hf_model, name, module.to(device))


@dataclass
class LoadedCheckpoint:
    """A quantized folder as a runnable model, plus what writing a result back in its format needs."""

    model: nn.Module
    fmt: str
    qweights: dict
    tensors: dict
    quantize_config: dict


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, train_zeros: bool = False) -> LoadedCheckpoint:
    """Build the HF model from config.json and install PackedQuantLinear modules from the folder
    (read once); scales become an fp32 master copy, as training and fp32 evaluation want."""
    from transformers import AutoConfig

    from .converters import load_quantized
    from .kernels import PackedQuantLinear

    fmt, qweights, tensors, qcfg = load_quantized(path)   # checks shards, scales, config dims
    model = _empty_model(AutoConfig.from_pretrained(path), dtype)
    check_linear_shapes(model, qweights, path)
    check_tensor_shapes(model, tensors, path)
    install_packed_linears(model, qweights, train_zeros=train_zeros, device=torch.device("cpu"))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    packed_keys = {n + "." + s for n in qweights for s in ("qweight", "zeros", "scales", "bias")}
    missing = [k for k in missing if k not in packed_keys]
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model config (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    for m in model.modules():
        if isinstance(m, PackedQuantLinear):
            m.scales.data = m.scales.data.float()
    return LoadedCheckpoint(model=model.eval(), fmt=fmt, qweights=qweights, tensors=tensors, quantize_config=qcfg)


def load_quantized_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return load_checkpoint(path, dtype).model


def load_for_eval(path: str, runtime: str = "effqat") -> nn.Module:
    """fp folders via transformers; quantized folders via our kernels or (GPTQ only) GPTQModel."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    from .converters.checkpoint import check_safetensors_folder

    check_safetensors_folder(path)  # truncated / corrupt shards, broken index: one clear error
    if not is_quantized_folder(path):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except RuntimeError as e:  # transformers reports shape mismatches as a RuntimeError + table
            if "mismatch" in str(e):
                raise ValueError(f"{path}: tensor shapes contradict config.json "
                                 "(wrong config.json or corrupt weights)") from None
            raise
    if runtime == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        q = GPTQModel.from_quantized(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        return q.model.eval()
    return load_quantized_model(path)
