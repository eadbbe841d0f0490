"""`effqat plan`: memory per phase from config.json alone."""
import json

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
