"""Block-AP's loss option: ``mse`` (default) is exactly ``F.mse_loss`` and keeps the work-folder
fingerprints of earlier versions; ``channel_rms`` is invariant to a per-channel rescaling of the
stream, ``token_relative`` to a per-token one; both train and score real layers; bad values are refused."""
import pytest
import torch
import torch.nn.functional as F
from test_block_lr_search import TRAIN, VAL, cfg_for, run, tiny_llama

from effqat_plugin import EQATConfig
from effqat_plugin.block_ap import BlockAP
from effqat_plugin.block_loss import BlockLoss
from effqat_plugin.layout import resolve_layout
from effqat_plugin.resume import run_fingerprint


def test_default_mse_is_f_mse_loss_bit_for_bit(monkeypatch):
    """A run with the default loss equals one whose loss is replaced by the plain F.mse_loss the
    trainer used before ``block_loss`` existed (same integers, same held-out losses)."""
    assert EQATConfig().block_loss == "mse"
    default = run(cfg_for(block_lr_search=()))
    monkeypatch.setattr(BlockLoss, "__call__", lambda self, y, t: F.mse_loss(y, t))
    plain = run(cfg_for(block_lr_search=()))
    assert [r.val_loss for r in default.reports] == [r.val_loss for r in plain.reports]
    for name, qw in plain.qweights.items():
        assert qw.equal(default.qweights[name]), name


def test_mse_keeps_the_fingerprint_of_work_folders_written_before_block_loss(monkeypatch):
    model = tiny_llama(2)
    layout = resolve_layout(model)
    cfg = cfg_for()
    new = run_fingerprint(model, layout, cfg, TRAIN, 16)
    settings = EQATConfig.eqat_settings
    monkeypatch.setattr(EQATConfig, "eqat_settings",
                        lambda self: {k: v for k, v in settings(self).items() if k != "block_loss"})
    assert run_fingerprint(model, layout, cfg, TRAIN, 16) == new
    monkeypatch.undo()
    assert run_fingerprint(model, layout, cfg_for(block_loss="channel_rms"), TRAIN, 16) != new


def test_normalized_losses_ignore_the_scale_they_normalize():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, 8, generator=g)
    y = t + 0.1 * torch.randn(4, 6, 8, generator=g)
    channel = torch.logspace(-2, 3, 8)     # a few channels 1e5 x larger than others
    token = torch.logspace(-1, 2, 6)[None, :, None]
    a = BlockLoss("channel_rms").fit(t, 3, 2)(y[3:], t[3:])
    b = BlockLoss("channel_rms").fit(t * channel, 3, 2)(y[3:] * channel, t[3:] * channel)
    torch.testing.assert_close(a, b)
    assert BlockLoss("mse")(y * channel, t * channel) > 100 * BlockLoss("mse")(y, t)
    torch.testing.assert_close(BlockLoss("token_relative")(y * token, t * token), BlockLoss("token_relative")(y, t))
    assert BlockLoss("token_relative")(t, t) == 0


@pytest.mark.parametrize("kind", ["channel_rms", "token_relative"])
def test_normalized_losses_train_and_score_every_layer(kind):
    base = run(cfg_for(block_lr_search=()))
    other = run(cfg_for(block_lr_search=(), block_loss=kind))
    assert all(r.val_loss is not None and 0 <= r.val_loss < float("inf") for r in other.reports)
    assert any(not qw.equal(base.qweights[n]) for n, qw in other.qweights.items())   # another objective


def test_bad_block_loss_is_refused():
    with pytest.raises(ValueError, match="block_loss"):
        EQATConfig(block_loss="l1")
