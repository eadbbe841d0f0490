"""Streamed quantization: decoder layers come from the shards one at a time, the checkpoint is written
layer by layer, and the result is byte-for-byte the in-memory path's."""
import json
import shutil

import pytest
import torch

from effqat_plugin import EQATConfig
from effqat_plugin.cli import main
from effqat_plugin.streamed_run import StreamedQuantization


@pytest.fixture(scope="module")
def sharded_bf16_llama(tmp_path_factory):
    """A random 4-layer Llama saved as bf16 safetensors in several shards (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("sharded") / "llama"
    model.save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    return path


def _ids(vocab, n=8, t=16, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    return EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=2, e2e_epochs=0,
                      compute_device="cpu", **kw)


def test_at_most_one_decoder_layer_holds_weights_during_block_ap(tmp_path, sharded_bf16_llama, monkeypatch):
    from effqat_plugin.block_ap import BlockAP

    run = StreamedQuantization(str(sharded_bf16_llama), _cfg(), str(tmp_path / "work"), show_progress=False)
    layers = run.layout.layers
    assert all(p.is_meta for p in layers.parameters())  # nothing read before Block-AP
    seen = []
    original = BlockAP._propagate

    def spy(self, index, layer, stream):
        real = [i for i in range(len(layers)) if any(not p.is_meta for p in layers[i].parameters())]
        dtypes = {p.dtype for i in real for p in layers[i].parameters()}
        seen.append((tuple(real), dtypes))
        return original(self, index, layer, stream)

    monkeypatch.setattr(BlockAP, "_propagate", spy)
    run.block_ap(_ids(96))
    assert seen and max(len(r) for r, _ in seen) == 1
    assert sorted({r[0] for r, _ in seen}) == [0, 1, 2, 3]  # each layer had its turn
    assert all(d == {torch.bfloat16} for _, d in seen)  # 16-bit in host memory; only the copy in training is fp32
    assert run.sm.max_resident == 1
    assert all(p.is_meta for p in layers.parameters())  # all released afterwards
    assert run.model.get_input_embeddings().weight.dtype == torch.bfloat16
    report = run.save(str(tmp_path / "out"))
    assert report["modules"] == 4 * 7

    from effqat_plugin.loading import load_checkpoint

    loaded = load_checkpoint(str(tmp_path / "out"))
    assert len(loaded.qweights) == 28
    assert loaded.model(input_ids=_ids(96, 1, 8)).logits.isfinite().all()


def _in_memory(model_dir, cfg, ids, out):
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(model_dir), cfg, dtype=torch.float32)
    model.quantize(ids, show_progress=False)
    model.save(str(out))


def _streamed(model_dir, cfg, ids, out, work):
    from effqat_plugin.evaluation import load_tokenizer_for

    run = StreamedQuantization(str(model_dir), cfg, str(work), tokenizer=load_tokenizer_for(str(model_dir)),
                               show_progress=False)
    run.block_ap(ids)
    if cfg.e2e_epochs:
        run.e2e_and_save(str(out))
    else:
        run.save(str(out))


def _same_checkpoint(a, b):
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    qa, qb = (json.loads((d / "quantize_config.json").read_text()) for d in (a, b))
    for q in (qa, qb):  # wall-clock fields differ between any two runs
        eqat = q["meta"]["eqat"]
        eqat.pop("seconds")
        for layer in eqat["block_ap"]["layers"]:
            layer.pop("seconds"), layer.pop("peak_memory_mb")
        if eqat["e2e_qp"]:
            for k in [k for k in eqat["e2e_qp"] if "second" in k or "memory" in k]:
                eqat["e2e_qp"].pop(k)
    assert qa == qb


@pytest.mark.parametrize("fmt,e2e", [("gptq", 0), ("gptq_v2", 0), ("gptq_v2", 1)])
def test_streamed_output_equals_in_memory_path_byte_for_byte(tmp_path, stories260k_dir, fmt, e2e):
    cfg = dict(bits=2, group_size=64, save_format=fmt, block_epochs=1, block_batch_size=2, e2e_epochs=e2e,
               e2e_batch_size=4, compute_device="cpu")
    ids = _ids(512, n=16, t=32)
    _in_memory(stories260k_dir, EQATConfig(**cfg), ids, tmp_path / "memory")
    _streamed(stories260k_dir, EQATConfig(**cfg), ids, tmp_path / "streamed", tmp_path / "work")
    _same_checkpoint(tmp_path / "memory", tmp_path / "streamed")


def test_spooling_writer_shards_like_the_in_memory_writer(tmp_path):
    from effqat_plugin.converters.checkpoint import ShardWriter
    from effqat_plugin.converters.incremental import SpoolingShardWriter

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(17 * (i + 1)).to(dt) for i, dt in
               enumerate([torch.float16, torch.bfloat16, torch.float32, torch.int32] * 3)}
    tensors["empty"] = torch.zeros(0, dtype=torch.int32)
    outs = []
    for cls in (ShardWriter, SpoolingShardWriter):
        d = tmp_path / cls.__name__
        d.mkdir()
        w = cls(d, 300)
        for k, v in tensors.items():
            w.add(k, v)
        files = w.finish()
        assert len(files) > 2
        outs.append({f: (d / f).read_bytes() for f in sorted(p.name for p in d.iterdir())})
    assert outs[0] == outs[1]


def _fails(argv, capsys, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err, err
    return err


def _argv(src, out):
    return ["quantize", str(src), str(out), "--bits", "2", "--group-size", "32", "--n-samples", "4",
            "--seq-len", "8", "--e2e-epochs", "0", "--quiet", "--device", "cpu"]


def test_bad_checkpoints_fail_with_one_line_and_leave_nothing(tmp_path, sharded_bf16_llama, capsys):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(sharded_bf16_llama, dst)
        return dst

    missing = copy("missing")
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(_argv(missing, tmp_path / "o1"), capsys, shard.name)

    wrong = copy("wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(cfg))
    err = _fails(_argv(wrong, tmp_path / "o2"), capsys, "mlp")
    assert "config.json implies" in err and ".safetensors" in err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(sharded_bf16_llama / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    _fails(_argv(pickled, tmp_path / "o3"), capsys, "pytorch_model.bin")

    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["missing", "pickled", "wrong"]  # no output, work or temp folders
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))


def test_stream_batches_on_device_equal_plain_slices():
    from effqat_plugin.transfer import batches_to_device

    stream = torch.randn(7, 5, 3).to(torch.bfloat16)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = list(batches_to_device(stream, 2, torch.device(device), start=1))
        assert [(i, j) for i, j, _ in got] == [(1, 3), (3, 5), (5, 7)]
        for i, j, x in got:
            assert x.dtype == torch.float32 and x.device.type == device
            assert torch.equal(x.cpu(), stream[i:j].float())


def test_bad_fused_and_expert_tensors_fail_with_one_line_and_leave_nothing(tmp_path, stories260k_dir, capsys):
    """Fused projections (phi3) and MoE experts, per-expert (qwen3_moe) or merged by transformers into
    3-D tensors (deepseek_v3): a tensor of the wrong shape or a missing expert tensor is named, with its
    file, before anything runs; an already-quantized source is refused by name."""
    from safetensors.torch import load_file, save_file

    from arch_cases import CASES, build_tiny_model

    def variant(model_type, name, edit):
        case = next(c for c in CASES if c.model_type == model_type)
        src = tmp_path / "models" / f"{model_type}-{name}"
        build_tiny_model(case, src, stories260k_dir)
        tensors = load_file(str(src / "model.safetensors"))
        edit(src, tensors)
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        return src

    def shrink(key):
        return lambda _src, t: t.__setitem__(key, t[key][:-1].clone())

    def drop(key):
        return lambda _src, t: t.pop(key)

    def quantized(src, _t):
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4"}
        (src / "config.json").write_text(json.dumps(cfg))

    fused = variant("phi3", "short", shrink("model.layers.1.mlp.gate_up_proj.weight"))
    expert = variant("qwen3_moe", "missing", drop("model.layers.1.mlp.experts.3.up_proj.weight"))
    # deepseek_v3's experts are merged into 3-D tensors while loading, then defused: still named per expert
    merged = variant("deepseek_v3", "missing", drop("model.layers.1.mlp.experts.2.up_proj.weight"))
    merged_short = variant("deepseek_v3", "short", shrink("model.layers.1.mlp.experts.0.down_proj.weight"))
    mxfp4 = variant("gpt_oss", "mxfp4", quantized)
    capsys.readouterr()  # the builders' progress bars
    out = tmp_path / "out"
    err = _fails(_argv(fused, out), capsys, "model.layers.1.mlp.gate_up_proj.weight has shape [255, 64]")
    assert "model.safetensors" in err and "config.json implies [256, 64]" in err
    _fails(_argv(expert, out), capsys, "tensor model.layers.1.mlp.experts.3.up_proj.weight (required by "
                                       "config.json) is in no safetensors shard")
    _fails(_argv(merged, out), capsys, "tensor model.layers.1.mlp.experts.2.up_proj.weight (required by config.json)")
    err = _fails(_argv(merged_short, out), capsys, "tensor model.layers.1.mlp.experts.0.down_proj.weight has shape [63, 32]")
    assert "model.safetensors" in err
    _fails(_argv(mxfp4, out), capsys, "already-quantized checkpoint (quant_method 'mxfp4')")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no output, work or temp folders
