"""`effqat pipeline` on stories260k with tiny settings: every stage's output, skip on re-run, redo on change,
a format that cannot hold the model reported without stopping the rest, and push to a local stand-in hub."""
from __future__ import annotations

import json
import shutil

import pytest

from effqat_plugin.cli import main
from test_hub_push import fake_hub  # noqa: F401  (the local stand-in hub fixture)

NAME = "stories260k-EfficientQAT-w2g64"
TINY = ["--n-samples", "16", "--seq-len", "32", "--block-epochs", "1", "--e2e-epochs", "1", "--quiet",
        "--device", "cpu"]


def stages(root):
    return {s["stage"]: s["status"] for s in json.loads((root / "pipeline.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, stories260k_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from effqat_plugin.data import sample_from_model, save_token_file

    path = tmp_path_factory.mktemp("evdata") / "heldout.safetensors"
    fp = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()
    save_token_file(str(path), sample_from_model(fp, 6, 48, seed=1))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, stories260k_dir, eval_file):
    root = tmp_path_factory.mktemp("pipe") / "out"
    argv = ["pipeline", str(stories260k_dir), str(root), "--formats", "gptq,gptq_v2,eqat",
            "--eval-data", str(eval_file), "--eval-seq-len", "48", *TINY]
    assert main(argv) == 0
    return root, argv


@pytest.fixture
def run_copy(first_run, tmp_path):
    """A private copy of the first run's output folder (and its argv), so tests that re-run the
    pipeline never change what another test sees, whatever the order."""
    root, argv = first_run
    copy = tmp_path / "out"
    shutil.copytree(root, copy)
    argv = list(argv)
    argv[argv.index(str(root))] = str(copy)
    return copy, argv


def test_every_stage_output(first_run):
    from effqat_plugin.converters import plan_folder

    root, _ = first_run
    st = stages(root)
    assert st["block_ap+e2e_qp"].startswith("done") and st["evaluation"].startswith("done")
    for fmt in ("gptq", "gptq_v2", "eqat"):
        folder = root / f"{NAME}-{fmt}"
        plan = plan_folder(folder)
        assert (plan.fmt.name, plan.bits, plan.group_size) == (fmt, 2, 64)
        plan.folder.close()
        marker = json.loads((folder / ".effqat_stage.json").read_text())
        assert marker["key"] and marker["eqat"]["block_ap"]["layers"]  # EQAT meta travels to every format
        assert marker["base_model"].endswith("stories260k")
        ev = json.loads((folder / "effqat_eval.json").read_text())
        assert [r["name"] for r in ev["table"]["rows"]] == ["fp", "w2g64 gptq", "w2g64 gptq_v2", "w2g64 eqat"]
        assert (folder / "quality.png").stat().st_size > 1000 and (folder / "block_ap_loss.png").is_file()
    table = json.loads((root / "reports" / "quality_table.json").read_text())
    vals = [r["values"]["heldout ppl@48"] for r in table["rows"]]
    assert vals[0] < vals[1]  # fp beats 2-bit
    assert vals[1] == pytest.approx(vals[2], rel=1e-5) == pytest.approx(vals[3], rel=1e-5)  # same integers
    assert (root / "reports" / "quality.png").is_file() and (root / "reports" / "block_ap_loss.png").is_file()


def test_rerun_skips_everything_and_setting_change_redoes(run_copy):
    root, argv = run_copy
    master = root / f"{NAME}-gptq_v2" / "model.safetensors"
    mtime = master.stat().st_mtime_ns
    assert main(argv) == 0
    assert all(s.startswith("skipped") for s in stages(root).values()), stages(root)
    assert master.stat().st_mtime_ns == mtime
    # a quantization setting changed: quantize, every format and the evaluation are redone
    i = argv.index("--block-epochs")
    argv2 = argv[:i + 1] + ["2"] + argv[i + 2:]
    assert main(argv2) == 0
    st = stages(root)
    assert st["block_ap+e2e_qp"].startswith("done") and st["format gptq"] == "done"
    assert st["format eqat"] == "done" and st["evaluation"].startswith("done")
    marker = json.loads((root / f"{NAME}-gptq_v2" / ".effqat_stage.json").read_text())
    assert marker["settings"]["block_epochs"] == 2
    # the key covers the whole training config, not a hand-picked subset: a setting only `effqat
    # quantize` had before (shared arguments now) redoes the stage as well
    from effqat_plugin import EQATConfig

    assert marker["settings"]["e2e_max_auto_epochs"] == EQATConfig().e2e_max_auto_epochs   # the default
    assert marker["settings"]["self_generated"] == "auto"
    argv3 = argv2 + ["--e2e-max-auto-epochs", "1"]
    assert main(argv3) == 0
    assert stages(root)["block_ap+e2e_qp"].startswith("done")
    marker = json.loads((root / f"{NAME}-gptq_v2" / ".effqat_stage.json").read_text())
    assert marker["settings"]["e2e_max_auto_epochs"] == 1


def test_incomplete_stage_is_redone(run_copy):
    root, argv = run_copy
    folder = root / f"{NAME}-eqat"
    (folder / ".effqat_stage.json").unlink()  # e.g. killed between the rename and the marker
    assert main(argv) == 0
    st = stages(root)
    assert st["format eqat"] == "done" and st["format gptq"].startswith("skipped")
    assert st["block_ap+e2e_qp"].startswith("skipped")


def test_unholdable_format_reported_others_complete(run_copy, capsys):
    root, argv = run_copy
    argv[argv.index("--formats") + 1] = "gptq,bitblas"
    assert main(argv) == 1  # BitBLAS cannot hold the 172-wide MLP at g64
    out = capsys.readouterr().out
    assert "format bitblas not written" in out and "divisible" in out
    summary = json.loads((root / "pipeline.json").read_text())
    assert "bitblas" in summary["failed"] and "gptq" in summary["outputs"]
    assert not (root / f"{NAME}-bitblas").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # no partial folder left behind


def test_pipeline_push_to_stand_in_hub(run_copy, fake_hub):
    root, argv = run_copy
    argv = argv + ["--push", "me/s260k", "--endpoint", fake_hub.url, "--base-model", "karpathy/tinyllamas"]
    assert main(argv) == 0
    repos = {c["repo_id"] for c in fake_hub.commits}
    assert repos == {"me/s260k-GPTQ", "me/s260k-GPTQv2", "me/s260k-EQAT"}
    tree = fake_hub.repos["me/s260k-GPTQ"]["branches"]["main"]
    assert {"README.md", "model.safetensors", "quantize_config.json", "effqat_eval.json", "quality.png",
            "block_ap_loss.png"} <= set(tree)
    assert not [k for k in tree if k.startswith(".")]
    card = tree["README.md"].decode()
    assert "base_model: karpathy/tinyllamas" in card and "![quality](quality.png)" in card
    assert "| w2g64 gptq |" in card and "me/s260k-EQAT" in card  # table and links to the other formats
    # a second run pushes nothing new
    n = len(fake_hub.commits)
    assert main(argv) == 0
    assert len(fake_hub.commits) == n
    assert all(stages(root)[f"push {f}"].startswith("skipped") for f in ("gptq", "gptq_v2", "eqat"))


def test_bad_arguments_exit_2(tmp_path, stories260k_dir, capsys):
    assert main(["pipeline", str(stories260k_dir), str(tmp_path / "o"), "--formats", "gptq,awq"]) == 2
    assert "awq" in capsys.readouterr().err
    assert main(["pipeline", str(stories260k_dir), str(tmp_path / "o"), "--calib", str(tmp_path / "nope.txt")]) == 2
