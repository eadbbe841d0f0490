"""Block-AP's activation streams: memory-mapped offload gives the same integers as RAM, leaves no files;
the layer-0 capture moves only the modules outside the decoder layers to the compute device."""
import torch

from effqat_plugin import EQATConfig
from effqat_plugin.eqat_run import run_eqat


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def test_offloaded_streams_match_ram_and_are_removed(tmp_path):
    cfg = EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=0, block_val_samples=2)
    ids = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(1))
    in_ram = run_eqat(tiny_llama(), cfg, ids, show_progress=False)
    offload = tmp_path / "streams"
    on_disk = run_eqat(tiny_llama(), cfg, ids, show_progress=False, offload_dir=str(offload))
    assert in_ram.qweights.keys() == on_disk.qweights.keys() and len(in_ram.qweights) == 14
    for name, qw in in_ram.qweights.items():
        assert qw.equal(on_disk.qweights[name]), name
    assert [r.val_loss for r in in_ram.block_ap.reports] == [r.val_loss for r in on_disk.block_ap.reports]
    assert list(offload.iterdir()) == []


def test_capture_moves_only_modules_outside_the_layers():
    from effqat_plugin.block_ap import modules_outside_layers
    from effqat_plugin.layout import resolve_layout

    model = tiny_llama()
    layout = resolve_layout(model)
    outside = {id(m) for m in modules_outside_layers(model, layout)}
    assert id(model.model.embed_tokens) in outside and id(model.model.norm) in outside
    assert id(model.model.rotary_emb) in outside and id(model.lm_head) in outside
    assert not any(id(m) in outside for m in layout.layers.modules())  # no layer part is moved


def test_plugin_e2e_trains_on_self_generated_samples_too():
    """EQATConfig(self_generated=N): run_eqat samples N sequences from the still-fp model and
    Block-AP and E2E-QP train on them besides the calibration's training split; recorded in meta.eqat."""
    cfg = EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=1, e2e_max_auto_epochs=1,
                     e2e_batch_size=4, block_val_samples=2, self_generated=3)
    ids = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(1))
    result = run_eqat(tiny_llama(), cfg, ids, show_progress=False)
    assert result.n_train == 14 and result.extra["e2e_samples"] == 17
    meta = result.meta(cfg)
    assert meta["calibration"]["self_generated"] == 3 and meta["settings"]["self_generated"] == 3
    assert result.e2e.total_steps == 5  # ceil(17 / 4)
    # Block-AP trained on them as well (block_self_generated, the default): 17 samples, 5 steps per layer
    assert meta["calibration"]["block_ap_samples"] == 17 and meta["settings"]["block_self_generated"] is True
    assert all(r.steps == 5 for r in result.block_ap.reports)
