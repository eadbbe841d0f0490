"""The user's flow: GPTQModel.load(path, EQATConfig) -> quantize -> save -> GPTQModel.from_quantized.

The bundled stories260k (a real trained Llama with ragged 172-wide MLP) runs the whole pipeline with a
small calibration set; the reloaded checkpoints must dequantize to exactly the plugin's learned
(W_int - z) * s.
"""
import json
import math
import shutil

import pytest
import torch

from effqat_plugin import EQATConfig
from effqat_plugin.data import CalibrationError, normalize_calibration, sample_from_model
from effqat_plugin.layout import UnsupportedArchitectureError, definition_for

from gptqmodel import BACKEND, GPTQModel  # noqa: E402  (after effqat_plugin: env set)


def small_config(**kw):
    base = dict(bits=2, group_size=64, block_epochs=1, block_batch_size=4, e2e_epochs=1, e2e_max_auto_epochs=1,
                e2e_batch_size=4,
                block_val_samples=4)
    base.update(kw)
    return EQATConfig(**base)


@pytest.fixture(scope="module")
def calib(stories260k_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32)
    return sample_from_model(m, 32, 64, seed=0)


@pytest.fixture(scope="module")
def quantized(stories260k_dir, calib):
    model = GPTQModel.load(str(stories260k_dir), small_config(), dtype=torch.float32)
    summary = model.quantize(calib, show_progress=False)
    return model, summary


def assert_reloads_exactly(folder, qweights):
    q = GPTQModel.from_quantized(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    for name, qw in qweights.items():
        module = q.model.get_submodule(name)
        got = module.dequantize_weight().T.to(torch.float16)  # TorchLinear returns [in, out]
        assert torch.equal(got, qw.dequantize(torch.float16)), name
    return q


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_saved_checkpoint_loads_in_gptqmodel_and_dequantizes_exactly(quantized, tmp_path, fmt):
    model, _ = quantized
    out = tmp_path / f"out-{fmt}"
    model.save(str(out), fmt=fmt)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 2 and qcfg["group_size"] == 64 and qcfg["sym"] is False
    assert qcfg.get("checkpoint_format", qcfg.get("format")) == fmt
    result = model._eqat_result
    assert len(result.qweights) == 5 * 7
    q = assert_reloads_exactly(out, result.qweights)
    # the reloaded model computes what the in-memory quantized model computes
    ids = torch.randint(3, 512, (2, 32))
    with torch.no_grad():
        ours = model.model(input_ids=ids).logits.float()
        theirs = q.model(input_ids=ids).logits.float()
    rel = float((ours - theirs).norm() / ours.norm())
    assert rel < 0.03, rel  # same weights; fp16 (GPTQModel) vs fp32 (ours) arithmetic only


def test_meta_records_identity_settings_and_losses(quantized, tmp_path):
    model, summary = quantized
    out = tmp_path / "meta"
    model.save(str(out))
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]
    assert any(q.startswith("effqat:") for q in meta["quantizer"]) if isinstance(meta["quantizer"], list) \
        else "effqat:" in meta["quantizer"]
    eqat = meta["eqat"]
    assert eqat["settings"]["bits"] == 2 and eqat["settings"]["group_size"] == 64
    assert eqat["calibration"] == {"train_samples": 28, "val_samples": 4, "seq_len": 64, "e2e_samples": 28,
                                   "e2e_seq_len": 64, "self_generated": 0, "block_ap_samples": 28}
    layers = eqat["block_ap"]["layers"]
    assert [r["index"] for r in layers] == [0, 1, 2, 3, 4]
    assert all(r["val_loss"] is not None and math.isfinite(r["val_loss"]) for r in layers)
    assert eqat["e2e_qp"]["steps"] == 7
    assert summary["eqat"]["block_ap"]["layers"] == layers


def test_save_refuses_existing_folder_and_keeps_it(quantized, tmp_path):
    model, _ = quantized
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        model.save(str(out))
    assert (out / "keep.txt").read_text() == "user data" and len(list(out.iterdir())) == 1


def test_quantize_twice_is_refused(quantized, calib):
    model, _ = quantized
    with pytest.raises(EnvironmentError):
        model.quantize(calib)


def test_calibration_forms_agree(stories260k_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories260k_dir))
    ids = torch.randint(3, 512, (3, 16))
    as_dicts = normalize_calibration([{"input_ids": r.tolist()} for r in ids])
    assert torch.equal(as_dicts, ids)
    texts = [" ".join(f"t{int(i)}" for i in r) for r in ids]
    from_text = normalize_calibration(texts, tokenizer=tok, seq_len=16)
    enc = tok(texts[0])["input_ids"]
    assert [int(i) for i in enc if i > 2][:16] == ids[0].tolist()
    assert from_text.shape[1] == 16 and from_text.numel() >= 3 * 16
    with pytest.raises(CalibrationError):
        normalize_calibration([])
    with pytest.raises(CalibrationError):
        normalize_calibration(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(CalibrationError):
        normalize_calibration(torch.randn(2, 4))


@pytest.mark.parametrize("kw", [dict(bits=5), dict(bits=1), dict(group_size=48), dict(group_size=0),
                                dict(sym=True, e2e_train_zeros=True), dict(save_format="awq")])
def test_bad_config_is_refused(kw):
    with pytest.raises(ValueError):
        small_config(**kw)


def test_group_larger_than_in_features_and_unknown_arch_are_refused(stories260k_dir, calib):
    model = GPTQModel.load(str(stories260k_dir), small_config(group_size=128), dtype=torch.float32)
    with pytest.raises(ValueError, match="larger than in_features"):
        model.quantize(calib)
    with pytest.raises(UnsupportedArchitectureError):
        definition_for("not_a_real_arch")


def test_qwen2_family_from_tiny_config(tmp_path, stories260k_dir):
    """A second architecture (biases on q/k/v, other definition) through the same flow."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tmp_path / "qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k_dir / f, src / f)
    model = GPTQModel.load(str(src), small_config(bits=4, group_size=32, e2e_epochs=1), dtype=torch.float32)
    model.quantize(torch.randint(3, 512, (16, 32)), show_progress=False)
    names = set(model._eqat_result.qweights)
    assert "model.layers.1.self_attn.k_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert model._eqat_result.qweights["model.layers.0.self_attn.q_proj"].bias is not None
    out = tmp_path / "qwen2-w4g32"
    model.save(str(out), fmt="gptq_v2")
    assert_reloads_exactly(out, model._eqat_result.qweights)
