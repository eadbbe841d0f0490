"""`effqat eval`: perplexity of fp vs quantized folders, table + JSON next to the checkpoint + plots,
text and `datasets` inputs, and lm-eval tasks (a stand-in lm_eval module; the real one is optional)."""
from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

from effqat_plugin.cli import main
from test_hub_push import qfolder  # noqa: F401  (a tiny EQAT checkpoint made by `effqat quantize`)


@pytest.fixture(scope="module")
def data(tmp_path_factory, stories260k_dir):
    """The same held-out rows as token ids (.safetensors) and as stand-in-tokenizer text (.txt / dataset)."""
    import torch
    from transformers import AutoModelForCausalLM

    from effqat_plugin.data import sample_from_model, save_token_file

    d = tmp_path_factory.mktemp("evdata")
    fp = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()
    ids = sample_from_model(fp, 6, 48, seed=1)
    save_token_file(str(d / "heldout.safetensors"), ids)
    words = " ".join(f"t{i}" for i in ids[:, 1:].reshape(-1).tolist() if i > 2)
    (d / "raw.txt").write_text(words)
    ds = d / "localds"
    ds.mkdir()
    with open(ds / "test.jsonl", "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in row[1:] if i > 2)}) + "\n")
    return d


def test_fp_vs_quantized_table_json_plots(tmp_path, qfolder, stories260k_dir, data, capsys):  # noqa: F811
    q = tmp_path / "q"
    shutil.copytree(qfolder, q)
    fp = tmp_path / "fp"
    shutil.copytree(stories260k_dir, fp)
    fp_before = {p.name: p.stat().st_mtime_ns for p in fp.iterdir()}
    rc = main(["eval", str(fp), str(q), "--data", str(data / "heldout.safetensors"), "--seq-len", "48",
               "--name", "fp32", "--name", "w2g64"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [x["name"] for x in lines] == ["fp32", "w2g64"]
    assert "heldout ppl@48" in out.splitlines()[0]  # the table header
    ppl_fp, ppl_q = lines[0]["perplexity"], lines[1]["perplexity"]
    assert 5 < ppl_fp < 40 and ppl_q > 2 * ppl_fp  # fp on its own samples vs a barely trained 2-bit model
    # JSON next to the checkpoint, with the model's own result and the comparison table
    ev = json.loads((q / "effqat_eval.json").read_text())
    assert ev["results"]["heldout ppl@48"]["value"] == pytest.approx(ppl_q, rel=1e-4)
    assert ev["results"]["heldout ppl@48"]["samples"] == 6
    assert [r["name"] for r in ev["table"]["rows"]] == ["fp32", "w2g64"]
    assert ev["fingerprint"] == {"model.safetensors": (q / "model.safetensors").stat().st_size}
    # PNGs: the quality table and the per-layer Block-AP loss (from quantize_config meta.eqat)
    for png in ("quality.png", "block_ap_loss.png"):
        assert (q / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the input fp folder is never written to
    assert {p.name: p.stat().st_mtime_ns for p in fp.iterdir()} == fp_before
    # the card now embeds the table and both plots
    from effqat_plugin.hub import plan_push

    card = plan_push(q, "me/x").card
    assert "| w2g64 |" in card and "![quality](quality.png)" in card and "![Block-AP loss](block_ap_loss.png)" in card


def test_out_folder_gets_every_models_results_and_inputs_stay_untouched(tmp_path, qfolder, stories260k_dir,  # noqa: F811
                                                                          data, capsys):
    q, fp = tmp_path / "q", tmp_path / "fp"
    shutil.copytree(qfolder, q)
    shutil.copytree(stories260k_dir, fp)
    before = {d: sorted(p.name for p in d.iterdir()) for d in (q, fp)}
    rc = main(["eval", str(fp), str(q), "--data", str(data / "heldout.safetensors"), "--seq-len", "48",
               "--out", str(tmp_path / "res")])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    for line, name in zip(lines, ("fp", "q")):
        saved = json.loads((tmp_path / "res" / name / "effqat_eval.json").read_text())
        assert saved["results"]["heldout ppl@48"]["value"] == pytest.approx(line["perplexity"], rel=1e-4)
        assert (tmp_path / "res" / name / "quality.png").exists()
    assert {d: sorted(p.name for p in d.iterdir()) for d in (q, fp)} == before
    # an --out inside the fp folder is refused before anything is evaluated
    assert main(["eval", str(fp), "--data", str(data / "heldout.safetensors"), "--out", str(fp / "r")]) == 2
    assert "fp model folder" in capsys.readouterr().err and not (fp / "r").exists()


def test_text_file_and_dataset_name(tmp_path, qfolder, data, capsys):  # noqa: F811
    q = tmp_path / "q"
    shutil.copytree(qfolder, q)
    rc = main(["eval", str(q), "--data", str(data / "raw.txt"), "--dataset", f"{data / 'localds'}::test",
               "--seq-len", "32", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    res = line["results"]
    assert set(res) == {"raw ppl@32", "localds ppl@32"}
    assert all(v > 1 for v in res.values())
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["results"]) == set(res) and not (q / "effqat_eval.json").exists()


def test_results_merge_and_stale_json_is_dropped(tmp_path, qfolder, data):  # noqa: F811
    from effqat_plugin.reports import record_results, results_for_card

    q = tmp_path / "q"
    shutil.copytree(qfolder, q)
    record_results(q / "effqat_eval.json", q, {"a ppl@8": {"value": 3.0, "metric": "ppl"}})
    record_results(q / "effqat_eval.json", q, {"b ppl@8": {"value": 4.0, "metric": "ppl"}})
    assert set(results_for_card(q)["results"]) == {"a ppl@8", "b ppl@8"}
    # weights replaced (e.g. the JSON was copied next to other weights): the card ignores the numbers
    with open(q / "model.safetensors", "ab") as f:
        f.write(b" ")
    assert results_for_card(q) == {}


def test_tasks_without_lm_eval_say_how_to_install(qfolder, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(qfolder), "--tasks", "paper"]) == 2
    assert "pip install effqat[eval]" in capsys.readouterr().err


def test_tasks_paper_preset_reports_acc_not_acc_norm(tmp_path, qfolder, monkeypatch, capsys):  # noqa: F811
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size, device):
            calls["model"] = type(pretrained).__name__
            calls["device"] = device

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls["tasks"], calls["fewshot"] = tasks, num_fewshot
        return {"results": {t: {"acc,none": 0.25 + i / 100, "acc_norm,none": 0.99, "acc_stderr,none": 0.01}
                            for i, t in enumerate(tasks)}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    q = tmp_path / "q"
    shutil.copytree(qfolder, q)
    assert main(["eval", str(q), "--tasks", "paper"]) == 0
    assert calls["tasks"] == ["winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge"]
    assert calls["fewshot"] == 0 and calls["model"] == "LlamaForCausalLM"
    res = json.loads((q / "effqat_eval.json").read_text())["results"]
    assert res["winogrande acc"]["value"] == 0.25 and res["arc_challenge acc"]["value"] == pytest.approx(0.29)
    assert all(r["metric"] == "acc" for r in res.values())
    assert "piqa acc" in capsys.readouterr().out


def test_errors_exit_2(tmp_path, qfolder, capsys):  # noqa: F811
    assert main(["eval", str(qfolder)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(qfolder), "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", str(qfolder), "--dataset", "wikitext2", "--seq-len", "32"]) == 2  # offline, not cached
    assert "could not be loaded" in capsys.readouterr().err


def test_bundled_asset_is_never_written(stories260k_dir, data):
    before = sorted(p.name for p in stories260k_dir.iterdir())
    assert main(["eval", str(stories260k_dir), "--data", str(data / "heldout.safetensors"), "--seq-len", "48"]) == 0
    assert sorted(p.name for p in stories260k_dir.iterdir()) == before


def test_both_runtimes_one_table_without_gptqmodel_log_lines(tmp_path, qfolder, stories260k_dir, data,  # noqa: F811
                                                             capsys):
    rc = main(["eval", str(stories260k_dir), str(qfolder), "--data", str(data / "heldout.safetensors"),
               "--seq-len", "48", "--name", "fp32", "--name", "w2g64", "--runtime", "effqat,gptqmodel",
               "--table-only", "--no-save"])
    assert rc == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert not any(ln.startswith("{") for ln in lines)  # --table-only: no JSON lines
    assert lines[0].startswith("model") and set(lines[1]) <= {"-", " "}  # header, rule, then one row each
    rows = {ln.rsplit(None, 1)[0].strip(): float(ln.rsplit(None, 1)[1]) for ln in lines[2:]}
    assert set(rows) == {"fp32", "w2g64 (effqat)", "w2g64 (gptqmodel)"}
    assert abs(rows["w2g64 (effqat)"] - rows["w2g64 (gptqmodel)"]) / rows["w2g64 (effqat)"] < 0.05
    assert "GPT-QModel" not in cap.out + cap.err and "INFO " not in cap.out  # GPTQModel's banner / log lines
