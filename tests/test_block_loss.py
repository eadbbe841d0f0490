"""Block-AP's reconstruction loss: the paper's MSE, or the token-relative loss for models whose first
token carries massive activations (EQATConfig.block_loss)."""
import pytest
import torch

from effqat_plugin import EQATConfig
from effqat_plugin.block_ap import block_loss
from effqat_plugin.eqat_run import run_eqat


def test_token_relative_loss_weighs_every_token_by_its_own_scale():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 10, 16, generator=g)
    y = target + 0.1 * torch.randn(3, 10, 16, generator=g)
    manual = torch.stack([((y[b, t] - target[b, t]).pow(2).mean() / target[b, t].pow(2).mean())
                          for b in range(3) for t in range(10)]).mean()
    assert torch.allclose(block_loss(y, target, "token_relative"), manual, rtol=1e-5)
    assert torch.allclose(block_loss(y, target, "mse"), (y - target).pow(2).mean())
    # a massive first token (same relative error, 1000x the scale) swamps MSE, not the relative loss
    y2, t2 = y.clone(), target.clone()
    y2[:, 0] *= 1000
    t2[:, 0] *= 1000
    assert torch.allclose(block_loss(y2, t2, "token_relative"), manual, rtol=1e-4)
    assert block_loss(y2, t2, "mse") > 1000 * block_loss(y, target, "mse")


def test_block_loss_setting_is_validated_used_and_recorded():
    from test_block_ap_streams import tiny_llama

    with pytest.raises(ValueError, match="block_loss"):
        EQATConfig(block_loss="l1")
    ids = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(1))
    runs = {}
    for kind in ("mse", "token_relative"):
        cfg = EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=0,
                         block_val_samples=2, block_lr_search=(), block_loss=kind)
        runs[kind] = run_eqat(tiny_llama(), cfg, ids, show_progress=False)
        assert runs[kind].meta(cfg)["settings"]["block_loss"] == kind
    mse, rel = runs["mse"], runs["token_relative"]
    assert any(not qw.equal(rel.qweights[n]) for n, qw in mse.qweights.items())  # the loss drives training
    # the reported per-layer losses are the configured loss
    assert all(r.train_loss != m.train_loss for r, m in zip(rel.block_ap.reports, mse.block_ap.reports))
