"""Triton kernels vs the torch reference, run on CPU under the Triton interpreter (tiny shapes).

Every kernel-written output is poisoned with NaN first (``_util.POISON``); inputs are random.
Tolerances (max abs error / max |reference|): fp32 1e-5, fp16 2e-3, bf16 1.6e-2 for y and grad_x
(the kernels round W to the activation dtype, the CPU reference keeps it in fp32); grad_s / grad_z
(fp32 accumulations of the same rounded inputs) 1e-4 for every dtype.
"""
import pytest
import torch

import effqat_plugin.kernels as K
from effqat_plugin.kernels import _util, qlinear
from effqat_plugin.kernels import reference as R
from kernel_helpers import close, rand_case

tk = pytest.importorskip("effqat_plugin.kernels.triton_kernels")
pytestmark = pytest.mark.skipif(not tk.AVAILABLE, reason="triton not importable")

REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REL_GRAD_S = 1e-4


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_util, "POISON", True)
    yield


@pytest.mark.parametrize("bits,gs,N,Kf", [(2, 32, 40, 96), (3, 64, 33, 150), (4, 128, 20, 260),
                                          (4, -1, 17, 45), (8, 32, 24, 70)])
def test_dequant_kernel(bits, gs, N, Kf):
    p, z, s, _ = rand_case(N, Kf, bits, gs, seed=bits * 7 + Kf)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        got = tk.dequantize(p, s, z, bits, gs, Kf, dt)
        ref = R.dequantize(p, s, z, bits, gs, Kf, dt)
        assert got.dtype == dt and got.shape == (N, Kf)
        close(got, ref.float(), 0 if dt == torch.float32 else REL[dt], f"dequant {dt}")
    # public entry point dispatches to triton when forced under the interpreter
    got = K.dequantize(p, s, z, bits, gs, Kf, torch.float16, backend="triton")
    close(got, R.dequantize(p, s, z, bits, gs, Kf, torch.float16), REL[torch.float16], "dispatch")


CASES = [  # (bits, group, N, K): ragged K and N, every group size, one-group, 8-bit
    (2, 32, 40, 96), (2, 64, 19, 130), (3, 64, 33, 150), (3, 32, 16, 64), (4, 128, 20, 260),
    (4, -1, 17, 45), (8, 32, 9, 40),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 20])
@pytest.mark.parametrize("bits,gs,N,Kf", CASES)
def test_kernels_match_reference(bits, gs, N, Kf, M, dtype):
    p, z, s, g = rand_case(N, Kf, bits, gs, seed=bits * 100 + Kf + M)
    x = torch.randn(M, Kf, generator=g).to(dtype)
    gy = torch.randn(M, N, generator=g).to(dtype)
    close(tk.forward(x, p, s, z, bits, gs, Kf), R.forward(x, p, s, z, bits, gs, Kf),
          REL[dtype], "forward")
    close(tk.grad_input(gy, p, s, z, bits, gs, Kf, dtype),
          R.grad_input(gy, p, s, z, bits, gs, Kf, dtype), REL[dtype], "grad_x")
    zf = z.float() + torch.rand(z.shape, generator=g) - 0.5
    for zz in (z, zf):
        a1, b1 = tk.grad_scales_zeros(x, gy, p, s, zz, bits, gs, Kf, True, True)
        a0, b0 = R.grad_scales_zeros(x, gy, p, s, zz, bits, gs, Kf, True, True)
        close(a1, a0, REL_GRAD_S, "grad_s")
        close(b1, b0, REL_GRAD_S, "grad_z")
    a1, b1 = tk.grad_scales_zeros(x, gy, p, s, z, bits, gs, Kf, True, False)
    assert b1 is None
    close(a1, a0 if zz is z else R.grad_scales_zeros(x, gy, p, s, z, bits, gs, Kf)[0],
          REL_GRAD_S, "grad_s only")


def test_fp32_activations():
    p, z, s, g = rand_case(24, 100, 3, 32, seed=11)
    for M in (1, 20):
        x = torch.randn(M, 100, generator=g)
        close(tk.forward(x, p, s, z, 3, 32, 100), R.forward(x, p, s, z, 3, 32, 100), REL[x.dtype],
              "forward fp32")


def test_large_m_uses_dequant_plus_matmul(monkeypatch):
    monkeypatch.setattr(tk, "FUSED_MAX_M", 8)
    p, z, s, g = rand_case(20, 96, 2, 32, seed=3)
    x = torch.randn(12, 96, generator=g).to(torch.float16)
    gy = torch.randn(12, 20, generator=g).to(torch.float16)
    close(tk.forward(x, p, s, z, 2, 32, 96), R.forward(x, p, s, z, 2, 32, 96), REL[x.dtype], "fwd")
    close(tk.grad_input(gy, p, s, z, 2, 32, 96, x.dtype),
          R.grad_input(gy, p, s, z, 2, 32, 96, x.dtype), REL[x.dtype], "gx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qlinear_autograd_triton_vs_reference(dtype):
    """Full autograd path through the dispatcher: grads for x, s and (float) z."""
    N, Kf, bits, gs = 24, 130, 3, 64
    p, z, s, g = rand_case(N, Kf, bits, gs, seed=5)
    zf = z.float() + 0.25
    x0 = torch.randn(2, 5, Kf, generator=g).to(dtype)
    w = torch.randn(2, 5, N, generator=g)
    bias = torch.randn(N, generator=g).to(dtype)
    res = {}
    for be in ("reference", "triton"):
        x = x0.clone().requires_grad_(True)
        ss = s.clone().requires_grad_(True)
        zz = zf.clone().requires_grad_(True)
        y = qlinear(x, p, ss, zz, bits, gs, Kf, bias, train_zeros=True, backend=be)
        assert y.dtype == dtype and y.shape == (2, 5, N)
        (y.float() * w).sum().backward()
        res[be] = (y.detach(), x.grad, ss.grad, zz.grad)
    assert K.active_backend("cpu", "triton") == "triton"
    for name, a, b, rel in zip(("y", "grad_x", "grad_s", "grad_z"), res["triton"], res["reference"],
                               (REL[dtype], REL[dtype], 2 * REL[dtype], 2 * REL[dtype])):
        close(a, b, rel, name)


def test_module_forward_backward_triton():
    from effqat_plugin.qweight import QuantizedWeight
    g = torch.Generator().manual_seed(9)
    qw = QuantizedWeight(torch.randint(0, 4, (16, 64), generator=g, dtype=torch.uint8),
                         torch.randint(0, 4, (16, 2), generator=g, dtype=torch.uint8),
                         torch.rand(16, 2, generator=g) * 0.1 + 0.01, 2, 32)
    m = K.PackedQuantLinear.from_quantized_weight(qw, backend="triton")
    x = torch.randn(4, 64, generator=g).to(torch.float16)
    y = m(x)
    y.float().sum().backward()
    ref = (x.float() @ qw.dequantize().t())
    close(y, ref, REL[torch.float16], "module y")
    gs_ref = R.grad_scales_zeros(x, torch.ones(4, 16, dtype=torch.float16), m.qweight, qw.scales,
                                 qw.zeros, 2, 32, 64)[0]
    close(m.scales.grad, gs_ref, REL_GRAD_S, "module grad_s")


_SIGS = {
    "dequant": "P:*i32 Z:*u8 S:*fp32 OUT:*{dt} N K gs stride_pk stride_zn stride_sn stride_on",
    "gemv": "X:*{dt} P:*i32 Z:*u8 S:*fp32 Y:*fp32 M N K gs k_split stride_xm stride_pk stride_zn "
            "stride_sn stride_ym",
    "gemm": "X:*{dt} P:*i32 Z:*u8 S:*fp32 Y:*{dt} M N K gs stride_xm stride_pk stride_zn stride_sn "
            "stride_ym",
    "gemm_dx": "GY:*{dt} P:*i32 Z:*fp32 S:*fp32 GX:*{dt} M N K gs stride_gm stride_pk stride_zn "
               "stride_sn stride_xm",
    "grad_sz": "X:*{dt} GY:*{dt} P:*i32 Z:*u8 S:*fp32 GS_OUT:*fp32 GZ_OUT:*fp32 M N K gs stride_xm "
               "stride_gm stride_pk stride_zn stride_sn stride_on",
}
_CONSTS = {
    "dequant": dict(BLOCK_N=32, BLOCK_K=64),
    "gemv": dict(M_PAD=4, BLOCK_N=64, BLOCK_K=32),
    "gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_ALIGNED=True, DOT_F32=False),
    "gemm_dx": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_ALIGNED=False, DOT_F32=False),
    "grad_sz": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, NEED_S=True, NEED_Z=True, DOT_F32=False),
}


@pytest.mark.skipif(__import__("os").environ.get("EFFQAT_SKIP_NVCC_TEST") == "1",
                    reason="EFFQAT_SKIP_NVCC_TEST=1")
@pytest.mark.parametrize("dt,bits", [("fp16", 2), ("bf16", 3)])
def test_triton_kernels_compile_to_cubin_sm80_sm90(monkeypatch, dt, bits):
    """Compile (no GPU needed) every kernel to sm_80 and sm_90 cubins: catches what the interpreter
    does not check (types, tl.dot operand rules, constexpr use)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ks = tk._kernels(False)
    for name, spec in _SIGS.items():
        fn = ks[name]
        sig = {}
        for item in spec.format(dt=dt).split():
            k, _, ty = item.partition(":")
            sig[k] = ty or "i32"
        consts = dict(BITS=bits, VPW=32 // bits, **_CONSTS[name])
        if "DOT_F32" in consts:
            consts["PREC"] = "tf32"
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        for arch in (80, 90):
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert len(c.asm["cubin"]) > 1000, (name, arch)
