"""``convert --to gguf``: the file is llama.cpp's converter's, the quantized tensors are lossless.

Oracle: ``gguf.quants.dequantize`` (llama.cpp's reference decoders in gguf-py) on every quantized
tensor of the written file must give ``(q - z) * s`` of the source in float32 bit for bit, in the
row order llama.cpp's converter defines (Llama's q/k rows permuted by its own ``permute``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effqat_plugin import cli
from effqat_plugin.converters import convert

from gguf_helpers import read_gguf, write_tiny

gguf = pytest.importorskip("gguf")
conversion = pytest.importorskip("conversion")

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
LOSSLESS = {2: "Q4_0", 3: "Q4_0", 4: "Q5_0", 8: "Q8_0"}


def expected(qws: dict, arch: str) -> dict:
    """GGUF name -> float32 weights in the converter's row order."""
    from conversion.llama import LlamaModel
    out = {}
    for m, qw in qws.items():
        i, rel = m.split(".")[2], ".".join(m.split(".")[3:])
        w = qw.dequantize()
        if arch == "llama" and rel == "self_attn.q_proj":
            w = LlamaModel.permute(w, 4, 4)
        if arch == "llama" and rel == "self_attn.k_proj":
            w = LlamaModel.permute(w, 4, 2)
        out[f"blk.{i}.{GGUF_NAMES[rel]}.weight"] = w.numpy()
    return out


def decoded(path) -> dict:
    return {n: (t, gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, t)), shape)
            for n, (t, raw, shape) in read_gguf(path)[0].items()}


def mid_zeros(qws):
    """8-bit zero points at 128 (as trained 8-bit ones sit): every q - z fits int8, so Q8_0 holds it."""
    for qw in qws.values():
        qw.zeros.fill_(128)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """One tiny Llama per width, gptq_v2 source -> GGUF (module-wide: each conversion takes seconds)."""
    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    for bits, group in ((2, 32), (3, 64), (4, 32), (8, -1)):
        src, qws = write_tiny(tmp, "gptq_v2", bits, group, seed=bits,
                              **({"fix": mid_zeros} if bits == 8 else {}))
        dst = tmp / f"w{bits}.gguf"
        rep = convert(src, dst, to="gguf")
        out[bits] = (src, dst, qws, rep)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_quantized_tensor_decodes_bit_exact(gguf_files, bits):
    src, dst, qws, rep = gguf_files[bits]
    assert rep["architecture"] == "LlamaForCausalLM" and rep["gguf_arch"] == "llama"
    assert rep["tensor_types"] == {LOSSLESS[bits]: len(qws)} and rep["f32_fallback"] == []
    got, want = decoded(dst), expected(qws, "llama")
    for name, w in want.items():
        t, x, shape = got[name]
        assert t == LOSSLESS[bits], name
        assert shape == list(w.shape)
        assert x.dtype == np.float32 and np.array_equal(x, w), name
    # the rest is llama.cpp's converter's: fp16 embeddings / head, f32 norms, its metadata
    assert got["token_embd.weight"][0] == "F16" and got["output.weight"][0] == "F16"
    assert got["blk.0.attn_norm.weight"][0] == "F32"
    kv = read_gguf(dst)[1]
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(kv["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    assert int(kv["llama.block_count"].parts[-1][0]) == 2


def test_same_file_from_every_source_format(tmp_path, gguf_files):
    """gptq (v1, sign-flipped zero-point-0 groups), eqat, bitblas and awq folders of the same 4-bit
    weights give a file byte-identical to the gptq_v2 folder's (same folder name, so the same
    general.name)."""
    src, dst, qws, _ = gguf_files[4]
    for fmt in ("gptq", "eqat", "bitblas", "awq"):
        other = tmp_path / fmt / src.name
        convert(src, other, to=fmt)
        out = tmp_path / f"{fmt}.gguf"
        rep = convert(other, out, to="gguf")
        assert rep["source_format"] == fmt and rep["tensor_types"] == {"Q5_0": len(qws)}
        assert out.read_bytes() == dst.read_bytes(), fmt


def test_rows_no_block_holds_are_exact_f32_and_listed(tmp_path, capsys):
    """in_features 100 (down_proj) fits no 32-block: exact F32, named in the output line and report."""
    src, qws = write_tiny(tmp_path, "gptq_v2", 2, 32, shapes={
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (100, 64), "mlp.up_proj": (100, 64),
        "mlp.down_proj": (64, 100)}, intermediate_size=100)
    dst = tmp_path / "r.gguf"
    assert cli.main(["convert", str(src), str(dst), "--to", "gguf", "--output-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "2 quantized tensor(s) fit no GGUF block type" in out
    assert "blk.0.ffn_down.weight" in out and "blk.1.ffn_down.weight" in out
    got, want = decoded(dst), expected(qws, "llama")
    for name, w in want.items():
        t, x, _ = got[name]
        assert t == ("F32" if "ffn_down" in name else "Q4_0")
        assert np.array_equal(x, w), name
    assert got["output.weight"][0] == "Q8_0" and "output Q8_0" in out


def _nothing_written(folder, dst):
    assert not dst.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{dst.name}")]


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys):
    src, qws = write_tiny(tmp_path, "gptq_v2", 4, 32)
    out = tmp_path / "o"
    out.mkdir()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir())

    def run(*argv):
        code = cli.main(["convert", *argv, "--to", "gguf"])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err

    # group 16: blocks of 32 would straddle two steps
    g16, _ = write_tiny(tmp_path, "gptq_v2", 4, 16, name="g16")
    code, err = run(str(g16), str(out / "a.gguf"))
    assert code == 2 and len(err) == 1 and "not a multiple of 32" in err[0]
    _nothing_written(out, out / "a.gguf")
    # act-order g_idx
    from effqat_plugin.converters import load_quantized, save_quantized
    _, qa, ta, _ = load_quantized(src)
    m = "model.layers.0.mlp.up_proj"
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    qa[m].g_idx = qa[m].g_idx[perm].contiguous()
    actord = tmp_path / "actorder"
    save_quantized(actord, fmt="gptq_v2", qweights=qa, tensors=ta, config_dir_or_files=src)
    code, err = run(str(actord), str(out / "b.gguf"))
    assert code == 2 and len(err) == 1 and "act-order" in err[0]
    _nothing_written(out, out / "b.gguf")
    # an architecture llama.cpp's converter does not know
    unk = tmp_path / "unknown"
    unk.mkdir()
    for f in src.iterdir():
        (unk / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((unk / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (unk / "config.json").write_text(json.dumps(cfg))
    code, err = run(str(unk), str(out / "c.gguf"))
    assert code == 2 and len(err) == 1 and "NoSuchModelForCausalLM" in err[0] and "not known" in err[0]
    _nothing_written(out, out / "c.gguf")
    # an existing destination is kept
    (out / "d.gguf").write_bytes(b"keep")
    code, err = run(str(src), str(out / "d.gguf"))
    assert code == 2 and "already exists" in err[0] and (out / "d.gguf").read_bytes() == b"keep"
    # not a .gguf name / inside the source folder
    code, err = run(str(src), str(out / "e.bin"))
    assert code == 2 and ".gguf" in err[0]
    code, err = run(str(src), str(src / "f.gguf"))
    assert code == 2 and "outside the source folder" in err[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir()) == before
