"""`effqat quantize` / `effqat eval` from the shell: a real run on stories260k and every user error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from effqat_plugin.cli import main
from effqat_plugin.data import sample_from_model, save_token_file

SMALL = ["--n-samples", "24", "--seq-len", "64", "--block-epochs", "1", "--e2e-epochs", "1", "--e2e-max-auto-epochs", "1",
         "--quiet"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, stories260k_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32)
    d = tmp_path_factory.mktemp("data")
    save_token_file(str(d / "calib.safetensors"), sample_from_model(m, 24, 64, seed=0))
    save_token_file(str(d / "eval.safetensors"), sample_from_model(m, 8, 64, seed=1))
    return d


def test_quantize_then_eval_from_the_shell(tmp_path, stories260k_dir, data_files, capsys):
    out = tmp_path / "w4"
    rc = main(["quantize", str(stories260k_dir), str(out), "--bits", "4", "--group-size", "32", "--format",
               "gptq_v2", "--calib", str(data_files / "calib.safetensors"), *SMALL])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["format"] == "gptq_v2" and line["calibration"] == [24, 64]
    # E2E-QP keeps Block-AP's step sizes unless an epoch lowers the held-out loss, and says which it kept
    assert line["val_ppl"] <= line["val_ppl_before_e2e"]
    meta_e2e = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]["e2e_qp"]
    assert (meta_e2e["best_epoch"] == 0) == ("e2e_kept" in line) == (line["val_ppl"] == line["val_ppl_before_e2e"])
    assert line["e2e_epochs"] == 1   # trained (--e2e-max-auto-epochs 1), also in meta.eqat.e2e_qp.epochs_run
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert not (tmp_path / "w4.effqat-work").exists()

    assert main(["eval", str(stories260k_dir), "--data", str(data_files / "eval.safetensors")]) == 0
    fp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert main(["eval", str(out), "--data", str(data_files / "eval.safetensors")]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert main(["eval", str(out), "--data", str(data_files / "eval.safetensors"), "--runtime", "gptqmodel"]) == 0
    q_gptqmodel = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert 10 < fp < q < 40 * fp, (fp, q)  # w4g32 on a 260K model: clearly worse than fp, far from broken
    assert abs(q - q_gptqmodel) / q < 0.05, (q, q_gptqmodel)  # same checkpoint, two runtimes


def test_sampled_calibration_default(tmp_path, stories260k_dir, capsys):
    out = tmp_path / "sampled"
    assert main(["quantize", str(stories260k_dir), str(out), "--bits", "2", "--e2e-epochs", "0",
                 "--n-samples", "8", "--seq-len", "32", "--block-epochs", "1", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["calibration"] == [8, 32]
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
    assert meta["e2e_qp"] is None and len(meta["block_ap"]["layers"]) == 5


def test_block_loss_flag_reaches_the_run_and_its_meta(tmp_path, stories260k_dir, capsys):
    out = tmp_path / "rms"
    assert main(["quantize", str(stories260k_dir), str(out), "--bits", "2", "--e2e-epochs", "0", "--block-loss",
                 "channel_rms", "--n-samples", "8", "--seq-len", "32", "--block-epochs", "1", "--quiet"]) == 0
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
    assert meta["settings"]["block_loss"] == "channel_rms"
    assert all(layer["val_loss"] is not None for layer in meta["block_ap"]["layers"])


def test_e2e_data_trains_e2e_qp_on_its_own_samples(tmp_path, stories260k_dir, data_files, capsys):
    e2e = tmp_path / "e2e.safetensors"
    save_token_file(str(e2e), torch.randint(3, 500, (12, 64), generator=torch.Generator().manual_seed(3)))
    out = tmp_path / "q"
    assert main(["quantize", str(stories260k_dir), str(out), "--calib", str(data_files / "calib.safetensors"),
                 "--e2e-data", str(e2e), "--e2e-batch-size", "4", "--e2e-self-generated", "0", *SMALL]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the option's former name still works: no self-generated samples were added to the 12
    assert line["calibration"] == [24, 64] and line["e2e_data"] == [12, 64]
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
    assert meta["calibration"]["e2e_samples"] == 12 and meta["calibration"]["train_samples"] == 21
    assert meta["e2e_qp"]["total_steps"] == 3 and meta["e2e_qp"]["train_tokens"] == 12 * 63
    assert main(["quantize", str(stories260k_dir), str(tmp_path / "m"), "--e2e-data",
                 str(tmp_path / "missing.safetensors"), *SMALL]) == 2
    assert "E2E-QP data file not found" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_e2e_trains_on_self_generated_samples_besides_calibration_text(tmp_path, stories260k_dir, data_files,
                                                                     capsys):
    """--self-generated auto (the default) with a calibration file: E2E-QP trains on the calibration's
    training split plus as many sequences sampled from the fp model (seed + 2, never the seed + 1 of
    held-out evaluation samples); recorded in the output line and meta.eqat."""
    from transformers import AutoModelForCausalLM

    from effqat_plugin import EQATConfig
    from effqat_plugin.eqat_run import sample_self_generated, self_generated_seed, with_self_generated

    out = tmp_path / "q"
    assert main(["quantize", str(stories260k_dir), str(out), "--calib", str(data_files / "calib.safetensors"),
                 "--e2e-batch-size", "4", *SMALL]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["self_generated"] == 21 and line["e2e_data"] == [42, 64]
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
    assert meta["calibration"]["self_generated"] == 21 and meta["calibration"]["e2e_samples"] == 42
    assert meta["calibration"]["block_ap_samples"] == 42  # Block-AP trained on them too (the default)
    assert all(layer["steps"] == 21 for layer in meta["block_ap"]["layers"])  # 1 epoch of 42 in batches of 2
    assert meta["e2e_qp"]["total_steps"] == 11
    assert self_generated_seed(0) not in (0, 1)
    model = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32).eval()
    base = torch.zeros(2, 16, dtype=torch.int64)
    extra = sample_self_generated(model, 3, 16, seed=0)
    assert extra.shape == (3, 16) and int(extra[:, 0].eq(1).sum()) == 3  # from BOS
    block, e2e = with_self_generated(EQATConfig(), base, base, extra)
    assert torch.equal(block, torch.cat([base, extra])) and torch.equal(e2e, block)
    block, e2e = with_self_generated(EQATConfig(block_self_generated=False), base, base, extra)
    assert torch.equal(block, base) and torch.equal(e2e, torch.cat([base, extra]))
    block, e2e = with_self_generated(EQATConfig(e2e_epochs=0), base, base, extra)
    assert torch.equal(block, torch.cat([base, extra])) and torch.equal(e2e, base)
    # no calibration file (the calibration is self-generated already) or E2E-QP off: nothing added
    assert main(["quantize", str(stories260k_dir), str(tmp_path / "s"), "--n-samples", "8", "--seq-len", "32",
                 "--block-epochs", "1", "--e2e-epochs", "1", "--quiet"]) == 0
    assert "self_generated" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with pytest.raises(SystemExit) as e:  # argparse refuses it before any model is loaded
        main(["quantize", str(stories260k_dir), str(tmp_path / "b"), "--calib",
              str(data_files / "calib.safetensors"), "--self-generated", "x", *SMALL])
    assert e.value.code == 2
    assert "--self-generated must be" in capsys.readouterr().err and not (tmp_path / "b").exists()


def _expect_error(argv, capsys, needle):
    with pytest.raises(SystemExit) as e:  # argparse rejects bad choices with exit 2
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_user_errors_exit_2_with_a_message_and_write_nothing(tmp_path, stories260k_dir, data_files, capsys):
    model = str(stories260k_dir)
    _expect_error(["quantize", model, str(tmp_path / "a"), "--bits", "5"], capsys, "invalid choice")
    _expect_error(["quantize", model, str(tmp_path / "h"), "--block-loss", "l1"], capsys, "invalid choice")

    def fails(argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err, err

    fails(["quantize", model, str(tmp_path / "b"), "--group-size", "48"], "group_size=48")
    fails(["quantize", model, str(tmp_path / "c"), "--group-size", "128", *SMALL], "larger than in_features")
    fails(["quantize", model, str(tmp_path / "d"), "--calib", str(tmp_path / "missing.safetensors")], "not found")
    empty = tmp_path / "empty.safetensors"
    save_file({"input_ids": torch.zeros(0, 16, dtype=torch.long)}, str(empty))
    fails(["quantize", model, str(tmp_path / "e"), "--calib", str(empty), *SMALL], "calibration")
    pickled = tmp_path / "calib.pt"
    pickled.write_bytes(b"not really")
    fails(["quantize", model, str(tmp_path / "f"), "--calib", str(pickled), *SMALL], "pickle")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep").write_text("x")
    fails(["quantize", model, str(exists)], "exists")
    assert [p.name for p in exists.iterdir()] == ["keep"]

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    fails(["quantize", str(bert), str(tmp_path / "g")], "no GPTQModel 7.7 model definition")
    fails(["eval", str(tmp_path / "nowhere"), "--data", str(data_files / "eval.safetensors")], "not found")
    for name in "abcdefgh":
        assert not (tmp_path / name).exists()
    shutil.rmtree(bert)
