"""`effqat plan`: memory per phase from config.json alone."""
import json

import pytest
import torch

from effqat_plugin.cli import main
from effqat_plugin.memory_plan import PRESETS, Shape, plan


def _plan(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_parameter_count_matches_the_real_model(stories260k_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k_dir)
    shape = Shape.from_config(json.loads((stories260k_dir / "config.json").read_text()))
    assert plan(shape, 2, 64, 8, 32)["params"] == sum(p.numel() for p in model.parameters())
    assert shape.layers * shape.linear_params_per_layer == sum(
        m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "in_features"))


def test_block_ap_host_memory_is_flat_in_depth_and_streams_go_to_disk(capsys):
    shallow = dict(PRESETS["llama-2-7b"])
    deep = dict(shallow, num_hidden_layers=shallow["num_hidden_layers"] * 2)
    a, b = (plan(Shape.from_config(c), 2, 64, 4096, 2048) for c in (shallow, deep))
    assert a["block_ap"]["host"] == b["block_ap"]["host"] and a["block_ap"]["device"] == b["block_ap"]["device"]
    assert b["e2e_qp"]["device"] > a["e2e_qp"]["device"]  # the packed model does grow with depth
    ram = _plan(capsys, "llama-2-7b")
    disk = _plan(capsys, "llama-2-7b", "--offload-streams")
    streams = 2 * 4096 * 2048 * 4096 * 2  # two bf16 streams on CUDA
    assert ram["block_ap"]["streams"] == streams
    assert ram["block_ap"]["host"] - disk["block_ap"]["host"] == streams
    assert disk["block_ap"]["disk"] - ram["block_ap"]["disk"] == streams
    assert _plan(capsys, "llama-2-70b", "--bits", "4")["save"]["disk"] > _plan(capsys, "llama-2-70b")["save"]["disk"]


def test_plan_reads_a_folder_and_rejects_bad_input(tmp_path, stories260k_dir, capsys):
    assert _plan(capsys, str(stories260k_dir))["params"] > 0
    assert main(["plan", str(tmp_path / "nothing-here")]) == 2
    assert "error" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_distillation_teacher_is_counted_in_block_ap_and_e2e_qp_host_memory(capsys):
    from effqat_plugin.commands.plan import DISTILL_TOPK
    from effqat_plugin.config import EQATConfig
    from effqat_plugin.teacher import TeacherLogits

    assert DISTILL_TOPK == EQATConfig().e2e_distill_topk
    plain = _plan(capsys, "llama-3-8b", "--n-samples", "4096", "--seq-len", "2048")
    kept = _plan(capsys, "llama-3-8b", "--n-samples", "4096", "--seq-len", "2048", "--e2e-distill")
    small = _plan(capsys, "llama-3-8b", "--n-samples", "4096", "--seq-len", "2048", "--e2e-distill", "8")
    # the bytes of the tensors the teacher really holds, per token and top-k entry
    one = TeacherLogits(torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, dtype=torch.float16), {})
    per_entry = one.token_ids.nbytes + one.logprobs.nbytes
    for got, k in ((kept, DISTILL_TOPK), (small, 8)):
        want = 4096 * 2048 * k * per_entry
        assert got["block_ap"]["teacher"] == want
        for phase in ("block_ap", "e2e_qp"):
            assert got[phase]["host"] - plain[phase]["host"] == want
            assert got[phase]["device"] == plain[phase]["device"]
    assert main(["plan", "llama-3-8b", "--e2e-distill"]) == 0
    assert "distillation teacher: 3.0 GiB" in capsys.readouterr().out


def test_gguf_run_plans_the_file_and_e2e_qp_on_its_grids(capsys):
    """--gguf-type: the save is the GGUF file's tensors; E2E-QP holds the grids' packed codes and
    trains per-block steps instead of the packed uniform model (the types and bytes are checked against llama.cpp in
    tests/test_gguf_presets.py)."""
    uniform = _plan(capsys, "llama-3-8b", "--bits", "4", "--group-size", "128")
    q4km = _plan(capsys, "llama-3-8b", "--gguf-type", "Q4_K_M")
    assert _plan(capsys, "llama-3-8b", "--gguf-type", "Q4_K_M", "--bits", "2")["gguf"] == q4km["gguf"]
    g = q4km["gguf"]
    assert q4km["save"]["disk"] == g["file_bytes"] and g["types"] == {"Q4_K": 192, "Q6_K": 32}
    assert 4.5 < g["bpw"] < 5 and g["fallbacks"] == 0
    layers = 32 * Shape.from_config(PRESETS["llama-3-8b"]).linear_params_per_layer
    # d and dmin per 256 weights on Q4_K, d alone on the symmetric Q6_K
    assert layers // 256 < g["e2e_steps"] < layers // 256 * 2
    # E2E-QP holds 4-bit codes (6-bit Q6_K's at 8) and int8 sub-block fields; the work folder int8 codes
    assert layers // 2 < g["e2e_bytes"] < 0.7 * layers < layers < g["frozen_bytes"]
    # Block-AP trains the same weights; its work folder holds the frozen grids
    assert {k: v for k, v in q4km["block_ap"].items() if k != "disk"} == {
        k: v for k, v in uniform["block_ap"].items() if k != "disk"}
    assert q4km["block_ap"]["disk"] == g["frozen_bytes"] > layers
    q2k = _plan(capsys, "llama-3-8b", "--gguf-type", "Q2_K")["gguf"]
    assert q2k["file_bytes"] < g["file_bytes"] and q2k["bpw"] < g["bpw"]
    with pytest.raises(SystemExit) as e:   # argparse: one usage line, exit 2
        main(["plan", "llama-3-8b", "--gguf-type", "Q4_0"])
    assert e.value.code == 2 and "invalid choice: 'Q4_0'" in capsys.readouterr().err
    assert main(["plan", "llama-3-8b", "--gguf-type", "Q4_K_M"]) == 0
    out = capsys.readouterr().out
    assert "GGUF Q4_K_M" in out and "192 x Q4_K" in out and "bits per weight" in out
