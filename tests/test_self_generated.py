"""Self-generated samples: drawn whole or offloaded by accelerate, from a file (`effqat sample`,
`--self-generated-from`), and never skipped silently (warning, meta.eqat, model card)."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from effqat_plugin import model_sampler
from effqat_plugin.cli import main
from effqat_plugin.data import sample_from_model, save_token_file

TINY = ["--n-samples", "16", "--seq-len", "32", "--block-epochs", "1", "--e2e-epochs", "1",
        "--e2e-max-auto-epochs", "1", "--block-lr-search", "off", "--device", "cpu", "--quiet"]
N_TRAIN = 14  # 16 calibration samples, 2 held out


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """A random-weight Llama of ~1M parameters (4 MB in fp32), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("synthetic")
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory, stories260k_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32)
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    save_token_file(str(path), sample_from_model(m, 16, 32, seed=0))
    return path


def test_offloaded_sampler_writes_the_same_tokens_as_the_whole_model(synthetic_dir):
    """max_memory below the model's size: accelerate keeps part of it on disk and brings each layer in
    at every step; on CPU in fp32 the operations are the same, so the tokens are too (same seed)."""
    cpu = torch.device("cpu")
    whole = model_sampler.plan_placement(str(synthetic_dir), 4, 16, cpu)
    assert not whole.offload and whole.dtype == torch.float32  # auto on CPU: fp32, as the run computes
    capped = model_sampler.plan_placement(str(synthetic_dir), 4, 16, cpu, max_memory=2_500_000)
    assert capped.offload and capped.budget < capped.weight_bytes
    device_map = model_sampler.offload_device_map(str(synthetic_dir), capped)
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    a, rec_a = model_sampler.draw(str(synthetic_dir), 4, 16, 2, whole)
    b, rec_b = model_sampler.draw(str(synthetic_dir), 4, 16, 2, capped)
    assert rec_a["placement"] == "whole" and rec_b["placement"] == "offload"
    assert torch.equal(a, b) and a.shape == (4, 16) and bool(a[:, 0].eq(1).all())
    with pytest.raises(ValueError, match="too little memory"):
        model_sampler.draw(str(synthetic_dir), 4, 16, 2,
                           model_sampler.plan_placement(str(synthetic_dir), 4, 16, cpu, max_memory=10_000))
    bf16 = model_sampler.plan_placement(str(synthetic_dir), 4, 16, cpu, "bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.weight_bytes * 2 == whole.weight_bytes


def test_sampling_builds_no_autograd_graph(stories260k_dir):
    """Called with gradients enabled (the Python API, the benchmarks), the sampler still runs every
    forward without them: the KV cache would otherwise keep each step's graph (GBs in seconds)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32)
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled()
    ids = sample_from_model(m, 2, 6, seed=0)
    assert ids.shape == (2, 6) and len(seen) == 5 and not any(seen)


def test_sample_file_format(tmp_path):
    from effqat_plugin.data import CalibrationError
    from effqat_plugin.sample_file import check_against, read_sample_file, sha256_of, write_sample_file

    ids = torch.randint(0, 100, (3, 8))
    path = str(tmp_path / "s.safetensors")
    digest = write_sample_file(path, ids, {"model": "m", "seed": 0})
    sample = read_sample_file(path)
    assert torch.equal(sample.input_ids, ids) and sample.sha256 == digest == sha256_of(path)
    assert sample.metadata["model"] == "m" and sample.metadata["seed"] == "0"
    assert sample.record()["sha256"] == digest and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    with pytest.raises(FileExistsError):
        write_sample_file(path, ids, {})
    assert torch.equal(check_against(sample, 100, 8, n=2), ids[:2])
    with pytest.raises(CalibrationError, match="vocabulary"):
        check_against(sample, 50, 8)
    with pytest.raises(CalibrationError, match="--seq-len"):
        check_against(sample, 100, 16)


def test_effqat_sample_then_quantize_from_it_equals_sampling_in_the_run(tmp_path, stories260k_dir, calib, capsys):
    """One sampling, many quantizations: `effqat sample` writes what `quantize --self-generated N` draws
    (same sampler, seed + 2), so training on the file gives the very same checkpoint."""
    model = str(stories260k_dir)
    samples = tmp_path / "sg.safetensors"
    assert main(["sample", model, str(samples), "--n", str(N_TRAIN), "--seq-len", "32", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == [N_TRAIN, 32] and out["dtype"] == "float32" and out["seed"] == 2
    assert main(["sample", model, str(samples), "--n", "2", "--seq-len", "32"]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err

    assert main(["quantize", model, str(tmp_path / "a"), "--calib", str(calib), "--self-generated", str(N_TRAIN),
                 *TINY]) == 0
    line_a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["quantize", model, str(tmp_path / "b"), "--calib", str(calib), "--self-generated-from", str(samples),
                 *TINY]) == 0
    line_b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line_a["self_generated"] == line_b["self_generated"] == N_TRAIN and "warning" not in line_b
    ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    meta_a = json.loads((tmp_path / "a" / "quantize_config.json").read_text())["meta"]["eqat"]["calibration"]
    meta_b = json.loads((tmp_path / "b" / "quantize_config.json").read_text())["meta"]["eqat"]["calibration"]
    assert meta_a["block_ap_samples"] == meta_b["block_ap_samples"] == 2 * N_TRAIN  # they were trained on
    assert meta_a["self_generated_source"]["source"] == "sampled"
    assert meta_a["self_generated_source"]["dtype"] == "float32" and meta_a["self_generated_source"]["seed"] == 2
    src = meta_b["self_generated_source"]
    assert src["source"] == "file" and src["sha256"] == out["sha256"] and src["used"] == N_TRAIN
    assert src["dtype"] == "float32" and "self_generated_skipped" not in meta_b
    # the in-memory run honours the file too, and trains the same checkpoint
    assert main(["quantize", model, str(tmp_path / "c"), "--calib", str(calib), "--self-generated-from", str(samples),
                 "--in-memory", *TINY]) == 0
    capsys.readouterr()
    tc = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert tc.keys() == ta.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)
    meta_c = json.loads((tmp_path / "c" / "quantize_config.json").read_text())["meta"]["eqat"]["calibration"]
    assert meta_c["self_generated_source"]["sha256"] == out["sha256"] and meta_c["self_generated"] == N_TRAIN


def test_skipped_samples_warn_in_the_line_meta_and_card(tmp_path, stories260k_dir, calib, capsys):
    from effqat_plugin import hub

    out = tmp_path / "q"
    assert main(["quantize", str(stories260k_dir), str(out), "--calib", str(calib), "--self-generated", "0",
                 *TINY]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["warning"].startswith("trained without self-generated samples: --self-generated 0 was given")
    assert "42.6" in line["warning"] and "70.2" in line["warning"] and "99.8" in line["warning"]
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]["calibration"]
    assert meta["self_generated_skipped"] == "--self-generated 0 was given" and meta["self_generated"] == 0
    card = hub.plan_push(str(out), "me/x", base_model=str(stories260k_dir)).card
    assert "trained without self-generated samples: --self-generated 0 was given" in card
    assert "| self-generated samples | none: --self-generated 0 was given |" in card and "49.1" in card


def test_sampled_calibration_records_its_sampler(tmp_path, stories260k_dir, capsys):
    """No --calib: the calibration is drawn by the same sampler (seed, not seed + 2), its dtype and
    placement recorded; nothing is missing, so no warning."""
    out = tmp_path / "s"
    assert main(["quantize", str(stories260k_dir), str(out), "--bits", "2", "--e2e-epochs", "0", "--n-samples", "8",
                 "--seq-len", "16", "--block-epochs", "1", "--device", "cpu", "--quiet"]) == 0
    assert "warning" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cal = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]["calibration"]
    assert cal["calibration_source"]["dtype"] == "float32" and cal["calibration_source"]["seed"] == 0
    assert cal["calibration_source"]["placement"] == "whole" and "self_generated_skipped" not in cal


def test_auto_says_why_when_the_model_fits_nowhere(monkeypatch, tmp_path, stories260k_dir):
    """auto: when the model fits neither in the memory allowed nor on disk for the offload, nothing is
    drawn, and the reason is kept for the warning (no silent fallback)."""
    from effqat_plugin import EQATConfig, self_generated

    monkeypatch.setattr(model_sampler, "free_device_bytes", lambda device: 1000)
    monkeypatch.setattr(self_generated, "_offload_room", lambda root: 0)
    args = SimpleNamespace(self_generated="auto", self_generated_from=None, self_generated_dtype="auto",
                           calib="c.txt", seed=0, out_dir=str(tmp_path / "o"))
    got = self_generated.resolve(args, EQATConfig(compute_device="cpu"), str(stories260k_dir), 14, 32)
    assert got.ids is None and "fits neither in the memory allowed for sampling nor on the disk" in got.skipped
    assert got.warning().startswith("trained without self-generated samples: --self-generated auto")
    # room on disk but too little memory even for accelerate's offload: auto skips, saying why; a count fails
    monkeypatch.setattr(self_generated, "_offload_room", lambda root: 1 << 40)
    got = self_generated.resolve(args, EQATConfig(compute_device="cpu"), str(stories260k_dir), 14, 32)
    assert got.ids is None and got.skipped.startswith("--self-generated auto: too little memory to sample")
    args.self_generated = 3
    with pytest.raises(model_sampler.SamplingMemoryError):
        self_generated.resolve(args, EQATConfig(compute_device="cpu"), str(stories260k_dir), 14, 32)
    args.self_generated = "auto"
    # without calibration text the calibration is self-generated already: nothing is missing
    args.calib = None
    assert self_generated.resolve(args, EQATConfig(compute_device="cpu"), str(stories260k_dir), 14, 32).skipped is None


def test_bad_self_generated_files_exit_2_and_write_nothing(tmp_path, stories260k_dir, calib, capsys):
    model = str(stories260k_dir)
    big = tmp_path / "vocab.safetensors"
    save_file({"input_ids": torch.full((4, 32), 600, dtype=torch.int64)}, str(big))  # stories260k: 512
    short = tmp_path / "short.safetensors"
    save_file({"input_ids": torch.ones(4, 16, dtype=torch.int64)}, str(short))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    floats = tmp_path / "floats.safetensors"
    save_file({"input_ids": torch.ones(4, 32)}, str(floats))
    pickled = tmp_path / "sg.pt"
    pickled.write_bytes(b"not really")
    cases = [(big, "vocabulary has 512 entries"), (short, "sequences of 16 tokens, but --seq-len is 32"),
             (corrupt, "not a readable safetensors file"), (floats, "integer token ids"),
             (pickled, "expected a .safetensors file"), (tmp_path / "missing.safetensors", "file not found")]
    fine = tmp_path / "fine.safetensors"
    save_file({"input_ids": torch.ones(4, 32, dtype=torch.int64)}, str(fine))
    cases.append((fine, "holds 4 samples, 9 asked for"))  # with --self-generated 9 below
    for i, (path, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        count = ["--self-generated", "9"] if path == fine else []
        assert main(["quantize", model, str(out), "--calib", str(calib), "--self-generated-from", str(path),
                     *count, *TINY]) == 2, path
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / f"o{i}.effqat-work").exists()


def test_plan_reports_the_sampling_phase(capsys):
    def plan(*argv):
        assert main(["plan", "llama-3-8b", "--n-samples", "128", "--seq-len", "256", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    whole = plan()["sample"]  # auto with --calib: the 112 training samples (16 held out)
    assert whole["placement"] == "whole" and whole["tokens"] == 112 * 256
    assert whole["device"] > 8.03e9 * 2 and whole["seconds"] > 0  # bf16 weights plus the KV cache
    capped = plan("--sample-memory", "8")["sample"]
    assert capped["placement"] == "offload" and capped["device"] <= 8 * 2**30
    assert capped["host"] > 7e9 and capped["seconds"] > whole["seconds"]  # the rest in host memory, read per step
    cpu = plan("--device", "cpu", "--sample-memory", "8")["sample"]
    assert cpu["disk"] > 20e9 and cpu["device"] == 0  # fp32 on CPU: ~24 GB of the 32 on disk
    assert "sample" not in plan("--self-generated", "0")
    assert main(["plan", "llama-3-8b", "--n-samples", "128", "--seq-len", "256"]) == 0
    assert "sampling 112 x 256 self-generated tokens (whole on the device): ~" in capsys.readouterr().out


def test_effqat_sample_offloads_under_max_memory(tmp_path, synthetic_dir, capsys):
    """`effqat sample --max-memory` below the model's 4 MB: accelerate offloads, the file holds the
    tokens the whole model writes, and no offload folder is left behind."""
    from effqat_plugin.sample_file import read_sample_file

    outs = {}
    for name, extra in (("whole", []), ("offload", ["--max-memory", str(2.5e6 / 2**30)])):
        path = tmp_path / f"{name}.safetensors"
        assert main(["sample", str(synthetic_dir), str(path), "--n", "3", "--seq-len", "12", "--device", "cpu",
                     *extra]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["placement"] == name
        outs[name] = read_sample_file(str(path))
    assert torch.equal(outs["whole"].input_ids, outs["offload"].input_ids)
    assert outs["offload"].metadata["placement"] == "offload" and outs["offload"].metadata["vocab_size"] == "1000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload.safetensors", "whole.safetensors"]
    assert main(["sample", str(synthetic_dir), str(tmp_path / "x.safetensors"), "--n", "3", "--device", "cpu",
                 "--max-memory", str(1e4 / 2**30)]) == 2
    assert "too little memory" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
