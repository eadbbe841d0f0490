"""Converted folders load in GPTQModel 7.7 (TORCH backend, CPU) and dequantize exactly to
``(W_int - z) * s``. torch.compile of TorchLinear's dequant is switched off (``torch._dynamo.config
.disable``, the same as ``TORCHDYNAMO_DISABLE=1``): with it each module compiles on first use (~20 s
for this tiny model), without it the whole file runs in seconds."""
from __future__ import annotations

import os

import pytest
import torch

from effqat_plugin.converters import convert, save_quantized

from test_converters_helpers import config_files, read_qcfg, stories_model

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="module")
def gptqmodel():
    import torch._dynamo
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    gm = pytest.importorskip("gptqmodel")
    yield gm
    torch._dynamo.config.disable = old


def load_and_check(gm, folder, qws):
    from gptqmodel import BACKEND, GPTQModel
    m = GPTQModel.from_quantized(str(folder), device="cpu", backend=BACKEND.TORCH, torch_dtype=torch.float16)
    seen = 0
    for name, mod in m.model.named_modules():
        if name in qws:
            w = mod.dequantize_weight()          # TorchLinear returns [in, out]
            ref = qws[name].dequantize(torch.float16).t()
            assert w.dtype == torch.float16 and w.shape == ref.shape, name
            assert torch.equal(w, ref), (name, int((w != ref).sum()))
            seen += 1
    assert seen == len(qws)
    with torch.inference_mode():
        out = m.model(torch.tensor([[1, 5, 9, 2]]))
    assert out.logits.shape == (1, 4, 512)  # forward runs (random weights: values not meaningful)
    return m


@pytest.mark.parametrize("fmt,bits,enc", [("gptq", 2, "signflip"), ("gptq", 2, "plain"), ("gptq_v2", 3, ""),
                                          ("gptq", 3, "signflip"), ("gptq", 4, "signflip"),
                                          ("gptq", 4, "plain"), ("gptq_v2", 8, ""), ("gptq", 8, "signflip")])
def test_gptqmodel_loads_exactly(tmp_path, gptqmodel, fmt, bits, enc):
    qws, tensors = stories_model(bits, 64, seed=20 + bits)
    d = tmp_path / "m"
    rep = save_quantized(d, fmt=fmt, qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path),
                         v1_encoding=enc or "signflip")
    if enc == "plain" and bits in (2, 4):
        assert rep["v1_borrow_fields"] > 0  # the borrowed fields must still load exactly
    if enc == "signflip":
        # zero-point-0 groups are stored with negative scales; GPTQModel's kernel must take them
        assert rep["v1_borrow_fields"] == 0
        from safetensors.torch import load_file
        assert any(bool((t < 0).any()) for k, t in load_file(d / "model.safetensors").items()
                   if k.endswith(".scales"))
    if bits == 3:
        assert len(rep["wider_modules"]) == 15  # 172-wide MLP modules stored at 4 bits
    load_and_check(gptqmodel, d, qws)


def test_original_eqat_3bit_to_gptq_loads(tmp_path, gptqmodel):
    """An original-format w3 folder (no quantize_config, 10 values per word) -> gptq v1 -> GPTQModel."""
    qws, tensors = stories_model(3, 64, seed=33)
    src = tmp_path / "stories-EfficientQAT-w3g64"
    save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    (src / "quantize_config.json").unlink()
    dst = tmp_path / "gptq"
    rep = convert(src, dst, to="gptq")
    assert rep["source_format"] == "eqat" and rep["bits"] == 3
    q = read_qcfg(dst)
    assert q["meta"]["source_format"] == "eqat" and q["dynamic"]
    load_and_check(gptqmodel, dst, qws)
