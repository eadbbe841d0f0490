"""GGUF runs on a mixture of experts: llama.cpp's converter stacks each layer's experts into one 3-D
tensor (``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``), one block type for the whole stack,
while effqat trains every expert as its own linear (GPTQModel's defused modules) on that type.

Oracles as in ``test_gguf_ktrain``: ``gguf``'s dequantizers (each expert's slice of the stacked tensor
against that expert's trained weights, bit for bit), llama.cpp's quantizer (an untrained run writes
llama-quantize's bytes) and llama.cpp's runtime (logits against a float64 transformers model holding
the trained weights).

The model: a tiny Mixtral (4 experts, all used by every token) whose every width is 256, so that experts,
attention and the head all take real K types (no width fallback).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("conversion")

from effqat_plugin import llama_cpp_quants  # noqa: E402
from effqat_plugin.converters.gguf_export import fp_to_gguf  # noqa: E402

from gguf_helpers import TOKENIZER, VOCAB  # noqa: E402
from test_gguf_ktrain import TOKENS, _llama_quantize, decoded, llama_cpp_logits, read_tensors, run_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not llama_cpp_quants.available(), reason="llama.cpp's libggml-base not found")

HIDDEN, INTER, HEADS, KV, EXPERTS = 256, 256, 4, 2, 4
# Every token uses every expert, weighted by the router's softmax (see test_llama_cpp_runs_the_trained_moe)
TOP_K = EXPERTS


# Built in a child process: a streamed run (or GPTQModel.load) of a Mixtral patches transformers'
# Mixtral classes for the rest of the process (``defuser.replace_fused_blocks``), and a model built after
# that saves the defused layout, which is not a checkpoint transformers (or llama.cpp's converter) writes.
_BUILD = """
import shutil, sys, torch
from transformers import MixtralConfig, MixtralForCausalLM
d, tok, vocab, hidden, inter, heads, kv, experts, top_k = sys.argv[1:]
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(inter),
                    num_hidden_layers=2, num_attention_heads=int(heads), num_key_value_heads=int(kv),
                    num_local_experts=int(experts), num_experts_per_tok=int(top_k), max_position_embeddings=256,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
model = MixtralForCausalLM(cfg)
model.to(torch.float16).save_pretrained(d)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{tok}/{f}", f"{d}/{f}")
"""


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny fp16 Mixtral as transformers saves it (each layer's experts fused into one tensor), every
    expert used by every token (``TOP_K``)."""
    d = tmp_path_factory.mktemp("moe") / "fp"
    res = subprocess.run([sys.executable, "-c", _BUILD, str(d), str(TOKENIZER), *map(str, (
        VOCAB, HIDDEN, INTER, HEADS, KV, EXPERTS, TOP_K))], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return d


def stacks(run) -> dict:
    """GGUF tensor name -> the run's linears it holds, in the converter's order (expert 0 first)."""
    out: dict = {}
    for name in run.quantized_names:     # the model's module order: experts by index
        out.setdefault(run.gguf_plan.gguf_names[name], []).append(name)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, moe_dir):
    tmp = tmp_path_factory.mktemp("ktrain-moe")
    model_dir = moe_dir
    out = tmp / "moe-Q2_K.gguf"
    run, report = run_gguf(model_dir, out, tmp / "work", "Q2_K")
    return model_dir, out, run, report


def test_expert_stacks_decode_to_each_trained_expert_bit_for_bit(trained):
    _, out, run, report = trained
    tensors = read_tensors(out)
    exps = {n: mods for n, mods in stacks(run).items() if "_exps" in n}
    assert len(exps) == 3 * 2 and all(len(m) == EXPERTS for m in exps.values())
    for name, mods in exps.items():
        t = tensors[name]
        frozen = [run.model.get_submodule(m).to_frozen() for m in mods]
        assert {w.qtype for w in frozen} == {t.tensor_type.name}, name
        assert t.tensor_type.name in llama_cpp_quants.K_TYPES, name        # a real K type, trained on its grid
        ours = torch.cat([w.dequantize(torch.float32) for w in frozen]).numpy()
        theirs = decoded(t)                                                # [experts x rows, in]
        assert theirs.shape == ours.shape, name
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), name
    by_name = {t["name"]: t for t in report["tensors"]}
    assert {by_name[n]["type"] for n in exps} <= set(llama_cpp_quants.K_TYPES)
    assert not report["fallback"]
    assert run.result.e2e is not None and run.result.e2e.trainable_values > 0


def test_llama_cpp_runs_the_trained_moe(trained):
    """llama.cpp's logits against a float64 transformers Mixtral holding the trained weights (defused as
    the run defuses it, so module names match). Every token uses all experts, weighted by the router's
    softmax, so an expert stacked out of order still changes the logits, while no top-k choice can
    flip: with top-2 of 4, near-ties between the second and third expert flip under llama.cpp's 8-bit
    activation rounding and the test then measures the tie, not the file (measured at Q2_K on random
    routers: 85% of positions within 3%, or 100% with other weights; with every expert used, 100%,
    the largest error 2.1%, argmax equal at 94%)."""
    import defuser
    from transformers import AutoModelForCausalLM

    model_dir, out, run, _ = trained
    tensors = read_tensors(out)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    defuser.convert_model(ref, cleanup_original=True)
    state = ref.state_dict()
    with torch.no_grad():
        for k, v in run.model.state_dict().items():     # norms and routers, as trained
            if k in state and not v.is_meta:
                state[k].copy_(v.float())
        for name in run.quantized_names:
            ref.get_submodule(name).weight.copy_(run.model.get_submodule(name).to_frozen().dequantize(torch.float32))
        ref.model.embed_tokens.weight.copy_(torch.from_numpy(decoded(tensors["token_embd.weight"]).copy()))
        ref.lm_head.weight.copy_(torch.from_numpy(decoded(tensors["output.weight"]).copy()))
    ref.double()
    with torch.inference_mode():
        want = ref(torch.tensor([TOKENS])).logits[0].numpy()
    got = llama_cpp_logits(out)
    err = np.abs(got.astype(np.float64) - want).max(-1) / np.abs(want).max()
    assert (err < 0.03).mean() >= 0.95, np.round(err, 3).tolist()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def test_untrained_moe_run_equals_llama_quantize(tmp_path, moe_dir):
    """Rates 0, no E2E-QP, no importance matrix: every tensor's bytes, expert stacks included, are
    llama-quantize's."""
    model_dir = moe_dir
    ours = tmp_path / "ours.gguf"
    run_gguf(model_dir, ours, tmp_path / "work", "Q2_K", block_quant_lr=0.0, block_weight_lr=0.0, e2e_epochs=0,
             gguf_imatrix=False)
    f16, theirs = tmp_path / "fp16.gguf", tmp_path / "theirs.gguf"
    fp_to_gguf(model_dir, f16)
    _llama_quantize(f16, theirs, "Q2_K")
    a, b = read_tensors(ours), read_tensors(theirs)
    assert set(a) == set(b) and any("_exps" in n for n in a)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
