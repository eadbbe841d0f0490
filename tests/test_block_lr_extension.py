"""The Block-AP lr search never stops at the edge of its range: while the lowest (highest) scale tried
wins, it halves (doubles) it, within [1, max_lr_scale], on layer 0 and at the recheck layers; every
candidate is recorded and survives a resume. The held-out loss is scripted as a known function of the
scale (and of the layer) so that the optimum lies outside the initial candidates; one real tiny run
with a narrow initial range finds a winner outside it."""
import math

import pytest
import torch
from test_block_lr_search import TRAIN, VAL, assert_search_went_past_its_edges, cfg_for, run, tiny_llama

from effqat_plugin import lr_rules
from effqat_plugin.block_ap import BlockAP
from effqat_plugin.layout import resolve_layout
from effqat_plugin.runtime import resolve_runtime

PAPER_WEIGHT_LR = lr_rules.paper_block_lrs(2)[1]


def scripted(monkeypatch, optimum, diverge_above=None):
    """Training is done once (at fixed rates) and reused, so only the search logic runs; the held-out
    loss of a layer trained at scale ``s`` is ``log2(s / optimum(layer))^2``."""
    real = BlockAP._train_layer
    cache, current = {}, {}

    def train(self, index, original, fp_out, q_in, n_train, quant_lr, weight_lr):
        current["scale"], current["index"] = weight_lr / PAPER_WEIGHT_LR, index
        if diverge_above is not None and current["scale"] > diverge_above * 1.0001:
            raise FloatingPointError("scripted divergence")
        if index not in cache:
            cache[index] = real(self, index, original, fp_out, q_in, n_train, *lr_rules.paper_block_lrs(2))
        return cache[index]

    def loss_on(self, index, layer, inputs, targets, start, stop):
        return math.log2(current["scale"] / optimum(current["index"])) ** 2
    monkeypatch.setattr(BlockAP, "_train_layer", train)
    monkeypatch.setattr(BlockAP, "_loss_on", loss_on)


def scales(trials):
    return [t["scale"] for t in trials]


def test_layer_0_halves_below_the_lowest_candidate_until_the_best_is_interior(monkeypatch, tmp_path):
    scripted(monkeypatch, lambda i: 4.0)   # today's range is 32 / 64 / 128
    result = run(cfg_for(block_lr_recheck=0), work_dir=str(tmp_path / "w"))
    trials = result.lr_search[0]["trials"]
    assert scales(trials) == [32.0, 64.0, 128.0, 16.0, 8.0, 4.0, 2.0]
    assert_search_went_past_its_edges(trials, 4)
    assert all(r.lr_scale == 4.0 for r in result.reports) and result.lr_fraction == 4.0 / 128
    assert result.reports[0].weight_lr == pytest.approx(4.0 * PAPER_WEIGHT_LR)
    # every candidate tried is in the layer report, and a resumed run reads it back unchanged
    again = run(cfg_for(block_lr_recheck=0), work_dir=str(tmp_path / "w"))
    assert again.lr_search == result.lr_search and again.reports[3].lr_scale == 4.0


def test_the_search_stops_at_the_paper_rates(monkeypatch):
    scripted(monkeypatch, lambda i: 0.1)
    trials = run(cfg_for(block_lr_recheck=0)).lr_search[0]["trials"]
    assert scales(trials) == [32.0, 64.0, 128.0, 16.0, 8.0, 4.0, 2.0, 1.0]


def test_the_search_doubles_up_to_max_lr_scale_and_turns_down_where_training_diverges(monkeypatch):
    tokens = TRAIN.shape[0] * TRAIN.shape[1]
    k = lr_rules.PAPER_BLOCK_TOKENS / tokens   # the full raise, below a max_lr_scale set above it
    cfg = cfg_for(block_lr_recheck=0, max_lr_scale=16 * k)
    scripted(monkeypatch, lambda i: 100 * k)
    trials = run(cfg).lr_search[0]["trials"]
    assert scales(trials) == pytest.approx([k / 4, k / 2, k, 2 * k, 4 * k, 8 * k, 16 * k])  # bound: max_lr_scale
    scripted(monkeypatch, lambda i: 100 * k, diverge_above=2 * k)
    trials = run(cfg).lr_search[0]["trials"]
    assert scales(trials) == pytest.approx([k / 4, k / 2, k, 2 * k, 4 * k])
    assert trials[-1]["diverged"] and "val_loss" not in trials[-1]
    assert min(trials[:-1], key=lambda t: t["val_loss"])["scale"] == 2 * k
    # every rate diverges: down to the paper's rates, then a clear error
    scripted(monkeypatch, lambda i: 100 * k, diverge_above=0.5)
    with pytest.raises(FloatingPointError, match="every lr scale"):
        run(cfg)


def test_recheck_layers_keep_halving_while_half_wins_and_double_when_the_current_wins(monkeypatch):
    scripted(monkeypatch, lambda i: 64.0 if i < 2 else 8.0)   # deeper layers want a smaller raise
    result = run(cfg_for(block_lr_recheck=1))   # recheck at layer 2
    search = {s["layer"]: s["trials"] for s in result.lr_search}
    assert scales(search[0]) == [32.0, 64.0, 128.0]   # interior at once: nothing added
    assert scales(search[2]) == [32.0, 64.0, 16.0, 8.0, 4.0]
    assert [r.lr_scale for r in result.reports] == [64.0, 64.0, 8.0, 8.0]

    tokens = TRAIN.shape[0] * TRAIN.shape[1]
    k = lr_rules.PAPER_BLOCK_TOKENS / tokens
    scripted(monkeypatch, lambda i: k / 2 if i < 2 else 2 * k)
    result = run(cfg_for(block_lr_recheck=1, max_lr_scale=16 * k))
    search = {s["layer"]: s["trials"] for s in result.lr_search}
    assert scales(search[2]) == pytest.approx([k / 4, k / 2, k, 2 * k, 4 * k])
    assert result.reports[3].lr_scale == pytest.approx(2 * k)


def test_real_tiny_run_finds_a_rate_outside_a_narrow_initial_range():
    """Only 64 and 128 to start with: on this tiny model (seeded) the held-out loss keeps falling
    below 64, so the search continues downwards and keeps a scale no initial candidate had, with a
    lower held-out loss than both."""
    result = run(cfg_for(block_lr_search=(0.5, 1.0), block_lr_recheck=0))
    trials = result.lr_search[0]["trials"]
    assert scales(trials)[:2] == [64.0, 128.0] and len(trials) > 2
    assert_search_went_past_its_edges(trials, len(trials) - 2)
    best = min(trials, key=lambda t: t["val_loss"])
    assert best["scale"] < 64.0 and best["val_loss"] < min(t["val_loss"] for t in trials[:2])
    assert result.reports[0].lr_scale == best["scale"]
    assert result.reports[0].val_loss == pytest.approx(best["val_loss"])
