"""Learning-rate rules: ``auto`` equals the reference scripts at the paper's budget, raises below it."""
import pytest

from effqat_plugin import lr_rules
from effqat_plugin.e2e_qp import E2ESettings

# the reference scripts' rates: (Block-AP s/z, Block-AP weights+norms, E2E-QP)
REFERENCE = {2: (1e-4, 2e-5, 2e-5), 3: (1e-4, 1e-5, 1e-5), 4: (1e-4, 1e-5, 1e-5)}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("budget", [1.0, 3.0])  # the paper's token budget, and more than it
def test_auto_equals_reference_scripts_at_paper_budget(bits, budget):
    q_ref, w_ref, e_ref = REFERENCE[bits]
    block_tokens = int(budget * lr_rules.PAPER_BLOCK_TOKENS)
    e2e_tokens = int(budget * lr_rules.PAPER_E2E_TOKENS)
    for preset in ("auto", "paper"):
        q, w = lr_rules.block_lrs(bits, preset, 128.0, block_tokens)
        assert (q, w) == (q_ref, w_ref), (preset, bits)
        assert lr_rules.e2e_lr(bits, preset, 128.0, e2e_tokens) == e_ref
        assert E2ESettings(bits=bits, lr_preset=preset).e2e_learning_rate(e2e_tokens) == e_ref


def test_auto_below_budget_raises_weights_by_k_and_step_sizes_by_bit_width():
    k = 16.0
    tokens = int(lr_rules.PAPER_BLOCK_TOKENS / k)
    q2, w2 = lr_rules.block_lrs(2, "auto", 128.0, tokens)
    assert q2 == pytest.approx(1e-4 * k) and w2 == pytest.approx(2e-5 * k)
    q4, w4 = lr_rules.block_lrs(4, "auto", 128.0, tokens)
    assert w4 == pytest.approx(1e-5 * k)
    assert q4 == pytest.approx(1e-4 * (1 + (k - 1) * 3 / 15))  # 4 x, not 16 x: 4-bit steps are 5x smaller
    # capped at max_scale, and the paper preset never scales
    assert lr_rules.block_lrs(2, "auto", 8.0, 1)[1] == pytest.approx(2e-5 * 8)
    assert lr_rules.block_lrs(2, "paper", 128.0, 1) == (1e-4, 2e-5)
    # an explicit scale (chosen from data) replaces the token-budget one; explicit rates always win
    assert lr_rules.block_lrs(3, "auto", 128.0, 1, scale=1.0) == (1e-4, 1e-5)
    assert lr_rules.block_lrs(2, "auto", 128.0, 1, quant_lr=3e-3, weight_lr=4e-4) == (3e-3, 4e-4)
    assert lr_rules.e2e_lr(2, "auto", 128.0, 1, lr=7e-4) == 7e-4
