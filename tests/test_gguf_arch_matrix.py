"""``convert --to gguf`` beyond Llama/Qwen3: representative cases of the architecture matrix.

The checkpoints are the ones ``scripts/gguf_arch_table.py`` builds (that script prints the whole
table): the case's tiny HF model defused as GPTQModel.load defuses it, random w4g32 codes in every
quantized linear, SmolLM2's tokenizer. Here the quantized linears are "every nn.Linear in the decoder
layers but the case's routers", which the table script checks is exactly GPTQModel's definition for
every case (so GPTQModel need not be imported here, ~15 s).

Oracle: every quantized tensor of the file, decoded by ``gguf.quants.dequantize``, holds exactly the
rows ``(q - z) * s`` of the source module(s) its name says (compared as sorted rows, so independent
of the converter's row permutations); every source row lands exactly once; a quantized module's bias
follows its rows' permutation. A case llama.cpp's converter does not take fails through the CLI with
exit 2, one stderr line naming the architecture, and no file.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from effqat_plugin import cli
from effqat_plugin.converters import convert

from gguf_helpers import read_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("conversion")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gguf_arch_table import build_case, case_named  # noqa: E402

# dense GQA + sliding window; biases on q/k/v and the c_fc/c_proj MLP; q/k norms after the
# projections; MoE with 4 routed experts and a shared expert (router and shared-expert gate stay fp);
# then the types whose original checkpoint fuses what GPTQModel quantizes apart (gguf_layout): phi3's
# and glm4's gate_up_proj, Mixtral's w1/w2/w3 experts, gpt-oss's stacked, transposed, interleaved
# experts with biases; and GPT-NeoX, whose fused qkv the converter regroups by heads
CONVERTING = ("mistral", "starcoder2", "olmo2", "qwen2_moe", "phi3", "glm4", "mixtral", "gpt_oss", "gpt_neox")

# relative module name (expert index as N) -> (GGUF tensor base name, position among the modules it holds)
GGUF_BASE = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
    "mlp.experts.N.gate_proj": "ffn_gate_exps", "mlp.experts.N.up_proj": "ffn_up_exps",
    "mlp.experts.N.down_proj": "ffn_down_exps", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "self_attn.qkv_proj": "attn_qkv", "attention.query_key_value": "attn_qkv",
    "attention.dense": "attn_output", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}
# llama.cpp's phi3 and glm4 hold gate and up as one ffn_up tensor, gate rows first
FUSED = {"phi3": {"mlp.gate_proj": ("ffn_up", 0), "mlp.up_proj": ("ffn_up", 1)},
         "glm4": {"mlp.gate_proj": ("ffn_up", 0), "mlp.up_proj": ("ffn_up", 1)}}
_MOD = re.compile(r"^(?:model|gpt_neox)\.layers\.(\d+)\.(.+)$")
# torch's own import-time log lines (glog format, "W1202 07:20:21.402000 ..."), which reach stderr in
# a pytest process when this module's test runs first and converting imports torchao; the effqat
# program prints none of them (quiet_third_party_logs)
_TORCH_LOG = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d")


def error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not _TORCH_LOG.match(ln)]


def expected_layout(qws: dict, model_type: str) -> dict:
    """GGUF tensor name -> source modules in stacking order (one per expert for a 3-D tensor, or the
    parts of a fused tensor in row order)."""
    out = {}
    for m in qws:
        layer, rel = _MOD.match(m).groups()
        expert = re.search(r"\.experts\.(\d+)\.", rel)
        key = re.sub(r"\.experts\.\d+\.", ".experts.N.", rel)
        base, pos = FUSED.get(model_type, {}).get(key, (GGUF_BASE[key], 0))
        out.setdefault(f"blk.{layer}.{base}.weight", []).append((int(expert.group(1)) if expert else pos, m))
    return {n: [m for _, m in sorted(v)] for n, v in out.items()}


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def row_permutation(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """perm with got[i] == want[perm[i]] (rows are distinct random codes)."""
    index = {r.tobytes(): i for i, r in enumerate(want)}
    assert len(index) == len(want)
    return np.array([index[r.tobytes()] for r in got])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-arch")
    out = {}
    for t in CONVERTING:
        src, qws = build_case(case_named(t), tmp / f"{t}-q", source="linears")
        dst = tmp / f"{t}.gguf"
        out[t] = (src, dst, qws, convert(src, dst, to="gguf"))
    return out


@pytest.mark.parametrize("model_type", CONVERTING)
def test_quantized_tensors_decode_to_the_exact_rows(converted, model_type):
    src, dst, qws, rep = converted[model_type]
    tensors, _ = read_gguf(dst)
    layout = expected_layout(qws, model_type)
    # every quantized module is in the file, 4-bit codes as lossless Q5_0, none as an F32 fallback
    assert {t["name"] for t in rep["tensors"]} == set(layout)
    assert rep["tensor_types"] == {"Q5_0": len(layout)} and rep["f32_fallback"] == []
    n_rows = 0
    for name, mods in layout.items():
        t, raw, shape = tensors[name]
        assert t == "Q5_0", name
        x = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q5_0)
        assert x.dtype == np.float32
        per_module = x.reshape(len(mods), -1, x.shape[-1]) if len(mods) > 1 else x[None]
        assert per_module.shape[0] == len(mods) and list(x.shape) == shape, name
        for got, m in zip(per_module, mods):
            want = qws[m].dequantize().numpy()
            assert got.shape == want.shape, (name, m)
            # the same rows, whatever order the converter put them in (bit for bit)
            assert np.array_equal(sorted_rows(got), sorted_rows(want)), (name, m)
            n_rows += want.shape[0]
            if qws[m].bias is not None:   # the bias goes with its rows
                perm = row_permutation(got, want)
                bt, braw, _ = tensors[name.replace(".weight", ".bias")]
                b = gguf.quants.dequantize(braw, getattr(gguf.GGMLQuantizationType, bt))
                b = b.reshape(len(mods), -1)[mods.index(m)]
                assert np.array_equal(b, qws[m].bias.float().numpy()[perm]), (name, m)
    assert n_rows == sum(q.int_weight.shape[0] for q in qws.values())
    if model_type == "starcoder2":
        assert sum(q.bias is not None for q in qws.values()) == 2 * 6
    if model_type == "qwen2_moe":   # routers stay fp, experts stacked 3-D
        assert tensors["blk.0.ffn_gate_exps.weight"][2] == [4, 32, 64]
        assert tensors["blk.0.ffn_gate_inp.weight"][0] in ("F16", "F32")
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"][0] in ("F16", "F32")
    if model_type in FUSED:   # gate and up rows in one tensor, in that order (compared as blocks)
        gate, up = layout["blk.0.ffn_up.weight"]
        assert gate.endswith("gate_proj") and up.endswith("up_proj")
        assert tensors["blk.0.ffn_up.weight"][2][0] == 2 * qws[gate].int_weight.shape[0]
    if model_type == "gpt_oss":   # per-expert biases, de-interleaved back to gate / up
        assert sum(q.bias is not None for q in qws.values()) == 2 * (4 + 4 * 3)
    if model_type == "gpt_neox":   # qkv regrouped by heads: same rows, not the same order
        t, raw, _ = tensors["blk.0.attn_qkv.weight"]
        x = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q5_0)
        qkv = qws["gpt_neox.layers.0.attention.query_key_value"].dequantize().numpy()
        assert not np.array_equal(x, qkv)


def test_cli_refuses_an_architecture_llama_cpp_does_not_know(tmp_path, capsys):
    src, _ = build_case(case_named("opt"), tmp_path / "opt-q", source="linears")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "opt.gguf"
    code = cli.main(["convert", str(src), str(dst), "--to", "gguf"])
    err = error_lines(capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("effqat convert: error:") and "OPTForCausalLM" in err[0], err
    assert not dst.exists() and list(out.iterdir()) == []


def test_cli_refuses_a_converter_that_transposes_a_quantized_weight(tmp_path, capsys):
    """DeepSeek's MLA: llama.cpp's converter splits kv_b_proj and transposes its k_b half, which moves
    the input columns the quantization groups run along; refused in one line, nothing written."""
    import dataclasses

    from gguf_arch_table import VARIANTS

    case = case_named("deepseek_v2")
    case = dataclasses.replace(case, config={**case.config, **VARIANTS["deepseek_v2"][0]})
    src, _ = build_case(case, tmp_path / "dsv2-q", source="linears")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "dsv2.gguf"
    code = cli.main(["convert", str(src), str(dst), "--to", "gguf"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert "attn_k_b" in err[0] and "input columns" in err[0] and "failed on" not in err[0], err
    assert list(out.iterdir()) == []
