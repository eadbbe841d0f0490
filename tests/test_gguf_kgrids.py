"""llama.cpp's K grids (Q2_K .. Q6_K), and the uniform 32-wide grids (Q4_0, Q5_0, Q8_0, Q4_1, Q5_1)
whose steps (and Q4_1 / Q5_1's block mins) a GGUF run's E2E-QP trains, bit for bit against independent
references.

* ``gguf.quants.dequantize`` (llama.cpp's Python reference decoder) and ggml's C
  ``dequantize_row_q*_K`` on our encoded bytes equal our frozen form and our fake-quant forward,
  compared as float32 bit patterns (signed zeros included).
* llama.cpp's own quantizer (``ggml_quantize_chunk`` from llama-cpp-python's libggml-base, with and
  without an importance matrix): its bytes decode and re-encode to the same bytes, and a fake-quant
  forward initialized from them equals gguf's decoding of them (an untrained run is llama.cpp's).
* Gradients of the straight-through (Block-AP) and frozen (E2E-QP) forms; ragged rows refused.

Everything is CPU-only and offline; the llama.cpp tests skip without llama-cpp-python.
"""
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from effqat_plugin import llama_cpp_quants
from effqat_plugin.converters import gguf_kblocks
from effqat_plugin.qweight import QuantFormatError
from effqat_plugin.quantizer import (KGRIDS, QK_K, UNIFORM32_GRIDS, KGridFakeQuantLinear, KGridFrozenWeight,
                                     KGridParams, check_kgrid_width, kgrid, kgrid_dequantize, kgrid_fake_quantize,
                                     kgrid_freeze)

gguf = pytest.importorskip("gguf")

TYPES = list(KGRIDS)
UNIFORM32 = list(UNIFORM32_GRIDS)
STORIES260K = pathlib.Path(__file__).resolve().parents[1] / "effqat_plugin" / "assets" / "stories260k"
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_quants.available(),
                                     reason="llama-cpp-python (its bundled libggml-base) is not installed")


def gguf_decode(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))


def live_weights(p: KGridParams) -> np.ndarray:
    """Weights whose sub-block step d * sc is not 0 (where it is, every q decodes to the same value)."""
    live = (p.d.float()[..., None] * p.sc.float() != 0).repeat_interleave(KGRIDS[p.qtype].group, -1)
    return live.reshape(p.q.shape).numpy()


def assert_equal_up_to_dead_zero_signs(ours, ref, p: KGridParams):
    """Bit for bit, except the sign of zeros in dead sub-blocks (d * sc == 0): there ggml keeps its
    search's q (whose sign the decoded zero carries), a recomputed q is 0."""
    ours = ours.detach().numpy()
    assert np.array_equal(ours, ref)                      # values (+0 == -0)
    live = live_weights(p)
    assert_bits_equal(ours[live], ref[live])


def assert_bits_equal(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} differ, e.g. {a[diff][:4]} vs {b[diff][:4]}"


def rand_fp16(gen: torch.Generator, shape) -> torch.Tensor:
    """fp16 values over the whole finite range: every exponent (subnormals too), both signs, zeros."""
    bits = torch.randint(0, 1 << 16, shape, generator=gen, dtype=torch.int32)
    bits = torch.where(((bits >> 10) & 0x1F) == 0x1F, bits & ~(1 << 14), bits)   # no inf / nan
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)                  # as int16
    x = bits.to(torch.int16).view(torch.float16).clone()
    flat = x.view(-1)
    k = min(4, flat.numel())
    flat[:k] = torch.tensor([0.0, -0.0, 65504.0, -65504.0], dtype=torch.float16)[:k]
    return x


def rand_params(qtype: str, out: int, in_features: int, seed: int) -> KGridParams:
    """Random fields over their full ranges, with every extreme present."""
    g = kgrid(qtype)
    gen = torch.Generator().manual_seed(seed)
    nsb = in_features // g.block

    def ints(lo, hi, shape):
        t = torch.randint(lo, hi + 1, shape, generator=gen)
        flat = t.view(-1)
        flat[0], flat[1] = lo, hi
        return t.to(torch.int8)

    kw = {}
    if g.asymmetric:
        kw = dict(dmin=rand_fp16(gen, (out, nsb)), m=ints(g.m_lo, g.m_hi, (out, nsb, g.n_groups)))
    return KGridParams(qtype, rand_fp16(gen, (out, nsb)), ints(g.sc_lo, g.sc_hi, (out, nsb, g.n_groups)),
                       ints(g.q_lo, g.q_hi, (out, in_features)), **kw)


def fields(p: KGridParams):
    return p.d.float(), p.sc.float(), p.qtype, None if p.dmin is None else p.dmin.float(), \
        None if p.m is None else p.m.float()


def assert_same_params(a: KGridParams, b: KGridParams):
    assert a.qtype == b.qtype
    for name in ("d", "dmin"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype == torch.float16 and torch.equal(x.view(torch.int16), y.view(torch.int16))
    for name in ("sc", "m", "q"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype == torch.int8 and torch.equal(x, y)


def realish_weights(seed: int) -> torch.Tensor:
    """[40, 512]: gaussian, heavy-tailed, all-positive, all-negative, zero, constant, tiny and
    outlier rows (the shapes of blocks llama.cpp's search must handle)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 512, generator=gen) * 0.02
    t = torch.distributions.StudentT(3.0).sample((8, 512)) * 0.01
    w[8:16] = t
    w[16] = w[16].abs()
    w[17] = -w[17].abs()
    w[18] = 0
    w[19] = 0.0125
    w[20] *= 1e-3
    w[21, 7] = 0.9
    w[22, :256] = 0                      # one zero super-block next to a normal one
    return w


def real_model_weights() -> torch.Tensor:
    """Trained weights of the bundled 260K Llama (its widths are not multiples of 256, so its
    values are laid out as rows of 512)."""
    from safetensors.torch import load_file

    sd = load_file(str(STORIES260K / "model.safetensors"))
    flat = torch.cat([sd["model.embed_tokens.weight"].flatten(), sd["model.layers.0.mlp.down_proj.weight"].flatten(),
                      sd["model.layers.1.self_attn.v_proj.weight"].flatten()]).float()
    n = flat.numel() // 512 * 512
    return flat[:n].reshape(-1, 512)


def importance(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    imp = torch.rand(n, generator=gen) ** 4 * 10     # skewed, like llama-imatrix's column energies
    imp[:3] = 0
    return imp


# --- encoders against gguf's decoder -------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES + UNIFORM32)
def test_encoded_fields_decode_in_gguf_to_the_frozen_form(qtype):
    p = rand_params(qtype, 24, 768, seed=(TYPES + UNIFORM32).index(qtype))
    raw = gguf_kblocks.encode(p)
    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    assert raw.dtype == np.uint8 and raw.shape == (24, 768 // block * size)
    assert block == kgrid(qtype).block and gguf_kblocks.K_TYPE_SIZE.get(qtype, size) == size
    ref = gguf_decode(raw, qtype)
    assert_bits_equal(p.dequantize(), ref)
    assert_bits_equal(KGridFrozenWeight(p)(), ref)
    assert_same_params(gguf_kblocks.decode(raw, qtype), p)


@pytest.mark.parametrize("qtype", TYPES)
def test_a_trained_state_freezes_to_bytes_that_decode_to_its_forward(qtype):
    """Block-AP's state (fp32 d / dmin that are not fp16 values, non-integer and out-of-range sc / m,
    dead sub-blocks where d * sc == 0): the fake-quant forward IS what gguf decodes from the bytes."""
    g = KGRIDS[qtype]
    gen = torch.Generator().manual_seed(100 + TYPES.index(qtype))
    out, inf = 16, 512
    nsb = inf // QK_K
    w = torch.randn(out, inf, generator=gen) * 0.05
    d = (torch.rand(out, nsb, generator=gen) * 0.01 + 1e-4) * (1 + 1e-3 * torch.rand(out, nsb, generator=gen))
    d[0, 0] = -d[0, 0]                     # a negative super-block scale (ggml's Q3_K / Q6_K write them)
    d[1, 0] = 0                            # a dead super-block
    sc = torch.rand(out, nsb, g.n_groups, generator=gen) * (g.sc_hi - g.sc_lo + 6) + g.sc_lo - 3
    sc[2, 0, 0] = 0.2                      # a dead sub-block
    dmin = m = None
    if g.asymmetric:
        dmin = torch.rand(out, nsb, generator=gen) * 0.01
        dmin[3, 0] = -0.004
        m = torch.rand(out, nsb, g.n_groups, generator=gen) * (g.m_hi + 6) - 3
    x = kgrid_fake_quantize(w, d, sc, qtype, dmin, m)
    frozen = kgrid_freeze(w, d, sc, qtype, dmin, m)
    raw = gguf_kblocks.encode(frozen)
    assert_bits_equal(x, gguf_decode(raw, qtype))
    assert_bits_equal(x, frozen.dequantize())
    assert int(frozen.q.min()) == g.q_lo and int(frozen.q.max()) == g.q_hi     # the clamps were hit


@pytest.mark.parametrize("qtype", TYPES + UNIFORM32)
def test_e2e_trained_scales_stay_exact(qtype):
    """After an optimizer step on d / dmin (fp32 masters), the stored fp16 scales decode to the forward."""
    p = rand_params(qtype, 8, 256, seed=7)
    gen = torch.Generator().manual_seed(8)
    p.d = (torch.rand(p.d.shape, generator=gen) * 0.01).half()
    if p.dmin is not None:
        p.dmin = (torch.rand(p.dmin.shape, generator=gen) * 0.01).half()
    fw = KGridFrozenWeight(p)
    (fw() ** 2).sum().backward()
    with torch.no_grad():     # one signed step of ~3 fp16 ulps, which leaves fp32 masters off fp16 values
        for t in (fw.d, fw.dmin):
            if t is not None:
                t -= t.grad.sign() * t.abs() * 1.37e-3
    assert not torch.equal(fw.d.detach().half(), p.d) and not torch.equal(fw.d.detach().half().float(), fw.d.detach())
    assert_bits_equal(fw(), gguf_decode(gguf_kblocks.encode(fw.to_params()), qtype))


def test_out_of_range_or_non_fp16_fields_are_refused():
    p = rand_params("Q4_K", 2, 256, seed=1)
    bad = KGridParams("Q4_K", p.d, p.sc, p.q.clone(), p.dmin, p.m)
    bad.q[0, 0] = 16
    with pytest.raises(QuantFormatError, match=r"q must lie in \[0, 15\]"):
        gguf_kblocks.encode(bad)
    with pytest.raises(QuantFormatError, match="float16"):
        gguf_kblocks.encode(KGridParams("Q4_K", p.d.float(), p.sc, p.q, p.dmin, p.m))
    p3 = rand_params("Q3_K", 2, 256, seed=2)
    p3.sc[0, 0, 0] = 32
    with pytest.raises(QuantFormatError, match="sc"):
        gguf_kblocks.encode(p3)
    with pytest.raises(ValueError, match="asymmetric"):
        kgrid_dequantize(p.q, p.sc, p.d, "Q4_K")


@needs_llama_cpp
@pytest.mark.parametrize("qtype", TYPES)
def test_ggml_c_dequantizer_agrees_bit_for_bit(qtype):
    """ggml's own C decoder (dequantize_row_q*_K, as llama.cpp's CPU backend widens blocks) on our
    bytes: the same floats as gguf's Python reference and our frozen form."""
    p = rand_params(qtype, 12, 512, seed=40 + TYPES.index(qtype))
    raw = gguf_kblocks.encode(p)
    c = llama_cpp_quants.dequantize(raw, qtype)
    assert_bits_equal(c, gguf_decode(raw, qtype))
    assert_bits_equal(p.dequantize(), c)
    raw = llama_cpp_quants.quantize_chunk(realish_weights(2), qtype, importance(512, 3))
    assert_bits_equal(llama_cpp_quants.dequantize(raw, qtype), gguf_decode(raw, qtype))


# --- llama.cpp's quantizer ------------------------------------------------------------------------

@needs_llama_cpp
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES + UNIFORM32)
def test_llama_cpp_bytes_decode_and_reencode_to_the_same_bytes(qtype, with_imatrix):
    """For the uniform 32-wide types this is what E2E-QP starts from: Block-AP's rows (llama.cpp's
    quantization of the trained weights) decoded into q and d; untouched, they write the same bytes."""
    for w in (torch.randn(6, 768, generator=torch.Generator().manual_seed(4)) * 0.02, realish_weights(3),
              real_model_weights()):
        imp = importance(w.shape[1], 5) if with_imatrix else None
        raw = llama_cpp_quants.quantize_chunk(w, qtype, imp)
        assert np.array_equal(gguf_kblocks.encode(gguf_kblocks.decode(raw, qtype)), raw)


@needs_llama_cpp
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_untrained_equals_llama_cpp_quantizer(qtype, with_imatrix):
    """Started from llama.cpp's fit, the fake-quant forward (which recomputes every q from W, as ggml's
    quantizers do after fitting the scales) is exactly what gguf decodes from llama.cpp's bytes (up
    to the sign of zeros in sub-blocks whose step d * sc is 0), and so are the bytes we write back
    from the untrained state; the frozen form of the decoded fields is exact to the bit."""
    for w, has_dead in ((realish_weights(11), True), (real_model_weights(), False)):
        imp = importance(w.shape[1], 13) if with_imatrix else None
        raw = llama_cpp_quants.quantize_chunk(w, qtype, imp)
        ref = gguf_decode(raw, qtype)
        fit = llama_cpp_quants.llama_cpp_fit(w, qtype, imp)
        assert_equal_up_to_dead_zero_signs(kgrid_fake_quantize(w, *fields(fit)), ref, fit)
        assert_bits_equal(fit.dequantize(), ref)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        fq = KGridFakeQuantLinear(lin, fit)
        assert_equal_up_to_dead_zero_signs(fq.quantized_weight(), ref, fit)
        frozen = fq.freeze()
        assert_equal_up_to_dead_zero_signs(torch.from_numpy(gguf_decode(gguf_kblocks.encode(frozen), qtype)), ref, fit)
        live = torch.from_numpy(live_weights(fit))
        assert bool(live.any()) and bool(live.all()) != has_dead  # the zero rows make dead sub-blocks
        assert torch.equal(frozen.q[live], fit.q[live])   # llama.cpp's q wherever q matters
        # the fit is a fit: well inside the grid's error for these weights
        err = float(np.abs(ref - w.numpy()).mean())
        assert err < float(w.abs().mean())


@needs_llama_cpp
def test_quantize_chunk_checks_its_inputs():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="importance matrix has 255"):
        llama_cpp_quants.quantize_chunk(w, "Q4_K", torch.ones(255))
    with pytest.raises(ValueError, match="unknown block type"):
        llama_cpp_quants.quantize_chunk(w, "Q3_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        llama_cpp_quants.quantize_chunk(w[:, :224], "Q4_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        llama_cpp_quants.quantize_chunk(w[:, :48], "IQ4_NL")
    assert llama_cpp_quants.quantize_chunk(w[:0], "Q6_K").shape == (0, 210)


@pytest.mark.parametrize("qtype", sorted(llama_cpp_quants.BLOCK32_TYPES))
def test_fallback_types_quantize_as_gguf_decodes_them(qtype):
    """The 32-wide types: llama.cpp's bytes, sized as gguf says, decode (gguf.quants) close to the input."""
    w = torch.randn(3, 96, generator=torch.Generator().manual_seed(7))
    raw = llama_cpp_quants.quantize_chunk(w, qtype)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    assert raw.shape == (3, 96 // block * size)
    back = gguf.quants.dequantize(raw, t)
    assert back.shape == (3, 96)
    assert np.abs(back - w.numpy()).max() < 0.35 * np.abs(w.numpy()).max()


# --- gradients -------------------------------------------------------------------------------------

def hand_init(qtype: str, w: torch.Tensor, spread: float):
    """A plain init (no llama.cpp): steps that cover about +-spread, so some weights clamp; sc and
    m off their integers so their rounding is exercised."""
    g = KGRIDS[qtype]
    out, nsb = w.shape[0], w.shape[1] // QK_K
    gen = torch.Generator().manual_seed(1)
    sc_mid = max(1, g.sc_hi // 2)
    d = torch.full((out, nsb), 2 * spread / (g.q_hi - g.q_lo) / sc_mid)
    sc = sc_mid + torch.rand(out, nsb, g.n_groups, generator=gen) * 0.8 - 0.4
    if not g.asymmetric:
        return d, sc, None, None
    m_mid = g.m_hi // 2
    m = m_mid + torch.rand(out, nsb, g.n_groups, generator=gen) * 0.8 - 0.4
    return d, sc, torch.full((out, nsb), spread / m_mid), m


@pytest.mark.parametrize("qtype", TYPES)
def test_straight_through_gradients_reach_every_trainable_field(qtype):
    g = KGRIDS[qtype]
    w0 = torch.randn(8, 512, generator=torch.Generator().manual_seed(21)) * 0.02
    d, sc, dmin, m = hand_init(qtype, w0, 0.03)
    leaves = dict(W=w0.clone(), d=d, sc=sc) | (dict(dmin=dmin, m=m) if g.asymmetric else {})
    for t in leaves.values():
        t.requires_grad_(True)

    def forward():
        return kgrid_fake_quantize(leaves["W"], leaves["d"], leaves["sc"], qtype, leaves.get("dmin"), leaves.get("m"))

    x = forward()
    (x * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, t in leaves.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert float(t.grad.abs().sum()) > 0, name
    # dx/dW is 1 inside the grid and 0 where q is clamped (EfficientQAT's appendix C rule)
    for t in leaves.values():
        t.grad = None
    forward().sum().backward()
    gw = leaves["W"].grad
    assert bool(((gw == 0) | (gw == 1)).all()) and bool((gw == 0).any()) and bool((gw == 1).any())
    # "inside" is the closed range: a weight whose code is exactly q_lo or q_hi trains too
    with torch.no_grad():
        sci = leaves["sc"].round().clamp(g.sc_lo, g.sc_hi)
        step = (leaves["d"].half().float()[..., None] * sci)[..., None]
        wg = leaves["W"].reshape(8, 2, g.n_groups, g.group)
        if g.asymmetric:
            wg = wg + (leaves["dmin"].half().float()[..., None] * leaves["m"].round().clamp(0, g.m_hi))[..., None]
        r = (wg / torch.where(step == 0, torch.ones_like(step), step)).round()
        inside = (r >= g.q_lo) & (r <= g.q_hi) & (step != 0)
        on_bounds = ((r == g.q_lo) | (r == g.q_hi)) & (step != 0)
    assert bool(on_bounds.any())
    assert torch.equal(gw.reshape(inside.shape), inside.float())


@pytest.mark.parametrize("qtype", TYPES + UNIFORM32)
def test_frozen_form_holds_packed_codes(qtype):
    """E2E-QP keeps q at the fewest bits that hold the grid (2 for Q2_K, 3 for Q3_K, 4 for the 16-level
    grids, 8 beyond), and gives back exactly the codes it was made from, clamps included."""
    g = kgrid(qtype)
    p = rand_params(qtype, 6, 512, seed=11)
    p.q[0, :2] = torch.tensor([g.q_lo, g.q_hi], dtype=p.q.dtype)
    fw = KGridFrozenWeight(p)
    want = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q4_0": 4, "Q4_1": 4}.get(qtype, 8)
    assert fw.code_bits == want and fw.q_packed.dtype == torch.int32
    assert fw.q_packed.numel() == 6 * -(-512 // (32 // want))   # 32 // bits codes per int32 word
    assert torch.equal(fw.codes(), p.q.to(torch.int8)) and torch.equal(fw.to_params().q, p.q.to(torch.int8))


@pytest.mark.parametrize("qtype", TYPES + UNIFORM32)
def test_frozen_form_trains_only_d_and_dmin(qtype):
    g = kgrid(qtype)
    nsb = 512 // g.block
    p = rand_params(qtype, 4, 512, seed=9)
    gen = torch.Generator().manual_seed(10)
    p.d = (torch.rand(p.d.shape, generator=gen) * 0.01).half()
    fw = KGridFrozenWeight(p)
    names = {n for n, _ in fw.named_parameters()}
    assert names == ({"d", "dmin"} if g.asymmetric else {"d"})
    assert all(not b.is_floating_point() for b in fw.buffers())
    up = torch.randn(4, 512, generator=gen)
    (fw() * up).sum().backward()
    # analytic (float64): dx/dd = sc * q, dx/ddmin = -m (per weight), summed over each super-block
    upg = up.double().reshape(4, nsb, g.n_groups, g.group)
    terms = p.sc.double()[..., None] * p.q.double().reshape(4, nsb, g.n_groups, g.group) * upg
    tol = 1e-5 * terms.abs().sum((-1, -2))           # fp32 summation error, not cancellation
    assert bool(((fw.d.grad.double() - terms.sum((-1, -2))).abs() <= tol).all())
    if g.asymmetric:
        terms = -(p.m.double()[..., None] * upg)
        tol = 1e-5 * terms.abs().sum((-1, -2))
        assert bool(((fw.dmin.grad.double() - terms.sum((-1, -2))).abs() <= tol).all())
    # the functional form with leaf tensors: no gradient can reach the integers
    d = p.d.float().requires_grad_(True)
    x = kgrid_dequantize(p.q, p.sc, d, qtype, p.m, None if p.dmin is None else p.dmin.float())
    x.sum().backward()
    assert d.grad is not None and not p.q.requires_grad and not p.sc.requires_grad


# --- widths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("in_features", [320, 128, 0])
def test_rows_that_are_not_a_multiple_of_256_are_refused(qtype, in_features):
    g = KGRIDS[qtype]
    w = torch.randn(4, in_features, generator=torch.Generator().manual_seed(6))
    nsb = max(in_features // QK_K, 1)
    d, sc = torch.ones(4, nsb), torch.ones(4, nsb, g.n_groups)
    dm, m = (torch.ones(4, nsb), torch.ones(4, nsb, g.n_groups)) if g.asymmetric else (None, None)
    msg = f"multiple of {QK_K}"
    with pytest.raises(ValueError, match=msg):
        check_kgrid_width(in_features, qtype)
    with pytest.raises(ValueError, match=msg):
        kgrid_fake_quantize(w, d, sc, qtype, dm, m)
    with pytest.raises(ValueError, match=msg):
        kgrid_dequantize(w.to(torch.int8), sc.to(torch.int8), d, qtype, None if m is None else m.to(torch.int8), dm)
    with pytest.raises(ValueError, match=msg):
        gguf_kblocks.encode(KGridParams(qtype, d.half(), sc.to(torch.int8), w.to(torch.int8),
                                        None if dm is None else dm.half(), None if m is None else m.to(torch.int8)))
    if llama_cpp_quants.available():
        with pytest.raises(ValueError, match=msg):   # refused before ggml could abort the process
            llama_cpp_quants.quantize_chunk(w, qtype)
