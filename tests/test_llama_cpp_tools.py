"""effqat_plugin.llama_cpp_tools: finding the built llama.cpp tools and parsing llama-perplexity.

The end-to-end case runs only where scripts/build_llama_tools.sh has built the tools: a tiny llama
with SmolLM2's tokenizer (llama.cpp's SPM tokenizer needs byte pieces a 256-piece model lacks),
converted to F16 by llama.cpp's converter, quantized to Q4_K_M by the llama-quantize binary (whose
tensor types must be gguf_presets' prediction, as the in-process quantizer's are), then scored by
llama-perplexity.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from effqat_plugin import llama_cpp_tools as tools
from effqat_plugin.gguf_presets import tensor_types

SMOLLM2 = Path(__file__).resolve().parent / "assets" / "smollm2_tokenizer"
REPO = Path(__file__).resolve().parents[1]

SAMPLE = """perplexity: calculating perplexity over 2 chunks, n_ctx=128, batch_size=2048, n_seq=16
[1]51320.1234,[2]50251.0860,
Final estimate: PPL = 50251.0860 +/- 979.12521
"""


def test_parse_perplexity():
    assert tools.parse_perplexity(SAMPLE) == pytest.approx(50251.086)
    with pytest.raises(ValueError, match="Final estimate"):
        tools.parse_perplexity("perplexity: tokenizing the input ..\n")


def test_tool_path(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="llama-quantize"):
        tools.tool_path("llama-cli")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "llama-imatrix"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EFFQAT_LLAMA_TOOLS", str(tmp_path))
    assert tools.tool_path("llama-imatrix") == fake


def test_perplexity_refuses_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tools.perplexity(tmp_path / "none.gguf", tmp_path / "none.txt")


@pytest.mark.skipif(tools.tool_path("llama-perplexity") is None or tools.tool_path("llama-quantize") is None,
                    reason="llama.cpp tools not built (scripts/build_llama_tools.sh)")
def test_quantize_and_perplexity_end_to_end(tmp_path):
    pytest.importorskip("conversion")
    import torch
    import transformers

    from test_gguf_presets import _read, _to_gguf

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    d = tmp_path / "tiny"
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float16).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2 / f, d / f)
    src = _to_gguf(d, tmp_path / "tiny-f16.gguf", False)
    q = tmp_path / "tiny-q4km.gguf"
    r = subprocess.run([str(tools.tool_path("llama-quantize")), str(src), str(q), "Q4_K_M", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    arch, hp, f16 = _read(src)
    _, _, got = _read(q)
    want = tensor_types("Q4_K_M", arch, {n: s for n, (_, s) in f16.items()}, hp, order="gguf")
    assert {n: t for n, (t, _) in got.items()} == {n: (want[n].type if n in want else f16[n][0]) for n in got}
    ppl = tools.perplexity(q, REPO / "README.md", ctx=128, chunks=2, threads=min(2, os.cpu_count() or 1),
                           timeout=120)
    assert math.isfinite(ppl) and ppl > 1
