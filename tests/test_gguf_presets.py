"""gguf_presets.tensor_types against llama.cpp itself.

Oracle: tiny random HF checkpoints (fp16 safetensors + config + a tokenizer) are converted to an F16
GGUF by llama.cpp's own converter (the ``conversion`` package), then quantized in-process by
``llama_cpp.llama_model_quantize`` (the llama.cpp of llama-cpp-python 0.3.36, whose
src/llama-quant.cpp the module mirrors) for every preset; every tensor type of each output file,
read back with gguf's reader, must be the predicted one, and every tensor the module leaves out must
keep its F16/F32 type. The cases cover widths that are and are not multiples of 256 (and one not even
of 32), GQA with n_gqa >= 4 and < 4, tied and untied embeddings, 8 and 4 experts (shared experts),
a fused attn_qkv (phi3), and the 70B bump (an 80-layer GQA llama). Vocabularies are 256 sentencepiece
pieces (trained on the README).
"""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from effqat_plugin import gguf_presets
from effqat_plugin.gguf_presets import PRESETS, TypeChoice, hparams_from_hf_config, tensor_types, use_more_bits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from gguf_arch_table import sentencepiece_model  # noqa: E402

# name -> (transformers config class, config kwargs, vocabulary). The vocabulary is always the 256
# sentencepiece pieces: "sp" where the converter class reads a tokenizer.model itself, "sp_forced"
# where it would read a GPT-2 tokenizer (its set_vocab is swapped; the vocabulary has no say in the
# tensor types, and SmolLM2's 49k tokens would cost seconds per gguf read)
CASES = {
    # widths 64 (-> 32-block fallbacks) beside ffn_down's 256; n_gqa = 4; 16 layers for the counters
    "llama_gqa4_mixed": ("LlamaConfig", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=16,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=16), "sp"),
    # every width a multiple of 256, n_gqa = 2, tied embeddings (token_embd gets output's rule)
    "mistral_tied_256": ("MistralConfig", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                               num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                               tie_word_embeddings=True), "sp"),
    # ffn_down's width 320 is a multiple of 32, not 256; attention biases (1-D, left out)
    "qwen2_320": ("Qwen2Config", dict(hidden_size=256, intermediate_size=320, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2), "sp"),
    # width 48: not even a multiple of 32 -> F16
    "llama_48": ("LlamaConfig", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=3, num_key_value_heads=3, head_dim=16), "sp"),
    # 8 experts: attn_v/attn_k -> Q8_0, attn_output -> Q5_K, ffn_*_exps 3-D, layer read from the name
    "mixtral_8x": ("MixtralConfig", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         num_local_experts=8, num_experts_per_tok=2), "sp"),
    # 4 experts + shared expert (ffn_*_shexp, the 1-row shared-expert gate), router left out
    "qwen2moe_4x": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=256, moe_intermediate_size=256,
                                           shared_expert_intermediate_size=256, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                           num_experts_per_tok=2, tie_word_embeddings=True), "sp_forced"),
    # fused attn_qkv and gate_up (one ffn_up tensor)
    "phi3_qkv": ("Phi3Config", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, pad_token_id=0), "sp"),
    # q/k norms (1-D, left out), tied head
    "qwen3_tied": ("Qwen3Config", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                       tie_word_embeddings=True), "sp"),
    # gemma3: no output tensor (the head is the embedding), extra per-layer norms
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                             sliding_window=64), "sp"),
    # 80 GQA layers: llama.cpp types it LLM_TYPE_70B and bumps attn_v's Q3_K/Q4_K to Q5_K (narrow
    # heads and FFN keep it small; attn_v's width is the hidden size, 256)
    "llama_70b_like": ("LlamaConfig", dict(hidden_size=256, intermediate_size=32, num_hidden_layers=80,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32), "sp"),
}


# presets a case is quantized to (default: all); the 70B bump only moves Q3_K/Q4_K attn_v tensors
PRESETS_OF = {"llama_70b_like": ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")}


def _sentencepiece(work: Path) -> Path:
    pytest.importorskip("sentencepiece")
    return sentencepiece_model(work)   # the arch matrix's 256-piece model trained on the README


def _hf_model(work: Path, name: str) -> Path:
    import torch
    import transformers

    cls_name, kw, tok = CASES[name]
    d = work / name
    if "num_local_experts" in kw or "num_experts" in kw:
        # in a fresh interpreter: once GPTQModel is imported (other tests), its defuser has replaced
        # transformers' fused MoE experts by per-expert linears, and the checkpoint would be saved in
        # that layout, which is not the original one llama.cpp's converter reads
        code = ("import json, sys, torch, transformers\n"
                "cfg = getattr(transformers, sys.argv[1])(vocab_size=256, max_position_embeddings=128, "
                "bos_token_id=1, eos_token_id=2, **json.loads(sys.argv[2]))\n"
                "torch.manual_seed(0)\n"
                "transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float16).save_pretrained(sys.argv[3])\n")
        res = subprocess.run([sys.executable, "-c", code, cls_name, json.dumps(kw), str(d)], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    else:
        cfg = getattr(transformers, cls_name)(vocab_size=256, max_position_embeddings=128, bos_token_id=1,
                                              eos_token_id=2, **kw)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float16)
        model.save_pretrained(d)
    shutil.copy(_sentencepiece(work), d / "tokenizer.model")
    return d


def _to_gguf(src: Path, dst: Path, forced_sp: bool) -> Path:
    from effqat_plugin.converters.gguf_export import _converter

    gguf, conversion = _converter()
    hparams = conversion.ModelBase.load_hparams(src, False)
    cls = conversion.get_model_class(hparams["architectures"][0])
    if forced_sp:
        cls = type(cls.__name__, (cls,), {"set_vocab": lambda self: self._set_vocab_sentencepiece(),
                                          "model_arch": cls.model_arch})
    cls(src, gguf.LlamaFileType.MOSTLY_F16, dst, hparams=hparams, eager=True, model_name=src.name).write()
    return dst


def _read(path: Path):
    """(arch, hparams for tensor_types, {name: (type name, ne shape)})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    arch = f["general.architecture"]
    hp = {"n_layer": f[f"{arch}.block_count"], "n_head": f[f"{arch}.attention.head_count"],
          "n_head_kv": f.get(f"{arch}.attention.head_count_kv", f[f"{arch}.attention.head_count"]),
          "n_expert": f.get(f"{arch}.expert_count", 0)}
    return arch, hp, {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in r.tensors}


def _quantize(src: Path, dst: Path, preset: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, PRESETS[preset].ftype)
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0, preset


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    pytest.importorskip("conversion")
    pytest.importorskip("llama_cpp")
    return tmp_path_factory.mktemp("gguf_presets")


SEEN: dict[str, set] = {"type": set(), "fallback": set()}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_llama_quantize(work, case):
    """Every tensor of every preset's file has the predicted type (or, left out, its source type)."""
    hf = _hf_model(work, case)
    src = _to_gguf(hf, work / f"{case}-f16.gguf", CASES[case][2] == "sp_forced")
    arch, hp, f16 = _read(src)
    assert hparams_from_hf_config(json.loads((hf / "config.json").read_text())) == hp
    shapes = {n: s for n, (_, s) in f16.items()}
    bad = []
    for preset in PRESETS_OF.get(case, PRESETS):
        dst = work / f"{case}-{preset}.gguf"
        _quantize(src, dst, preset)
        _, _, got = _read(dst)
        want = tensor_types(preset, arch, shapes, hp, order="gguf")
        assert want, case
        for name, (t, _) in got.items():
            exp = want[name].type if name in want else f16[name][0]
            if t != exp:
                bad.append(f"{preset} {name} {shapes[name]}: llama.cpp {t}, predicted {exp}"
                           f" ({want[name].reason if name in want else 'left out'})")
        SEEN["type"] |= {c.type for c in want.values()}
        SEEN["fallback"] |= {c.fallback for c in want.values()}
        dst.unlink()
    assert not bad, f"{case} ({arch}, {hp}): {len(bad)} mismatches:\n" + "\n".join(bad[:40])


def test_cases_cover_the_rules():
    """The cases above reach K types, every 32-block fallback and F16 (runs after them)."""
    if len(SEEN["type"]) == 0:
        pytest.skip("the llama.cpp cases did not run")
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "F16"} <= SEEN["type"]
    assert SEEN["fallback"] == {True, False}


# what each plan case reaches: K types beside 32-block fallbacks, only K types (tied head), F16
PLAN_REACHES = {"llama_gqa4_mixed": lambda p: p["fallbacks"] and {"Q4_0", "Q5_0"} & set(p["types"])
                and {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} & set(p["types"]),
                "mistral_tied_256": lambda p: not p["fallbacks"] and set(p["types"]) <= {"Q2_K", "Q3_K", "Q4_K",
                                                                                       "Q5_K", "Q6_K"},
                "llama_48": lambda p: "F16" in p["types"]}


@pytest.mark.parametrize("case", list(PLAN_REACHES))
def test_plan_predicts_the_file_llama_quantize_writes(work, case):
    """`effqat plan --gguf-type` from config.json alone: the converter's tensor names, every type and
    the tensors' bytes of the file llama.cpp writes (K types, 32-block fallbacks, F16, tied head)."""
    import gguf

    from effqat_plugin.memory_plan import Shape, gguf_sizes, gguf_tensors

    hf = _hf_model(work, case)
    shape = Shape.from_config(json.loads((hf / "config.json").read_text()))
    src = _to_gguf(hf, work / f"{case}-plan-f16.gguf", False)
    _, _, f16 = _read(src)
    assert {n: tuple(reversed(s)) for n, (_, s) in f16.items()} == gguf_tensors(shape)
    for preset in ("Q2_K", "Q4_K_M"):
        dst = work / f"{case}-plan-{preset}.gguf"
        _quantize(src, dst, preset)
        _, _, got = _read(dst)
        planned = gguf_sizes(shape, preset)
        # every 2-D tensor is quantized (here: no 2-D tensor llama.cpp leaves alone), 1-D ones stay F32
        assert planned["tensors"] == {n: t for n, (t, s) in got.items() if len(s) == 2}, preset
        assert planned["file_bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(dst)).tensors), preset
        assert PLAN_REACHES[case](planned), (preset, planned["types"], planned["fallbacks"])
        dst.unlink()


# ---- the API itself (no llama.cpp) ----

def _dense(n_layer=8, hidden=256, inter=512, tied=False):
    t = {"token_embd.weight": (1000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        t["output.weight"] = (1000, hidden)
    for i in range(n_layer):
        for n, s in (("attn_q", (hidden, hidden)), ("attn_k", (64, hidden)), ("attn_v", (64, hidden)),
                     ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                     ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter)), ("attn_norm", (hidden,))):
            t[f"blk.{i}.{n}.weight"] = s
    return t


def test_choice_fields_and_orders():
    t = _dense(hidden=64, inter=256)
    torch_order = tensor_types("Q4_K_M", "llama", t, {"n_layer": 8, "n_head": 4, "n_head_kv": 1})
    gguf_order = tensor_types("Q4_K_M", "llama", {n: tuple(reversed(s)) for n, s in t.items()},
                              {"n_layer": 8, "n_head": 4, "n_head_kv": 1}, order="gguf")
    assert torch_order == gguf_order
    assert "output_norm.weight" not in torch_order and "blk.0.attn_norm.weight" not in torch_order
    q = torch_order["blk.3.attn_q.weight"]
    assert isinstance(q, TypeChoice) and (q.type, q.preset_type, q.fallback) == ("Q5_0", "Q4_K", True)
    d = torch_order["blk.0.ffn_down.weight"]   # width 256: the K type, layer 0 uses more bits
    assert (d.type, d.preset_type, d.fallback) == ("Q6_K", "Q6_K", False) and "use_more_bits" in d.reason
    assert torch_order["output.weight"].type == "Q8_0"   # width 64: Q6_K does not fit


def test_use_more_bits_pattern():
    # n = 32: first 4, last 4, and every third layer from 4 + 2
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28,
                                                              29, 30, 31]


def test_bad_input_is_one_line_value_error():
    t = _dense()
    for call, match in ((lambda: tensor_types("Q4_0", "llama", t, {"n_layer": 8}), "supported: Q2_K"),
                        (lambda: tensor_types("IQ2_XS", "llama", t, {"n_layer": 8}), "unsupported"),
                        (lambda: tensor_types("Q4_K_M", "llama", t, {}), "n_layer"),
                        (lambda: tensor_types("Q4_K_M", "llama", {}, {"n_layer": 8}), "non-empty"),
                        (lambda: tensor_types("Q4_K_M", "llama", {"output.weight": (0, 3)}, {"n_layer": 1}),
                         "shape"),
                        (lambda: tensor_types("Q4_K_M", "llama", t, {"n_layer": 8}, order="numpy"), "order"),
                        (lambda: tensor_types("Q4_K_M", "llama", {"blk.9.ffn_down_exps.weight": (4, 8, 256)},
                                              {"n_layer": 8, "n_expert": 4}), "layer 9")):
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_module_documents_its_source():
    doc = gguf_presets.__doc__
    assert "llama-quant.cpp" in doc and "0.3.36" in doc and "NOT mirrored" in doc
