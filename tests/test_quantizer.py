"""The quantizer math: init, straight-through gradients (paper appendix C), freezing, ragged groups."""
import pytest
import torch
import torch.nn as nn

from effqat_plugin.quantizer import (FakeQuantLinear, fake_quantize, init_scales_zeros, quantize_to_ints,
                                     rtn_quantize)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((24, 128), 64), ((10, 172), 64), ((7, 96), -1), ((5, 40), 32)])
def test_rtn_error_is_within_half_a_step_and_ints_in_range(bits, shape, group):
    torch.manual_seed(bits)
    w = torch.randn(*shape) * 0.05
    qw = rtn_quantize(w, bits, group, scales_dtype=torch.float32)
    n_groups = 1 if group == -1 else -(-shape[1] // group)
    assert qw.zeros.shape == (shape[0], n_groups) and qw.scales.shape == (shape[0], n_groups)
    assert int(qw.int_weight.max()) <= 2**bits - 1 and int(qw.zeros.max()) <= 2**bits - 1
    err = (qw.dequantize() - w).abs()
    step = qw.scales[:, qw.g_idx.long()]
    # min/max init covers each group's range, so only zero-point rounding can add (at most) half a step
    assert bool((err <= step + 1e-6).all())
    assert float(err.mean()) < float(step.mean()) / 2


def test_partial_last_group_uses_only_its_own_channels():
    w = torch.zeros(2, 70)
    w[:, :64] = torch.linspace(-1, 1, 64)
    w[:, 64:] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    s, z = init_scales_zeros(w, 2, 64)
    assert torch.allclose(s[:, 1], torch.full((2,), (0.6 - 0.1) / 3))
    assert torch.allclose(s[:, 0], torch.full((2,), 2 / 3))


def test_fake_quant_forward_equals_frozen_integers():
    torch.manual_seed(0)
    lin = nn.Linear(100, 12)
    fq = FakeQuantLinear(lin, 3, 32)
    with torch.no_grad():
        fq.scales.mul_(1.1)
        fq.zeros.add_(0.4)  # non-integer learned zero point: rounded in both paths
    w_hat = fake_quantize(fq.weight, fq.scales, fq.zeros, 3, 32)
    frozen = fq.freeze(torch.float32)
    assert torch.allclose(w_hat, frozen.dequantize(), atol=1e-6)


def test_straight_through_gradients_match_appendix_c():
    """dW_hat/ds = round(W/s) - W/s inside the range, -z or (2^b-1-z) at the clamps; dW_hat/dW = 1 / 0."""
    bits, maxq = 2, 3
    s = torch.tensor([[0.5]], requires_grad=True)
    z = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[0.3, -2.0, 5.0, -0.2]], requires_grad=True)  # inside, below, above, inside
    w_hat = fake_quantize(w, s, z, bits, -1)
    w_hat.sum().backward()
    ws = w.detach() / 0.5
    inside = ws.round() - ws
    expected_ds = inside[0, 0] + (0 - 1.0) + (maxq - 1.0) + inside[0, 3]
    assert torch.allclose(s.grad, expected_ds.reshape(1, 1), atol=1e-6)
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    # dW_hat/dz = 0 inside, -s outside (appendix C's -1 in units of s): two clamped entries
    assert torch.allclose(z.grad, torch.tensor([[-2 * 0.5]]))


def test_weights_on_the_lowest_and_highest_code_keep_their_gradient():
    """Appendix C's dW_hat/dW = 1 holds on the closed range [0, 2^b-1]: a weight whose code is exactly 0
    or 2^b-1 trains (torch 2.14's own clamp gives such a value gradient 0, which froze them)."""
    bits = 2
    s = torch.tensor([[0.5]], requires_grad=True)
    z = torch.tensor([[1.0]], requires_grad=True)
    # codes: round(-0.5/0.5)+1 = 0, round(-0.6/0.5)+1 = 0, round(1.0/0.5)+1 = 3, round(1.1/0.5)+1 = 3, beyond
    w = torch.tensor([[-0.5, -0.6, 1.0, 1.1, 1.3]], requires_grad=True)
    fake_quantize(w, s, z, bits, -1).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]))
    ws = w.detach() / 0.5
    expected_ds = (ws.round() - ws)[0, :4].sum() + (3 - 1.0)
    assert torch.allclose(s.grad, expected_ds.reshape(1, 1), atol=1e-6)
    assert torch.allclose(z.grad, torch.tensor([[-0.5]]))  # only the one weight beyond the grid


def test_quantize_to_ints_clamps_out_of_range_zero_points():
    w = torch.rand(4, 32) + 1.0  # all-positive groups: z = round(-min/s) < 0 before clamping
    s, z = init_scales_zeros(w, 2, 32)
    assert float(z.min()) < 0
    q, zi, _ = quantize_to_ints(w, s, z, 2, 32)
    assert int(zi.min()) >= 0 and int(q.max()) <= 3
