"""AWQ (gemm, 4-bit) export and import: layout against an independent decoder, bit-exact round trips,
refusals that write nothing, and loading in GPTQModel (AwqTorchLinear) and transformers with logits
equal to the gptq_v2 conversion of the same source."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from effqat_plugin.converters import convert, get_format, load_quantized, save_quantized
from effqat_plugin.converters.format_base import WriteContext
from effqat_plugin.qweight import QuantFormatError

from kernel_helpers import close
from test_converters_helpers import (assert_same, assert_tensors_same, config_files, llama_linears, rand_qweight,
                                     read_qcfg, stories_model)

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_awq_decode(words, n_cols):
    """[rows][cols] codes: field j of word c holds column 8c + ORDER[j] (plain Python ints)."""
    out = []
    for row in words.tolist():
        codes = [0] * n_cols
        for c, w in enumerate(row):
            for j in range(8):
                codes[8 * c + ORDER[j]] = ((w & 0xFFFFFFFF) >> (4 * j)) & 0xF
        out.append(codes)
    return out


@pytest.mark.parametrize("out_f,in_f,group", [(64, 64, 32), (128, 256, 64), (200, 128, 128)])
def test_awq_layout_against_reference(out_f, in_f, group):
    qw = rand_qweight(out_f, in_f, 4, group, seed=out_f + group, bias=True)
    t = get_format("awq").write(qw, 4, WriteContext(fmt="awq", bits=4, group_size=group))
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (in_f // group, out_f // 8)
    assert ref_awq_decode(t["qweight"], out_f) == qw.int_weight.t().tolist()
    assert ref_awq_decode(t["qzeros"], out_f) == qw.zeros.t().tolist()
    assert torch.equal(t["scales"], qw.scales.t().to(torch.float16)) and "g_idx" not in t
    assert torch.equal(t["bias"], qw.bias)


def awq_model(seed=3, inter=128):
    qws, tensors = stories_model(4, 64, seed=seed, linears=llama_linears(inter))
    for qw in qws.values():  # keep 5 fp16 layers finite on random weights
        qw.scales = (qw.scales.float() / 4).to(torch.float16)
    return qws, tensors


def test_awq_round_trips_bit_exact(tmp_path):
    qws, tensors = awq_model()
    cfg = config_files(tmp_path, 128)
    for a in ("eqat", "gptq", "gptq_v2", "awq"):
        src = tmp_path / a
        save_quantized(src, fmt=a, qweights=qws, tensors=tensors, config_dir_or_files=cfg)
        mid, back = tmp_path / f"{a}-awq", tmp_path / f"{a}-awq-{a}"
        rep = convert(src, mid, to="awq")
        assert rep["source_format"] == a and rep["target_format"] == "awq"
        convert(mid, back, to=a)
        fmt, q2, t2, _ = load_quantized(mid)
        assert fmt == "awq"
        assert_same(qws, q2)
        assert_tensors_same(tensors, t2)
        assert_tensors_same(load_file(src / "model.safetensors"), load_file(back / "model.safetensors"))
    q = read_qcfg(tmp_path / "awq")
    assert (q["quant_method"], q["format"], q["bits"], q["group_size"], q["sym"]) == ("awq", "gemm", 4, 64, False)
    hq = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (hq["quant_method"], hq["version"], hq["zero_point"], hq["bits"]) == ("awq", "gemm", True, 4)


def test_awq_word_path_equals_code_path(tmp_path, monkeypatch):
    """The packed-word path (a nibble transpose computed while written, both directions) writes the
    same bytes as unpacking and repacking every code, for every source / target pair with AWQ."""
    from effqat_plugin.converters import packing

    calls = []
    real = packing.nibble_transpose

    def counted(order, inverse=False):
        fn = real(order, inverse)
        return lambda w, o: (calls.append(inverse), fn(w, o))
    monkeypatch.setattr(packing, "nibble_transpose", counted)
    qws, tensors = awq_model(seed=11)
    cfg = config_files(tmp_path, 128)
    for a in ("eqat", "gptq", "gptq_v2", "bitblas", "awq"):
        save_quantized(tmp_path / a, fmt=a, qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    for a, b in [(x, "awq") for x in ("eqat", "gptq", "gptq_v2", "bitblas", "awq")] + \
                [("awq", x) for x in ("eqat", "gptq", "gptq_v2", "bitblas")]:
        fast, slow = tmp_path / f"{a}-{b}-fast", tmp_path / f"{a}-{b}-slow"
        n = len(calls)
        convert(tmp_path / a, fast, to=b, fast=True)
        assert len(calls) > n, f"{a} -> {b} did not take the word path"
        n = len(calls)
        convert(tmp_path / a, slow, to=b, fast=False)
        assert len(calls) == n
        assert_tensors_same(load_file(fast / "model.safetensors"), load_file(slow / "model.safetensors"))
    assert_tensors_same(load_file(tmp_path / "awq" / "model.safetensors"),
                        load_file(tmp_path / "gptq-awq-fast" / "model.safetensors"))


def test_awq_refusals_write_nothing(tmp_path):
    cfg = config_files(tmp_path)
    qws, tensors = stories_model(4, 64, layers=1)  # 172-wide MLP: in not a multiple of the group
    src = tmp_path / "s"
    save_quantized(src, fmt="gptq_v2", qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    with pytest.raises(QuantFormatError, match="in_features=172"):
        convert(src, tmp_path / "a", to="awq")
    odd = {"model.layers.0.mlp.up_proj": rand_qweight(36, 64, 4, 64, 0)}
    with pytest.raises(QuantFormatError, match="divisible by 8"):
        save_quantized(tmp_path / "a1", fmt="awq", qweights=odd, tensors={}, config_dir_or_files=cfg)
    q2, t2 = stories_model(2, 64, layers=1, linears=llama_linears(128))
    save_quantized(tmp_path / "s2", fmt="gptq_v2", qweights=q2, tensors=t2, config_dir_or_files=config_files(tmp_path, 128))
    with pytest.raises(QuantFormatError, match="4-bit only"):
        convert(tmp_path / "s2", tmp_path / "a2", to="awq")
    q256 = {"model.layers.0.mlp.down_proj": rand_qweight(64, 512, 4, 256, 0)}
    with pytest.raises(QuantFormatError, match="group size"):
        save_quantized(tmp_path / "a3", fmt="awq", qweights=q256, tensors={}, config_dir_or_files=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg", "cfg-intermediate_size128", "s", "s2"])


def test_awq_loads_with_logits_equal_to_gptq_v2(tmp_path):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    import torch._dynamo
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        qws, tensors = awq_model(seed=9)
        src = tmp_path / "eqat"
        save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path, 128))
        convert(src, tmp_path / "awq", to="awq")
        convert(src, tmp_path / "v2", to="gptq_v2")
        x = torch.tensor([[1, 5, 9, 2, 7, 100, 33, 4]])
        ref = GPTQModel.from_quantized(str(tmp_path / "v2"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        awq = GPTQModel.from_quantized(str(tmp_path / "awq"), device="cpu", backend=BACKEND.AWQ_TORCH,
                                       dtype=torch.float16)
        assert {type(m).__name__ for m in awq.model.modules() if hasattr(m, "qweight")} == {"AwqTorchLinear"}
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "awq"), dtype=torch.float16, device_map="cpu")
        assert any(hasattr(m, "qweight") for m in hf.modules())
        with torch.inference_mode():
            b = ref.model(x).logits.float()
            a = awq.model(x).logits.float()
            c = hf(x).logits.float()
        assert torch.isfinite(b).all() and b.abs().max() > 0
        assert torch.equal(a, b)
        # transformers' AWQ pick is another CPU kernel (other fp16 summation order): agreement to
        # fp16 rounding of the largest logit
        kinds = {type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")}
        close(c, b, 1e-3, f"transformers ({sorted(kinds)}) vs GPTQModel")
    finally:
        torch._dynamo.config.disable = old
