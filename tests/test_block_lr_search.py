"""Block-AP's learning-rate search (``auto`` preset below the paper budget): the first layer is trained
once per candidate rate and the lowest held-out loss wins, recheck layers try the current rate against
half of it, the following layers use the winner, E2E-QP follows the share of the raise Block-AP ended
on, the choices are recorded and survive a resume; nothing is searched where ``auto`` must equal the
reference scripts."""
import json

import pytest
import torch

from effqat_plugin import EQATConfig, lr_rules
from effqat_plugin.block_ap import BlockAP
from effqat_plugin.layout import resolve_layout
from effqat_plugin.runtime import resolve_runtime


def tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


IDS = torch.randint(0, 128, (20, 24), generator=torch.Generator().manual_seed(1))
TRAIN, VAL = IDS[:16], IDS[16:]


def cfg_for(**kw):
    return EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=0, **kw)


def run(cfg, work_dir=None, model=None):
    model = model or tiny_llama()
    return BlockAP(model, resolve_layout(model), cfg, resolve_runtime("cpu"), show_progress=False).run(
        TRAIN, VAL, work_dir=work_dir)


def assert_search_went_past_its_edges(trials, extensions, low=1.0, high=128.0):
    """Each appended candidate halves the lowest / doubles the highest scale tried before it, on the side
    where the best so far was; the search ends with its best interior or on a bound."""
    for n in range(len(trials) - extensions, len(trials)):
        before, new = trials[:n], trials[n]["scale"]
        best = min(before, key=lambda t: t.get("val_loss", float("inf")))["scale"]
        lo, hi = min(t["scale"] for t in before), max(t["scale"] for t in before)
        assert (best == lo and new == max(low, lo / 2)) or (best == hi and new == min(high, hi * 2)), (before, new)
    best = min(trials, key=lambda t: t["val_loss"])["scale"]
    scales = [t["scale"] for t in trials]
    assert min(scales) < best < max(scales) or best in (low, high), trials


def test_candidates_only_below_the_paper_budget_with_auto_rates():
    small = 16 * 24  # tokens: k = 128 (capped)
    cands = cfg_for().block_lr_candidates(small)
    assert [c["scale"] for c in cands] == [32.0, 64.0, 128.0]
    for c in cands:
        assert (c["quant_lr"], c["weight_lr"]) == lr_rules.block_lrs(2, "auto", 128.0, small, scale=c["scale"])
    assert cfg_for().block_lr_candidates(lr_rules.PAPER_BLOCK_TOKENS) == []  # auto == reference scripts there
    assert cfg_for(lr_preset="paper").block_lr_candidates(small) == []
    assert cfg_for(block_quant_lr=1e-3).block_lr_candidates(small) == []
    assert cfg_for(block_lr_search=()).block_lr_candidates(small) == []
    # k near 1: fractions collapse onto the paper rates, never below them
    near = int(lr_rules.PAPER_BLOCK_TOKENS / 2)
    assert [c["scale"] for c in cfg_for().block_lr_candidates(near)] == [1.0, 2.0]
    with pytest.raises(ValueError, match="block_lr_search"):
        cfg_for(block_lr_search=(0.5, 2.0))


def test_each_searched_layer_keeps_the_candidate_with_the_lowest_held_out_loss():
    result = run(cfg_for(block_lr_recheck=1))  # 4 layers: recheck on layer 2
    searches = result.lr_search
    assert [s["layer"] for s in searches] == [0, 2]
    assert [t["scale"] for t in searches[0]["trials"]][:3] == [32.0, 64.0, 128.0]
    scale = 128.0
    for search in searches:
        trials = search["trials"]
        if search["layer"] > 0:  # the current raise and half of it
            assert sorted(t["scale"] for t in trials[:2]) == [scale / 2, scale]
        assert_search_went_past_its_edges(trials, len(trials) - (3 if search["layer"] == 0 else 2))
        best = min(trials, key=lambda t: t["val_loss"])
        report = result.reports[search["layer"]]
        assert (report.quant_lr, report.weight_lr, report.lr_scale) == (best["quant_lr"], best["weight_lr"],
                                                                         best["scale"])
        assert report.val_loss == pytest.approx(best["val_loss"])  # the kept layer is the winner's
        scale = best["scale"]
    reports = result.reports
    assert (reports[1].quant_lr, reports[1].lr_scale) == (reports[0].quant_lr, reports[0].lr_scale)
    assert (reports[3].quant_lr, reports[3].lr_scale) == (reports[2].quant_lr, reports[2].lr_scale)
    assert (result.quant_lr, result.lr_scale) == (reports[3].quant_lr, reports[3].lr_scale)
    assert result.lr_fraction == reports[3].lr_scale / 128.0

    # layer 0 has the same integers as a run told the winning rates outright (the search leaves the
    # streams untouched); E2E-QP's raise follows the share Block-AP ended on
    first = searches[0]["trials"]
    best = min(first, key=lambda t: t["val_loss"])
    fixed = run(cfg_for(block_quant_lr=best["quant_lr"], block_weight_lr=best["weight_lr"]))
    assert fixed.lr_search == [] and fixed.lr_fraction == 1.0
    prefix = "model.layers.0."
    for name, qw in fixed.qweights.items():
        if name.startswith(prefix):
            assert qw.equal(result.qweights[name]), name
    tokens = 16 * 24
    assert lr_rules.e2e_lr(2, "auto", 128.0, tokens, fraction=0.25) == pytest.approx(2e-5 * 32)
    assert lr_rules.e2e_lr(2, "auto", 128.0, tokens, fraction=1e-6) == 2e-5  # never below the paper's


def test_resumed_run_continues_with_the_rates_the_search_had_reached(tmp_path):
    work = tmp_path / "work"
    first = run(cfg_for(block_lr_recheck=1), work_dir=str(work))
    # pretend the run was killed after layer 1 (no search there): layers 2, 3 are trained again,
    # layer 2 rechecking from the rates layer 0 chose
    progress = json.loads((work / "progress.json").read_text())
    progress["layers"] = [0, 1]
    (work / "progress.json").write_text(json.dumps(progress))
    resumed = run(cfg_for(block_lr_recheck=1), work_dir=str(work))
    assert resumed.lr_search == first.lr_search
    assert (resumed.quant_lr, resumed.weight_lr, resumed.lr_fraction) == (first.quant_lr, first.weight_lr,
                                                                         first.lr_fraction)
    assert [(r.quant_lr, r.lr_scale) for r in resumed.reports] == [(r.quant_lr, r.lr_scale) for r in first.reports]
    for name, qw in first.qweights.items():
        assert qw.equal(resumed.qweights[name]), name
