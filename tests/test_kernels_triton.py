"""Triton kernels vs the torch reference, run on CPU under the Triton interpreter (tiny shapes).

Every kernel-written output is poisoned with NaN first (``_util.POISON``); inputs are random.
Tolerances (max abs error / max |reference|): fp32 1e-5, fp16 2e-3, bf16 1.6e-2 for y and grad_x
(the kernels round W to the activation dtype, the CPU reference keeps it in fp32); grad_s / grad_z
(fp32 accumulations of the same rounded inputs) 1e-4 for every dtype.
"""
import types

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


def _compile(name, dt, bits, archs=(80, 90)):
    """Compile one kernel for the given sm archs (no GPU needed); returns the cubins."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = tk._kernels(False)[name]
    sig = {}
    for item in _SIGS[name].format(dt=dt).split():
        k, _, ty = item.partition(":")
        sig[k] = ty or "i32"
    consts = dict(BITS=bits, VPW=32 // bits, **_CONSTS[name])
    if "DOT_F32" in consts:
        consts["PREC"] = "tf32"
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return [triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"] for arch in archs]


_needs_ptxas = pytest.mark.skipif(__import__("os").environ.get("EFFQAT_SKIP_NVCC_TEST") == "1",
                                  reason="EFFQAT_SKIP_NVCC_TEST=1")


@_needs_ptxas
@pytest.mark.parametrize("dt,bits", [("fp16", 2), ("bf16", 3)])
def test_triton_kernels_compile_to_cubin_sm80_sm90(monkeypatch, tmp_path, dt, bits):
    """Compile (no GPU needed) every kernel to sm_80 and sm_90 cubins: catches what the interpreter
    does not check (types, tl.dot operand rules, constexpr use). An empty cache folder makes Triton
    build every kernel from scratch, whatever ran before."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for name in _SIGS:
        for cubin in _compile(name, dt, bits):
            assert len(cubin) > 1000, name


def _language_state():
    import triton.language as tl
    import triton.language.core as core
    import triton.language.math as tmath
    import triton.language.standard as std
    spaces = (tl, core, tmath, std, core.tensor, core.dtype, core.tensor_descriptor_base)
    return [(ns, dict(vars(ns))) for ns in spaces]


def test_interpreter_launch_leaves_triton_language_unchanged():
    """The interpreter rebinds triton.language builtins while it runs (and Triton 3.8 leaves some
    rebound after device-function calls such as tl.sum); every launch must restore them all."""
    before = _language_state()
    p, z, s, g = rand_case(24, 100, 3, 32, seed=11)
    x = torch.randn(2, 100, generator=g).to(torch.float16)
    gy = torch.randn(2, 24, generator=g).to(torch.float16)
    tk.forward(x, p, s, z, 3, 32, 100)                          # gemv: tl.sum, tl.zeros
    tk.grad_scales_zeros(x, gy, p, s, z, 3, 32, 100, True, True)
    for ns, old in before:
        now = dict(vars(ns))
        changed = sorted(n for n in set(old) | set(now) if old.get(n, old) is not now.get(n, old)
                         and not isinstance(now.get(n), types.ModuleType))  # lazy submodule imports
        assert not changed, f"{ns.__name__}: {changed[:8]}"


@_needs_ptxas
def test_compile_from_empty_cache_after_interpreter_launch(monkeypatch, tmp_path):
    """The fresh-machine failure: an interpreter launch, then a from-scratch compile in the same
    process (it failed with 'ir.value' object has no attribute 'dtype' before the sandbox)."""
    p, z, s, g = rand_case(24, 100, 2, 32, seed=12)
    tk.forward(torch.randn(1, 100, generator=g).to(torch.float16), p, s, z, 2, 32, 100)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    (cubin,) = _compile("dequant", "fp16", 2, archs=(80,))
    assert len(cubin) > 1000
    assert any(tmp_path.rglob("*.cubin")), "compiled from scratch into the empty cache"
