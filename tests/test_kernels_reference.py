"""Reference (pure torch) kernel path: packing, dequantize, qlinear forward + grads, PackedQuantLinear.

The oracle for these tests is plain float64 autograd on ``(W_int - z) * s`` built from the unpacked
QuantizedWeight tensors; inputs are random (never zeros).
"""
import pytest
import torch

import effqat_plugin.kernels as K
from effqat_plugin.kernels import (PackedQuantLinear, active_backend, dequantize, pack_int_weight,
                                   qlinear, unpack_int_weight, use_backend)
from effqat_plugin.qweight import QuantizedWeight

# forward / grad tolerances (atol, rtol) against an fp64 oracle, per activation dtype
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1.5e-1, 2e-2)}


def make_qw(out, inf, bits, gs, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inf // gs)
    maxq = (1 << bits) - 1
    return QuantizedWeight(
        int_weight=torch.randint(0, maxq + 1, (out, inf), generator=g, dtype=torch.uint8),
        zeros=torch.randint(0, maxq + 1, (out, ng), generator=g, dtype=torch.uint8),
        scales=torch.rand(out, ng, generator=g) * 0.05 + 0.01,
        bits=bits, group_size=gs,
        bias=(torch.randn(out, generator=g) if bias else None))


def oracle(x, qw, zeros_float=None):
    """float64 autograd oracle -> (y, grad_x, grad_s, grad_z) for loss = sum(y * w)."""
    gi = qw.g_idx.long()
    s = qw.scales.double().clone().requires_grad_(True)
    z = (qw.zeros.double() if zeros_float is None else zeros_float.double()).clone().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    w = (qw.int_weight.double() - z[:, gi]) * s[:, gi]
    y = xd @ w.t()
    if qw.bias is not None:
        y = y + qw.bias.double()
    return y, xd, s, z


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("inf", [1, 31, 32, 33, 100])
def test_pack_roundtrip(bits, inf):
    g = torch.Generator().manual_seed(bits * 1000 + inf)
    w = torch.randint(0, 1 << bits, (5, inf), generator=g, dtype=torch.uint8)
    p = pack_int_weight(w, bits)
    assert p.dtype == torch.int32
    assert p.shape == (-(-inf // (32 // bits)), 5)
    assert torch.equal(unpack_int_weight(p, bits, inf), w)


def test_pack_layout_is_lsb_first_along_in():
    # 3-bit: 10 values per word, top 2 bits unused; value j at bit offset 3*j
    w = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]], dtype=torch.uint8)
    p = pack_int_weight(w, 3)
    expect0 = sum(int(v) << (3 * j) for j, v in enumerate(w[0, :10].tolist()))
    assert p.shape == (2, 1)
    assert int(p[0, 0]) & 0xFFFFFFFF == expect0 and expect0 < (1 << 30)
    assert int(p[1, 0]) == 7
    # 2-bit: all 32 bits used; a word with the top value set is a negative int32
    w2 = torch.full((1, 16), 3, dtype=torch.uint8)
    assert int(pack_int_weight(w2, 2)[0, 0]) == -1
    assert torch.equal(unpack_int_weight(pack_int_weight(w2, 2), 2, 16), w2)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int_weight(torch.full((2, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_int_weight(torch.ones(2, 8), 2)
    with pytest.raises(ValueError):
        unpack_int_weight(torch.zeros(3, 2, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("bits,gs,inf", [(2, 32, 96), (3, 64, 100), (4, 128, 128), (4, -1, 77),
                                         (8, 32, 70), (2, 128, 300)])
def test_dequantize_matches_quantized_weight(bits, gs, inf):
    qw = make_qw(9, inf, bits, gs, seed=inf)
    p = pack_int_weight(qw.int_weight, bits)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        got = dequantize(p, qw.scales, qw.zeros, bits, gs, inf, dt)
        assert got.dtype == dt and got.shape == (9, inf)
        assert torch.equal(got, qw.dequantize(dt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,gs,inf,out", [(2, 32, 64, 7), (3, 64, 150, 5), (4, 128, 256, 9),
                                             (4, -1, 45, 3), (8, 32, 40, 4), (2, 64, 65, 6)])
def test_qlinear_forward_and_grads(dtype, bits, gs, inf, out):
    qw = make_qw(out, inf, bits, gs, seed=bits + inf, bias=True)
    p = pack_int_weight(qw.int_weight, bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, inf, generator=g).to(dtype).requires_grad_(True)
    wy = torch.randn(2, 3, out, generator=g)
    s = qw.scales.clone().requires_grad_(True)
    y = qlinear(x, p, s, qw.zeros, bits, gs, inf, qw.bias.to(dtype), backend="reference")
    assert y.dtype == dtype and y.shape == (2, 3, out)
    (y.float() * wy).sum().backward()

    yo, xo, so, _ = oracle(x, qw)
    (yo * wy.double()).sum().backward()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), yo.detach(), atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), xo.grad, atol=atol, rtol=rtol)
    assert s.grad.dtype == torch.float32
    # grad_s sums over tokens and a group: scale the tolerance by the group's magnitude
    torch.testing.assert_close(s.grad.double(), so.grad, atol=atol * 50, rtol=rtol)


def test_qlinear_grad_zeros_float():
    qw = make_qw(6, 70, 3, 32, seed=3)
    p = pack_int_weight(qw.int_weight, 3)
    zf = qw.zeros.float() + torch.rand(qw.zeros.shape) - 0.5  # off-integer trainable zeros
    z = zf.clone().requires_grad_(True)
    s = qw.scales.clone().requires_grad_(True)
    x = torch.randn(4, 70, requires_grad=True)
    wy = torch.randn(4, 6)
    (qlinear(x, p, s, z, 3, 32, 70, train_zeros=True) * wy).sum().backward()
    yo, xo, so, zo = oracle(x, qw, zeros_float=zf)
    (yo * wy.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), zo.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.grad.double(), so.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), xo.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        qlinear(x, p, s, qw.zeros, 3, 32, 70, train_zeros=True)


def test_qlinear_validates_shapes():
    qw = make_qw(4, 64, 4, 32)
    p = pack_int_weight(qw.int_weight, 4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        qlinear(torch.randn(2, 63), p, qw.scales, qw.zeros, 4, 32, 64)
    with pytest.raises(ValueError):
        qlinear(x, p, qw.scales[:, :1], qw.zeros, 4, 32, 64)
    with pytest.raises(ValueError):
        qlinear(x, p, qw.scales, qw.zeros, 2, 32, 64)  # packed rows do not fit 2 bits


def test_module_roundtrip_memory_and_no_saved_weight():
    out, inf = 48, 256
    qw = make_qw(out, inf, 2, 64, seed=1, bias=True)
    m = PackedQuantLinear.from_quantized_weight(qw)
    assert (m.in_features, m.out_features, m.bits, m.group_size) == (inf, out, 2, 64)
    assert [n for n, p in m.named_parameters()] == ["scales"]
    assert m.scales.dtype == torch.float32 and m.scales.requires_grad
    assert m.qweight.dtype == torch.int32 and m.qweight.numel() * 4 == out * inf * 2 // 8
    assert not m.bias.requires_grad
    back = m.to_quantized_weight()
    assert back.equal(qw) and back.scales.dtype == torch.float32
    assert torch.equal(back.bias, qw.bias)
    # memory scales with bits
    sizes = {b: PackedQuantLinear.from_quantized_weight(make_qw(out, inf, b, 64)).qweight.numel()
             for b in (2, 3, 4, 8)}
    assert sizes[2] * 2 == sizes[4] and sizes[4] * 2 == sizes[8] and sizes[2] < sizes[3] < sizes[4]

    saved = []

    def pack_hook(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(3, inf, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, out)
    assert not any(shape == (out, inf) or shape == (inf, out) for shape, _ in saved), saved
    y.float().sum().backward()
    assert m.scales.grad is not None and torch.isfinite(m.scales.grad).all()
    assert m.scales.grad.abs().sum() > 0


def test_module_train_zeros_export_rounds_and_clamps():
    qw = make_qw(4, 64, 2, 32, seed=5)
    m = PackedQuantLinear.from_quantized_weight(qw, train_zeros=True)
    assert isinstance(m.zeros, torch.nn.Parameter) and m.zeros.dtype == torch.float32
    x = torch.randn(5, 64)
    m(x).sum().backward()
    assert m.zeros.grad is not None and m.zeros.grad.abs().sum() > 0
    with torch.no_grad():
        m.zeros.copy_(torch.tensor([[-0.7, 1.4], [2.6, 9.0], [0.49, 3.2], [1.0, 2.0]]))
    back = m.to_quantized_weight()
    assert back.zeros.tolist() == [[0, 1], [3, 3], [0, 3], [1, 2]]
    assert back.zeros.dtype == torch.uint8


def test_module_scales_dtype_and_state_dict():
    qw = make_qw(5, 40, 4, 32, seed=2)
    m = PackedQuantLinear.from_quantized_weight(qw, scales_dtype=torch.float16)
    assert m.scales.dtype == torch.float16 and m.to_quantized_weight().scales.dtype == torch.float16
    m2 = PackedQuantLinear(40, 5, 4, 32)
    m2.load_state_dict(PackedQuantLinear.from_quantized_weight(qw).state_dict())
    x = torch.randn(2, 40)
    torch.testing.assert_close(m2(x), x @ qw.dequantize().t(), atol=1e-5, rtol=1e-5)


def test_act_order_rejected():
    qw = make_qw(4, 64, 4, 32)
    qw.g_idx = torch.tensor([1, 0] * 32, dtype=torch.int32)
    with pytest.raises(NotImplementedError):
        PackedQuantLinear.from_quantized_weight(qw)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("EFFQAT_KERNEL", raising=False)
    assert active_backend("cpu") == "reference"
    monkeypatch.setenv("EFFQAT_KERNEL", "cuda")
    assert active_backend("cpu") == "reference"  # cannot run on CPU: falls back
    monkeypatch.setenv("EFFQAT_KERNEL", "reference")
    assert active_backend("cuda") == "reference"
    with use_backend("auto"):
        assert active_backend("cpu") == "reference"
    monkeypatch.setenv("EFFQAT_KERNEL", "bogus")
    with pytest.raises(ValueError):
        active_backend("cpu")
    with pytest.raises(ValueError):
        with use_backend("bogus"):
            pass
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EFFQAT_KERNEL", "triton")
    assert active_backend("cpu") == ("triton" if K._triton_ok() else "reference")


def test_bench_script_cpu_setup(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.parse_args(["--shapes", "11008x4096,96x200", "--bits", "2,3", "--batches", "1,16"])
    assert a.shape_list == [("11008x4096", (11008, 4096)), ("96x200", (96, 200))]
    assert a.batch_list == [1, 16] and a.bits_list == [2, 3]
    assert mod.main(["--dry-run", "--shapes", "4096x4096", "--bits", "2,3,4"]) == 0
    out = capsys.readouterr().out
    assert "2.00 bits/weight" in out and "CUDA benchmarks skipped" in out
