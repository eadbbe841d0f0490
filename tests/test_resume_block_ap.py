"""Block-AP resume: a run killed mid-way and restarted with the same command gives the same checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from effqat_plugin.data import sample_from_model, save_token_file


def _cmd(model_dir, calib, out):
    return [sys.executable, "-m", "effqat_plugin.cli", "quantize", str(model_dir), str(out), "--bits", "2",
            "--group-size", "64", "--calib", str(calib), "--n-samples", "32", "--seq-len", "64",
            "--block-epochs", "2", "--block-batch-size", "2", "--e2e-epochs", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, stories260k_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32)
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    save_token_file(str(path), sample_from_model(m, 32, 64, seed=0))
    return path


def _env():
    env = dict(os.environ)
    env["GPTQMODEL_CPU_WORKERS"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_killed_run_resumes_to_the_same_result(tmp_path, stories260k_dir, calib_file):
    reference = tmp_path / "reference"
    subprocess.run(_cmd(stories260k_dir, calib_file, reference), check=True, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert not (tmp_path / "reference.effqat-work").exists()  # removed after a successful save

    out = tmp_path / "resumed"
    work = tmp_path / "resumed.effqat-work"
    proc = subprocess.Popen(_cmd(stories260k_dir, calib_file, out), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = work / "progress.json"
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                layers = json.loads(progress.read_text())["layers"]
            except (json.JSONDecodeError, KeyError):
                layers = []
            if len(layers) >= 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_after = len(layers)
                break
        time.sleep(0.02)
    assert killed_after is not None and killed_after < 5, "the run was not killed mid-way"
    assert not out.exists()  # nothing half-written at the destination

    resumed = subprocess.run(_cmd(stories260k_dir, calib_file, out), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    # byte for byte (the checkpoint is streamed from the work folder, the restored layers included)
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_work_folder_of_another_run_is_refused(tmp_path, stories260k_dir, calib_file, capsys):
    from effqat_plugin.cli import main

    work = tmp_path / "other.effqat-work"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"fingerprint": "something else", "layers": [0]}))
    assert main(_cmd(stories260k_dir, calib_file, tmp_path / "other")[3:]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (work / "progress.json").exists() and not (tmp_path / "other").exists()
