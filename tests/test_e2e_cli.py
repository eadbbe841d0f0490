"""`effqat e2e QUANT OUT --data ...` end to end on a small quantized folder (stories260k, RTN w2g64):
same format back, integers untouched, scales trained, meta recorded, reloadable; refusals; resume after
a stop gives the uninterrupted result; instruction data through the CLI."""
import json

import pytest
import torch

from effqat_plugin.cli import main
from effqat_plugin.converters import convert, load_quantized, save_quantized
from effqat_plugin.data import save_token_file



@pytest.fixture(scope="module")
def quant_dir(stories260k_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from effqat_plugin.quantizer import rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32)
    qweights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            qweights[name] = rtn_quantize(mod.weight.data, 2, 64)
    prefixes = tuple(n + "." for n in qweights)
    tensors = {k: v.to(torch.float16) for k, v in model.state_dict().items()
               if not k.startswith(prefixes) and k != "lm_head.weight"}
    out = tmp_path_factory.mktemp("q") / "stories-w2g64-gptq"
    save_quantized(out, fmt="gptq", qweights=qweights, tensors=tensors, config_dir_or_files=str(stories260k_dir))
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "train.safetensors"
    save_token_file(str(path), torch.randint(3, 512, (20, 32), generator=torch.Generator().manual_seed(0)))
    return path


def e2e(quant, out, data, *extra):
    return main(["e2e", str(quant), str(out), "--data", str(data), "--seq-len", "32", "--batch-size", "4",
                 "--micro-batch-size", "2", "--val-samples", "4", "--max-auto-epochs", "1", "--quiet", *extra])


def scales(folder):
    _fmt, qw, _t, _c = load_quantized(str(folder))
    return {k: v.scales for k, v in qw.items()}


def test_cli_trains_scales_and_writes_same_format(quant_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert e2e(quant_dir, out, data_file, "--eval-every", "2") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["completed"] and line["format"] == "gptq" and line["steps"] == 4 and line["val_rows"] == 4
    fmt_s, src, src_t, _ = load_quantized(str(quant_dir))
    fmt_o, got, got_t, qcfg = load_quantized(str(out))
    assert fmt_o == fmt_s == "gptq" and got.keys() == src.keys()
    changed = 0
    for name in src:
        assert torch.equal(got[name].int_weight, src[name].int_weight)
        assert torch.equal(got[name].zeros, src[name].zeros)
        assert got[name].scales.dtype == torch.float16
        changed += int(not torch.equal(got[name].scales, src[name].scales))
    assert changed == len(src)
    assert got_t.keys() == src_t.keys() and all(torch.equal(got_t[k], src_t[k]) for k in src_t)
    meta = qcfg["meta"]["eqat_e2e"]
    assert meta["settings"]["global_batch_size"] == 4 and meta["settings"]["grad_accum_steps"] == 2
    rep = meta["report"]
    assert rep["val_loss_before"] is not None and rep["val_loss_after"] is not None
    assert [h["step"] for h in rep["eval_history"]] == [2, 4]
    assert not (tmp_path / "out.partial").exists()
    from effqat_plugin.loading import load_quantized_model

    model = load_quantized_model(str(out))
    logits = model(input_ids=torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()
    # an existing OUT_DIR is refused (exit 2, user error) and left alone
    before = sorted(p.name for p in out.iterdir())
    assert e2e(quant_dir, out, data_file) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_stop_then_resume_equals_uninterrupted(quant_dir, data_file, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert e2e(quant_dir, full, data_file, "--epochs", "2") == 0
    assert e2e(quant_dir, part, data_file, "--epochs", "2", "--save-every", "1", "--stop-after", "3") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not line["completed"] and line["steps"] == 3 and not part.exists()
    assert (tmp_path / "part.partial" / "e2e_state" / "state.json").is_file()
    assert e2e(quant_dir, part, data_file, "--epochs", "2") == 2  # a saved state is not silently discarded
    assert "--resume" in capsys.readouterr().err
    assert e2e(quant_dir, part, data_file, "--epochs", "2", "--resume") == 0
    a, b = scales(full), scales(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((part / "quantize_config.json").read_text())["meta"]["eqat_e2e"]["report"]
    assert meta["resumed_from_step"] == 3 and meta["steps"] == 8
    assert not (tmp_path / "part.partial").exists()


def test_cli_instruction_data_on_an_original_eqat_folder(quant_dir, tmp_path, capsys):
    eqat = tmp_path / "eqat-src"
    convert(str(quant_dir), str(eqat), to="eqat")
    recs = [{"instruction": " ".join(f"t{(7 * i + j) % 500 + 3}" for j in range(6)), "input": "",
             "output": " ".join(f"t{(11 * i + j) % 500 + 3}" for j in range(4))} for i in range(10)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "out-eqat"
    assert main(["e2e", str(eqat), str(out), "--data", str(data), "--format", "instruction", "--batch-size", "2",
                 "--micro-batch-size", "1", "--val-samples", "2", "--max-auto-epochs", "1", "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["format"] == "eqat" and line["train_rows"] == 8 and line["steps"] == 4
    fmt, got, _, _ = load_quantized(str(out))
    src = scales(eqat)
    assert fmt == "eqat" and any(not torch.equal(got[k].scales, src[k]) for k in src)


def test_cli_user_errors(quant_dir, data_file, tmp_path, capsys):
    assert main(["e2e", str(tmp_path / "missing"), str(tmp_path / "o"), "--data", str(data_file)]) == 2
    assert main(["e2e", str(quant_dir), str(tmp_path / "o"), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert main(["e2e", str(quant_dir), str(tmp_path / "o"), "--data", str(data_file), "--seq-len", "32",
                 "--batch-size", "4", "--micro-batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "multiple" in err
    assert not (tmp_path / "o").exists()


def test_cli_follows_the_block_ap_lr_search_of_the_checkpoint(quant_dir, data_file, tmp_path, capsys):
    """A checkpoint whose Block-AP lr search ended on a quarter of the auto raise gets a quarter of
    E2E-QP's raise too, as the in-process E2E-QP of `effqat quantize` does."""
    import shutil

    from effqat_plugin import lr_rules

    src = tmp_path / "searched"
    shutil.copytree(quant_dir, src)
    qcfg = json.loads((src / "quantize_config.json").read_text())
    qcfg.setdefault("meta", {})["eqat"] = {"block_ap": {"lr_fraction": 0.25}}
    (src / "quantize_config.json").write_text(json.dumps(qcfg))
    lrs = {}
    for name, folder in (("plain", quant_dir), ("searched", src)):
        assert e2e(folder, tmp_path / f"out-{name}", data_file) == 0
        capsys.readouterr()
        _f, _q, _t, out_cfg = load_quantized(str(tmp_path / f"out-{name}"))
        lrs[name] = out_cfg["meta"]["eqat_e2e"]["report"]["lr"]
    tokens = 16 * 32  # 16 training rows of 32 tokens: the raise is capped at 128 either way
    assert lrs["plain"] == pytest.approx(lr_rules.e2e_lr(2, "auto", 128.0, tokens))
    assert lrs["searched"] == pytest.approx(lr_rules.e2e_lr(2, "auto", 128.0, tokens, fraction=0.25))
    assert lrs["searched"] < lrs["plain"] / 3
