"""Bad input gets one clear line naming the file, exit code 2, no traceback, nothing written,
the input folder untouched: truncated / corrupt shards, an index naming a missing shard, NaN/Inf
scales, shapes contradicting config.json (convert, eval's loader, e2e's loader)."""
from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file, save_file

from effqat_plugin.cli import main
from effqat_plugin.converters import convert, save_quantized
from effqat_plugin.loading import load_checkpoint, load_for_eval

from test_converters_helpers import config_files, stories_model


def folder_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def src(tmp_path):
    qws, tensors = stories_model(2, 64, seed=5, layers=2)
    cfg = config_files(tmp_path)
    c = json.loads((cfg / "config.json").read_text())
    c["num_hidden_layers"] = 2
    (cfg / "config.json").write_text(json.dumps(c))
    d = tmp_path / "src"
    save_quantized(d, fmt="eqat", qweights=qws, tensors=tensors, config_dir_or_files=cfg)
    return d


def run_convert(tmp_path, src, capsys, *extra):
    before = folder_digest(src)
    dst = tmp_path / "out"
    rc = main(["convert", str(src), str(dst), "--to", "gptq_v2", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert folder_digest(src) == before
    return err


def shard(src):
    return src / "model.safetensors"


@pytest.mark.parametrize("cut", ["data", "header", "tiny"])
def test_truncated_shard(tmp_path, src, capsys, cut):
    data = shard(src).read_bytes()
    keep = {"data": len(data) - 100, "header": 40, "tiny": 4}[cut]
    shard(src).write_bytes(data[:keep])
    err = run_convert(tmp_path, src, capsys)
    assert "model.safetensors" in err and "corrupt or truncated" in err


def test_garbage_header(tmp_path, src, capsys):
    data = bytearray(shard(src).read_bytes())
    data[8:40] = b"#" * 32
    shard(src).write_bytes(bytes(data))
    assert "corrupt or truncated" in run_convert(tmp_path, src, capsys)


def test_index_names_missing_shard(tmp_path, src, capsys):
    t = load_file(shard(src))
    keys = sorted(t)
    half = len(keys) // 2
    save_file({k: t[k] for k in keys[:half]}, str(src / "model-00001-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[:half]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in keys[half:]})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    shard(src).unlink()
    err = run_convert(tmp_path, src, capsys)
    assert "model.safetensors.index.json" in err and "model-00002-of-00002.safetensors" in err
    (src / "model.safetensors.index.json").write_text("{not json")
    assert "not valid JSON" in run_convert(tmp_path, src, capsys)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fast", [True, False])
def test_nonfinite_scales(tmp_path, src, capsys, bad, fast):
    t = load_file(shard(src))
    k = "model.layers.1.mlp.up_proj.scales"
    t[k][0, 3] = bad
    save_file(t, str(shard(src)))
    if fast:
        err = run_convert(tmp_path, src, capsys)
    else:  # the unpack/repack path checks too
        with pytest.raises(ValueError) as e:
            convert(src, tmp_path / "slow", to="gptq", fast=False)
        err = str(e.value)
        assert not (tmp_path / "slow").exists()
    assert "model.safetensors" in err and "up_proj.scales" in err and "NaN/Inf" in err
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_checkpoint(str(src))


@pytest.mark.parametrize("key,value,what", [("intermediate_size", 128, "intermediate_size=128"),
                                            ("hidden_size", 96, "hidden_size=96"),
                                            ("num_hidden_layers", 1, "num_hidden_layers=1")])
def test_shapes_contradict_config(tmp_path, src, capsys, key, value, what):
    c = json.loads((src / "config.json").read_text())
    c[key] = value
    (src / "config.json").write_text(json.dumps(c))
    err = run_convert(tmp_path, src, capsys)
    assert "config.json" in err and what in err
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(str(src))


def test_loader_checks_dims_config_states_indirectly(src):
    """num_key_value_heads decides k/v_proj widths: the e2e / eval loader compares module by module."""
    c = json.loads((src / "config.json").read_text())
    c["num_key_value_heads"] = 8       # k_proj / v_proj would be 64 wide, the checkpoint has 32
    (src / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"k_proj is 32x64 in the checkpoint but 64x64"):
        load_checkpoint(str(src))


def test_eval_loader_on_truncated_fp_folder(tmp_path, stories260k_dir):
    d = tmp_path / "fp"
    d.mkdir()
    for p in stories260k_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        load_for_eval(str(d))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_finite_check_on_bits(dtype):
    import torch

    from effqat_plugin.converters.format_base import check_finite_scales
    from effqat_plugin.qweight import QuantFormatError

    dt = getattr(torch, dtype)
    big = torch.finfo(dt).max
    ok = torch.tensor([[0.0, -0.0, 1e-4, -3.5, big, -big]], dtype=dt)
    check_finite_scales("m", ok)
    for v in (float("nan"), float("inf"), float("-inf")):
        bad = ok.clone()
        bad[0, 2] = v
        with pytest.raises(QuantFormatError, match="1 NaN/Inf"):
            check_finite_scales("m", bad)
