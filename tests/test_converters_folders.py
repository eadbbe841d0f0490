"""Folder-level behaviour: every format pair A -> B -> A, detection and inference, sharding,
the v1 zero-point conventions, the CLI, and error paths that must leave nothing behind."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from effqat_plugin.converters import FORMATS, convert, load_quantized, packing, save_quantized
from effqat_plugin.qweight import QuantFormatError

from test_converters_helpers import (BITBLAS_DIMS, assert_same, assert_tensors_same, config_files, rand_qweight, read_qcfg,
                                     stories_model)

ALL = ["eqat", "gptq", "gptq_v2", "bitblas"]


def small_bitblas_model(bits, group, seed=0):
    """Dims that BitBLAS accepts (multiples of 16 and of the group)."""
    qws = {
        "model.layers.0.self_attn.q_proj": rand_qweight(128, 128, bits, group, seed),
        "model.layers.0.mlp.up_proj": rand_qweight(256, 128, bits, group, seed + 1, bias=True),
        "model.layers.0.mlp.down_proj": rand_qweight(128, 256, bits, group, seed + 2),
    }
    tensors = {"model.embed_tokens.weight": torch.randn(512, 128).half(), "lm_head.weight": torch.randn(512, 128).half(),
               "model.norm.weight": torch.ones(128, dtype=torch.bfloat16)}
    return qws, tensors


def no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")] == []


def test_registry_lists_formats():
    assert set(ALL) <= set(FORMATS)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_pairs_ragged_stories_shapes(tmp_path, bits):
    """A -> B -> A for eqat / gptq / gptq_v2 (ragged 172-wide dims, group 64)."""
    qws, tensors = stories_model(bits, 64, seed=bits)
    cfg = config_files(tmp_path)
    fmts = ["eqat", "gptq", "gptq_v2"]
    for a in fmts:
        src = tmp_path / f"{a}"
        save_quantized(src, fmt=a, qweights=qws, tensors=tensors, config_dir_or_files=cfg)
        for b in fmts:
            mid, back = tmp_path / f"{a}-{b}", tmp_path / f"{a}-{b}-{a}"
            rep = convert(src, mid, to=b)
            assert rep["source_format"] == a and rep["target_format"] == b
            convert(mid, back, to=a)
            for d, f in ((mid, b), (back, a)):
                fmt, q2, t2, qc = load_quantized(d)
                assert fmt == f
                assert_same(qws, q2)
                assert_tensors_same(tensors, t2)
            assert (mid / "tokenizer.json").read_bytes() == (cfg / "tokenizer.json").read_bytes()
            out_cfg = json.loads((mid / "config.json").read_text())
            hf_q = out_cfg.pop("quantization_config", None)
            assert out_cfg == json.loads((cfg / "config.json").read_text())
            if b == "eqat":
                assert hf_q is None  # transformers cannot load EQAT: no stale GPTQ config either
            else:  # transformers' loader reads this, GPTQModel the quantize_config.json
                q = read_qcfg(mid)
                assert {k: hf_q[k] for k in q} == q
                assert hf_q["backend"] == "torch"  # 172-wide MLP: the kernel that takes every shape


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_all_pairs_with_bitblas(tmp_path, bits, group):
    qws, tensors = small_bitblas_model(bits, group, seed=bits + group)
    cfg = config_files(tmp_path, **BITBLAS_DIMS)
    src = tmp_path / "bb"
    save_quantized(src, fmt="bitblas", qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    q = read_qcfg(src)
    assert (q["format"], q["checkpoint_format"], q["bits"], q["group_size"], q["sym"], q["desc_act"]) == \
        ("bitblas", "bitblas", bits, group, False, False)
    for b in ALL:
        mid, back = tmp_path / f"bb-{b}", tmp_path / f"bb-{b}-bb"
        convert(src, mid, to=b)
        convert(mid, back, to="bitblas")
        for d in (mid, back):
            _, q2, t2, _ = load_quantized(d)
            assert_same(qws, q2)
            assert_tensors_same(tensors, t2)
        # byte-identical round trip
        a_t, b_t = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
        assert_tensors_same(a_t, b_t)


def test_quantize_config_contents(tmp_path):
    qws, tensors = stories_model(3, 64, layers=1)
    rep = save_quantized(tmp_path / "g", fmt="gptq", qweights=qws, tensors=tensors,
                         config_dir_or_files=config_files(tmp_path), meta={"eqat": {"lr": 1}})
    q = read_qcfg(tmp_path / "g")
    assert q["quant_method"] == "gptq" and q["format"] == q["checkpoint_format"] == "gptq"
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"]) == (3, 64, False, False)
    assert any(s.startswith("gptqmodel:") for s in q["meta"]["quantizer"])
    assert any(s.startswith("effqat:") for s in q["meta"]["quantizer"])
    assert q["meta"]["eqat"] == {"lr": 1} and q["meta"]["converter"] == "effqat.converters"
    # 172-wide modules cannot be continuous 3-bit in GPTQModel's TORCH kernel -> stored at 4 bits
    wide = {k for k in qws if "mlp" in k}
    assert set(rep["wider_modules"]) == wide == set(q["meta"]["wider_modules"])
    assert all(v == {"bits": 4} for v in q["dynamic"].values()) and len(q["dynamic"]) == 3
    # extra bytes: (ceil(n*4/32) - ceil(n*3/32)) * out * 4 + zero words, per module
    exp = 0
    for k in wide:
        n, o = qws[k].in_features, qws[k].out_features
        exp += ((-(-n * 4 // 32)) - (-(-n * 3 // 32))) * o * 4 + ((-(-o * 4 // 32)) - (-(-o * 3 // 32))) * qws[k].n_groups * 4
    assert rep["wider_extra_bytes"] == exp
    assert "model.layers.0.self_attn.q_proj" not in rep["wider_modules"]
    v2 = save_quantized(tmp_path / "e", fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    assert v2["wider_modules"] == {}  # EQAT holds any 3-bit shape


def test_sharded_output_and_streaming_input(tmp_path):
    qws, tensors = stories_model(2, 64, seed=3)
    src = tmp_path / "src"
    save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path),
                   max_shard_size="10KB")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 3
    out = tmp_path / "out"
    rep = convert(src, out, to="gptq", max_shard_size="8KB")
    assert len(rep["files"]) > 3 and (out / "model.safetensors.index.json").exists()
    _, q2, t2, _ = load_quantized(out)
    assert_same(qws, q2)
    assert_tensors_same(tensors, t2)


def test_original_eqat_folder_inference(tmp_path):
    """Original zoo folders: no quantize_config.json; bits/group from shapes, else from the name."""
    qws, tensors = stories_model(2, 64, seed=5, layers=1)
    d = tmp_path / "x"
    save_quantized(d, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    (d / "quantize_config.json").unlink()
    fmt, q2, _, cfg = load_quantized(d)
    assert fmt == "eqat" and (cfg["bits"], cfg["group_size"]) == (2, 64)  # the 172-wide modules pin it
    assert_same(qws, q2)
    with pytest.raises(ValueError, match="do not fit|fit"):
        convert(d, tmp_path / "bad", to="gptq", bits=4)
    assert not (tmp_path / "bad").exists()

    # only 64-wide inputs with one group each: group 64, 128, ... all fit -> ambiguous
    sq = {"model.layers.0.self_attn.q_proj": rand_qweight(64, 64, 4, 64, 1),
          "model.layers.0.self_attn.o_proj": rand_qweight(64, 64, 4, 64, 2)}
    amb = tmp_path / "amb"
    save_quantized(amb, fmt="eqat", qweights=sq, tensors={}, config_dir_or_files=config_files(tmp_path))
    (amb / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="--bits and --group-size"):
        convert(amb, tmp_path / "o1", to="gptq_v2")
    named = tmp_path / "Llama-2-7b-EfficientQAT-w4g128"
    shutil.copytree(amb, named)
    rep = convert(named, tmp_path / "o2", to="gptq_v2")
    assert (rep["bits"], rep["group_size"], rep["inferred_from"]) == (4, 128, "folder name")
    rep = convert(amb, tmp_path / "o3", to="gptq_v2", group_size=64)
    assert (rep["bits"], rep["group_size"]) == (4, 64)
    assert_same(sq, load_quantized(tmp_path / "o3")[1])
    bad_name = tmp_path / "m-w2g64"
    shutil.copytree(amb, bad_name)
    with pytest.raises(ValueError, match="folder name says w2g64"):
        convert(bad_name, tmp_path / "o4", to="gptq_v2")


def _per_field_v1(d, bits):
    """Rewrite a gptq_v2 folder as a per-field v1 folder (AutoGPTQ convention, no gptqmodel meta)."""
    t = load_file(d / "model.safetensors")
    for k in list(t):
        if k.endswith(".qzeros"):
            o = t[k.replace("qzeros", "scales")].shape[1]
            z = packing.unpack_stream(t[k], bits, o, 1)
            t[k] = packing.pack_stream(((z.to(torch.int16) - 1) & ((1 << bits) - 1)).to(torch.uint8), bits, 1)
    save_file(t, str(d / "model.safetensors"))
    q = read_qcfg(d)
    q["checkpoint_format"] = q["format"] = "gptq"
    q["meta"] = {"quantizer": ["autogptq:0.7.1"]}
    (d / "quantize_config.json").write_text(json.dumps(q))


@pytest.mark.parametrize("bits", [2, 4])
def test_v1_reader_conventions(tmp_path, bits):
    qws, tensors = stories_model(bits, 64, seed=11, layers=1)
    d = tmp_path / "pf"
    save_quantized(d, fmt="gptq_v2", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    _per_field_v1(d, bits)
    fmt, q2, _, _ = load_quantized(d)
    assert fmt == "gptq"
    assert_same(qws, q2)  # no gptqmodel meta -> per-field reading, exact
    _, q3, _, _ = load_quantized(d, v1_zeros="word")  # forcing the other convention misreads borrows
    assert any(not qws[k].equal(q3[k]) for k in qws)
    rep = convert(d, tmp_path / "v2", to="gptq_v2", dry_run=True)
    assert rep["v1_zeros_read_as"] == "field" and not (tmp_path / "v2").exists()
    # our own v1 output: sign-flip encoding (default, nothing borrows) and the plain word-wide one
    w = tmp_path / "flip"
    rep = convert(d, w, to="gptq")
    assert rep["v1_borrow_fields"] == 0 and rep["v1_total_fields"] > 0
    assert_same(qws, load_quantized(w)[1])
    assert_same(qws, load_quantized(w, v1_zeros="field")[1])  # either reading convention is exact
    w = tmp_path / "word"
    rep = convert(d, w, to="gptq", v1_encoding="plain")
    assert rep["v1_borrow_fields"] > 0
    assert_same(qws, load_quantized(w)[1])


def test_v1_borrow_warning_logged(tmp_path, caplog):
    qws, tensors = stories_model(2, 64, seed=2, layers=1)
    with caplog.at_level(logging.WARNING, logger="effqat.converters"):
        rep = save_quantized(tmp_path / "v1", fmt="gptq", qweights=qws, tensors=tensors,
                             config_dir_or_files=config_files(tmp_path), v1_encoding="plain")
    n = rep["v1_borrow_fields"]
    assert n > 0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"{n} of {rep['v1_total_fields']}" in msg and "gptq_v2" in msg and "vLLM" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="effqat.converters"):
        rep = save_quantized(tmp_path / "v1f", fmt="gptq", qweights=qws, tensors=tensors,
                             config_dir_or_files=config_files(tmp_path))
    assert rep["v1_borrow_fields"] == 0 and "borrow" not in caplog.text
    with pytest.raises(ValueError, match="v1_encoding"):
        save_quantized(tmp_path / "bad", fmt="gptq", qweights=qws, tensors=tensors,
                       config_dir_or_files=config_files(tmp_path), v1_encoding="nope")


def test_bitblas_refusals(tmp_path):
    cfg = config_files(tmp_path)
    qws, tensors = stories_model(2, 64, layers=1)  # 172-wide
    src = tmp_path / "s"
    save_quantized(src, fmt="gptq_v2", qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    with pytest.raises(QuantFormatError, match="divisible"):
        convert(src, tmp_path / "bb", to="bitblas")
    q3, t3 = small_bitblas_model(3, 64)
    save_quantized(tmp_path / "s3", fmt="gptq_v2", qweights=q3, tensors=t3,
                   config_dir_or_files=config_files(tmp_path, **BITBLAS_DIMS))
    with pytest.raises(QuantFormatError, match="3-bit"):
        convert(tmp_path / "s3", tmp_path / "bb3", to="bitblas")
    with pytest.raises(QuantFormatError, match="3-bit"):
        save_quantized(tmp_path / "bb3b", fmt="bitblas", qweights=q3, tensors=t3, config_dir_or_files=cfg)
    q256 = {"a.q_proj": rand_qweight(64, 512, 4, 256, 0), "a.k_proj": rand_qweight(64, 512, 4, 256, 1)}
    with pytest.raises(QuantFormatError, match="group sizes"):
        save_quantized(tmp_path / "bb256", fmt="bitblas", qweights=q256, tensors={}, config_dir_or_files=cfg)
    for n in ("bb", "bb3", "bb3b", "bb256"):
        assert not (tmp_path / n).exists() and no_leftovers(tmp_path, n)


def test_error_paths_leave_nothing(tmp_path):
    cfg = config_files(tmp_path)
    qws, tensors = stories_model(2, 64, seed=9, layers=2)
    src = tmp_path / "src"
    save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=cfg, max_shard_size="20KB")

    # existing destination
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert(src, dst, to="gptq")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert(src, dst, to="gptq", overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "quantize_config.json").exists()
    with pytest.raises(FileExistsError):
        save_quantized(dst, fmt="gptq", qweights=qws, tensors=tensors, config_dir_or_files=cfg)

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        edit(d, idx)
        return d

    def edit_tensor(key, fn):
        def _e(d, idx):
            shard = d / idx["weight_map"][key]
            t = load_file(shard)
            r = fn(t)
            save_file(t, str(shard))
            if r == "drop":
                del idx["weight_map"][key]
                (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return _e

    last = "model.layers.1.mlp.down_proj"  # in the last shards: fails mid-stream
    cases = {
        "missing": edit_tensor(f"{last}.scales", lambda t: (t.pop(f"{last}.scales"), "drop")[1]),
        "truncated": edit_tensor(f"{last}.qweight", lambda t: t.__setitem__(f"{last}.qweight", t[f"{last}.qweight"][:-1])),
        "mixed": edit_tensor(f"{last}.qweight", lambda t: t.__setitem__(f"{last}.qweight", t[f"{last}.qweight"].to(torch.int8))),
    }
    for name, edit in cases.items():
        d = broken(name, edit)
        out = tmp_path / f"out-{name}"
        with pytest.raises((ValueError, FileNotFoundError)):
            convert(d, out, to="gptq_v2")
        assert not out.exists() and no_leftovers(tmp_path, out.name), name

    # corrupt values found only while streaming (bits set outside the 3-bit fields of EQAT words)
    q3, t3 = stories_model(3, 64, seed=4, layers=2)
    s3 = tmp_path / "s3"
    save_quantized(s3, fmt="eqat", qweights=q3, tensors=t3, config_dir_or_files=cfg, max_shard_size="20KB")
    idx = json.loads((s3 / "model.safetensors.index.json").read_text())
    key = f"{last}.qweight"
    shard = s3 / idx["weight_map"][key]
    t = load_file(shard)
    t[key][3, 5] |= (1 << 31)
    save_file(t, str(shard))
    out = tmp_path / "out-corrupt"
    with pytest.raises(QuantFormatError, match="outside the 3-bit fields"):
        convert(s3, out, to="gptq")
    assert not out.exists() and no_leftovers(tmp_path, out.name)

    # pickled weights only: refused, never unpickled
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(cfg / "config.json", pk)
    (pk / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="never"):
        convert(pk, tmp_path / "out-pk", to="gptq")
    assert not (tmp_path / "out-pk").exists()
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nope", tmp_path / "out-nope", to="gptq")
    with pytest.raises(ValueError, match="unknown format"):
        convert(src, tmp_path / "out-x", to="marlin")
    # same source and destination
    with pytest.raises(ValueError, match="differ"):
        convert(src, src, to="gptq", overwrite=True)


def _cli(argv):
    from effqat_plugin.commands import convert as cmd
    p = argparse.ArgumentParser(prog="effqat")
    sub = p.add_subparsers(dest="command", required=True)
    cmd.add_parser(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys):
    qws, tensors = stories_model(3, 64, seed=1, layers=1)
    src = tmp_path / "Model-EfficientQAT-w3g64"
    save_quantized(src, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path))
    (src / "quantize_config.json").unlink()
    assert _cli(["convert", str(src), str(tmp_path / "o"), "--to", "gptq", "--dry-run"]) == 0
    assert "would convert" in capsys.readouterr().out and not (tmp_path / "o").exists()
    assert _cli(["convert", str(src), str(tmp_path / "o"), "--to", "gptq"]) == 0
    out = capsys.readouterr().out
    assert "stored wider" in out and "w3g64" in out
    assert_same(qws, load_quantized(tmp_path / "o")[1])
    try:
        from effqat_plugin import cli
        cli.build_parser()
    except ImportError:  # other sub-commands not written yet
        return
    assert cli.main(["convert", str(src), str(tmp_path / "o"), "--to", "gptq"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(tmp_path / "o"), "--to", "gptq", "--bits", "2"]) == 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_word_path_writes_identical_bytes(tmp_path, bits):
    """The packed-word fast path and the unpack/repack path produce byte-identical folders."""
    qws, tensors = small_bitblas_model(bits, 64, seed=bits)
    qws["model.layers.0.mlp.extra_proj"] = rand_qweight(172, 128, bits, 64, 9)  # ragged out (not for bitblas)
    cfg = config_files(tmp_path, **BITBLAS_DIMS)
    no_ragged = {k: v for k, v in qws.items() if "extra" not in k}   # BitBLAS needs out % 16 == 0
    for a in ALL:
        base_q = qws if a != "bitblas" else no_ragged
        save_quantized(tmp_path / a, fmt=a, qweights=base_q, tensors=tensors, config_dir_or_files=cfg)
        for b in ALL:
            src, q = tmp_path / a, base_q
            if b == "bitblas" and a != "bitblas":
                src, q = tmp_path / f"{a}-for-bitblas", no_ragged
                if not src.exists():
                    save_quantized(src, fmt=a, qweights=q, tensors=tensors, config_dir_or_files=cfg)
            fast, slow = tmp_path / f"{a}-{b}-fast", tmp_path / f"{a}-{b}-slow"
            rf = convert(src, fast, to=b, fast=True)
            rs = convert(src, slow, to=b, fast=False)
            assert_tensors_same(load_file(fast / "model.safetensors"), load_file(slow / "model.safetensors"))
            assert rf["v1_borrow_fields"] == rs["v1_borrow_fields"]
            assert_same(q, load_quantized(fast)[1])


@pytest.mark.parametrize("bits", [2, 4])
def test_authors_bitblas_repos_older_gptqmodel_names(tmp_path, bits):
    """GPTQModel 0.9.8-4.x (the ChenMnZ/*-EfficientQAT-*-BitBLAS repos) stored ``<module>.zeros`` and
    a quantize_config without ``format``; we read it and write 7.7's ``.qzeros``."""
    qws, tensors = small_bitblas_model(bits, 64, seed=40 + bits)
    cfg = config_files(tmp_path, **BITBLAS_DIMS)
    old = tmp_path / "Llama-2-7b-EfficientQAT-w2g64-BitBLAS"
    save_quantized(old, fmt="bitblas", qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    t = load_file(old / "model.safetensors")
    t = {(k[: -len("qzeros")] + "zeros" if k.endswith(".qzeros") else k): v for k, v in t.items()}
    save_file(t, str(old / "model.safetensors"))
    (old / "quantize_config.json").write_text(json.dumps({
        "bits": bits, "group_size": 64, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
        "sym": False, "true_sequential": True, "lm_head": False, "model_name_or_path": None,
        "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "bitblas",
        "meta": {"quantizer": "gptqmodel:0.9.8"}}))
    fmt, q2, t2, _ = load_quantized(old)
    assert fmt == "bitblas"
    assert_same(qws, q2)
    assert_tensors_same(tensors, t2)  # .zeros is not carried as a plain tensor
    for to in ("gptq_v2", "bitblas"):
        for fast in (True, False):
            d = tmp_path / f"{to}-{fast}"
            convert(old, d, to=to, fast=fast)
            assert_same(qws, load_quantized(d)[1])
            keys = load_file(d / "model.safetensors").keys()
            assert not any(k.endswith(".zeros") for k in keys) and any(k.endswith(".qzeros") for k in keys)
    t["model.layers.0.mlp.up_proj.qzeros"] = t["model.layers.0.mlp.up_proj.zeros"].clone()
    save_file(t, str(old / "model.safetensors"))
    with pytest.raises(QuantFormatError, match="both"):
        load_quantized(old)
