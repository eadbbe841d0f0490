"""Our folders load through ``transformers.AutoModelForCausalLM.from_pretrained`` (its GPTQ
integration: optimum + gptqmodel) with the same logits as ``GPTQModel.from_quantized``.

Before config.json carried ``quantization_config``, transformers loaded these folders as a random
fp model (every packed tensor "unexpected"), 150% off in logits with only a warning table.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from effqat_plugin.converters import convert, save_quantized

from kernel_helpers import close
from test_converters_helpers import config_files, llama_linears, read_qcfg, stories_model

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 100, 33, 4]])


@pytest.fixture(scope="module")
def libs():
    pytest.importorskip("optimum")
    gm = pytest.importorskip("gptqmodel")
    import torch._dynamo
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield gm
    torch._dynamo.config.disable = old


def model_for(bits, inter, seed):
    """Random packed model; scales shrink with the code range so 5 fp16 layers stay finite."""
    qws, tensors = stories_model(bits, 64, seed=seed, linears=llama_linears(inter))
    for qw in qws.values():
        qw.scales = (qw.scales.float() * 4 / (1 << bits)).to(torch.float16)
    return qws, tensors


def logits_both(folder):
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cpu")
    kinds = {type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")}
    assert kinds, "transformers loaded no quantized linears"
    with torch.inference_mode():
        a = hf(TOKENS).logits.float()
    g = GPTQModel.from_quantized(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    with torch.inference_mode():
        b = g.model(TOKENS).logits.float()
    return a, b, kinds


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_transformers_equals_gptqmodel(tmp_path, libs, fmt, bits):
    qws, tensors = model_for(bits, 128, seed=40 + bits)
    d = tmp_path / "m"
    rep = save_quantized(d, fmt=fmt, qweights=qws, tensors=tensors,
                         config_dir_or_files=config_files(tmp_path, 128))
    hq = json.loads((d / "config.json").read_text())["quantization_config"]
    assert hq["backend"] == "auto" and hq["checkpoint_format"] == fmt and hq["bits"] == bits
    if fmt == "gptq":
        assert rep["v1_borrow_fields"] == 0
        assert any(bool((qw.zeros == 0).any()) for qw in qws.values())  # flipped groups exist
    a, b, kinds = logits_both(d)
    assert torch.isfinite(b).all() and b.abs().max() > 0
    # transformers' 4-bit CPU pick (TorchCpuAvx512Linear with AVX-512, else TorchAtenLinear) is
    # another kernel than GPTQModel's TorchLinear: same weights, other fp16 summation order, so the
    # logits agree to fp16 rounding of the largest logit (measured: 0.0156 of 67.5, 2.3e-4)
    if kinds == {"TorchLinear"}:
        assert torch.equal(a, b)
    else:
        close(a, b, 1e-3, f"transformers ({sorted(kinds)}) vs GPTQModel TorchLinear")


def test_ragged_shapes_name_the_torch_kernel(tmp_path, libs):
    """stories260k's 172-wide MLP: the CPU 4-bit kernel transformers would pick refuses it
    (``expect N to be dividable by 16`` / ``in_features ... divisible by group_size``), so the
    folder names GPTQModel's torch kernel and loads exactly; converting keeps that choice."""
    qws, tensors = model_for(4, 172, seed=7)
    src = tmp_path / "eqat"
    save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    d = tmp_path / "v1"
    convert(src, d, to="gptq")
    hq = json.loads((d / "config.json").read_text())["quantization_config"]
    assert hq["backend"] == "torch" and hq["meta"] == read_qcfg(d)["meta"]
    a, b, kinds = logits_both(d)
    assert kinds == {"TorchLinear"} and torch.equal(a, b)
