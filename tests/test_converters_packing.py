"""Bit-level checks of every layout against independent, value-by-value reference decoders."""
from __future__ import annotations

import pytest
import torch

from effqat_plugin.converters import get_format, packing
from effqat_plugin.converters.format_base import WriteContext

from test_converters_helpers import (rand_qweight, ref_bitblas_codes, ref_bytes_unpack, ref_unpack_per_word,
                                     ref_unpack_stream)

SHAPES = [(64, 64), (33, 100), (172, 64), (64, 172), (96, 257)]  # (out, in) incl. ragged dims
GROUPS = [32, 64, 128]
EQAT_PW = {2: 16, 3: 10, 4: 8, 8: 4}


def _codes_T(qw):
    return qw.int_weight.t().tolist()  # [in][out]


def _ref_dequant(codes_io, zeros_go, scales_go, group):
    """[in][out] weights (W - z) * s in Python floats from [in][out] codes, [G][out] zeros / scales."""
    return [[(w - zeros_go[i // group][c]) * scales_go[i // group][c] for c, w in enumerate(row)]
            for i, row in enumerate(codes_io)]


def _ctx(fmt, bits, group):
    return WriteContext(fmt=fmt, bits=bits, group_size=group)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_roundtrip_and_reference(bits, dim):
    g = torch.Generator().manual_seed(bits * 10 + dim)
    for n, m in [(1, 3), (31, 5), (32, 7), (33, 2), (100, 9), (257, 4)]:
        shape = (n, m) if dim == 0 else (m, n)
        c = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)
        ref = c.tolist() if dim == 0 else c.tolist()
        s = packing.pack_stream(c, bits, dim)
        assert s.shape[dim] == -(-n * bits // 32)
        assert ref_unpack_stream(s, bits, n, along_rows=(dim == 0)) == ref
        assert torch.equal(packing.unpack_stream(s, bits, n, dim), c)
        pw = EQAT_PW[bits]
        w = packing.pack_words(c, bits, pw, dim)
        assert w.shape[dim] == -(-n // pw)
        assert ref_unpack_per_word(w, bits, pw, n, along_rows=(dim == 0)) == ref
        assert torch.equal(packing.unpack_words(w, bits, pw, n, dim), c)


def test_3bit_stream_straddles_words():
    # value 10 sits at bits 30..32: its top bit is bit 0 of word 1
    c = torch.zeros(32, 1, dtype=torch.uint8)
    c[10, 0] = 7
    s = packing.pack_stream(c, 3, 0)
    assert s[:, 0].tolist() == [-(1 << 31) + (1 << 30), 1, 0]
    e = packing.pack_words(c, 3, 10, 0)  # EQAT: 10 per word -> value 10 is value 0 of word 1
    assert e[:, 0].tolist() == [0, 7, 0, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", GROUPS)
def test_eqat_and_gptq_module_layouts(bits, group):
    for i, (o, n) in enumerate(SHAPES):
        if group > n:
            continue
        qw = rand_qweight(o, n, bits, group, seed=i + 100 * bits + group, bias=(i % 2 == 0))
        z_go = qw.zeros.t().tolist()
        # EQAT: per-word everywhere, 10 per word at 3 bits, true zeros
        t = get_format("eqat").write(qw, bits, _ctx("eqat", bits, group))
        pw = EQAT_PW[bits]
        assert t["qweight"].shape == (-(-n // pw), o) and t["qweight"].dtype == torch.int32
        assert ref_unpack_per_word(t["qweight"], bits, pw, n, True) == _codes_T(qw)
        assert ref_unpack_per_word(t["qzeros"], bits, pw, o, False) == z_go
        assert torch.equal(t["scales"], qw.scales.t().to(torch.float16))
        assert t["g_idx"].tolist() == [j // group for j in range(n)]
        # GPTQ v2: continuous stream (== per-word for 2/4/8), true zeros
        t2 = get_format("gptq_v2").write(qw, bits, _ctx("gptq_v2", bits, group))
        assert t2["qweight"].shape == (-(-n * bits // 32), o)
        assert ref_unpack_stream(t2["qweight"], bits, n, True) == _codes_T(qw)
        assert ref_unpack_stream(t2["qzeros"], bits, o, False) == z_go
        # GPTQ v1, plain: GPTQModel's word-wide "minus one" (per field at 3 bits)
        ctx = WriteContext(fmt="gptq", bits=bits, group_size=group, v1_encoding="plain")
        t1 = get_format("gptq").write(qw, bits, ctx)
        assert torch.equal(t1["qweight"], t2["qweight"])
        if bits == 3:
            f = ref_unpack_stream(t1["qzeros"], 3, o, False)
            assert [[(v + 1) & 7 for v in row] for row in f] == z_go
        else:
            cst = sum(1 << (bits * j) for j in range(32 // bits))
            words = [[((v & 0xFFFFFFFF) + cst) & 0xFFFFFFFF for v in row] for row in t1["qzeros"].tolist()]
            assert ref_unpack_per_word(torch.tensor(words, dtype=torch.int64), bits, 32 // bits, o, False) == z_go
            per_field = [[(v + 1) & ((1 << bits) - 1) for v in row]
                         for row in ref_unpack_per_word(t1["qzeros"], bits, 32 // bits, o, False)]
            misread = sum(a != b for ra, rb in zip(per_field, z_go) for a, b in zip(ra, rb))
            assert misread == ctx.v1_borrow_fields
        # GPTQ v1, sign-flip (default): a per-field reader (stored + 1, no mask, no carry) and a
        # word-wide reader both decode exactly the weights (W - z) * s of the source
        ctx = _ctx("gptq", bits, group)
        tf = get_format("gptq").write(qw, bits, ctx)
        assert ctx.v1_borrow_fields == 0
        ref_w = _ref_dequant(_codes_T(qw), z_go, qw.scales.t().to(torch.float16).tolist(), group)
        codes = ref_unpack_stream(tf["qweight"], bits, n, True)
        stored = ref_unpack_stream(tf["qzeros"], bits, o, False)
        sc = tf["scales"].tolist()
        assert _ref_dequant(codes, [[v + 1 for v in row] for row in stored], sc, group) == ref_w
        if bits != 3:
            words = [[((v & 0xFFFFFFFF) + cst) & 0xFFFFFFFF for v in row] for row in tf["qzeros"].tolist()]
            zw = ref_unpack_per_word(torch.tensor(words, dtype=torch.int64), bits, 32 // bits, o, False)
            assert zw == [[v + 1 for v in row] for row in stored]  # no carry between fields
        assert (sum(v < 0 for row in sc for v in row) > 0) == any(v == 0 for row in z_go for v in row)
        if qw.bias is not None:
            assert torch.equal(t["bias"], qw.bias) and torch.equal(t1["bias"], qw.bias)


def test_v1_borrow_is_counted_and_nonzero_at_2bit():
    qw = rand_qweight(64, 128, 2, 32, seed=7)
    ctx = WriteContext(fmt="gptq", bits=2, group_size=32, v1_encoding="plain")
    get_format("gptq").write(qw, 2, ctx)
    assert 0 < ctx.v1_borrow_fields < ctx.v1_total_fields == qw.zeros.numel()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", GROUPS)
def test_bitblas_layout_against_reference(bits, group):
    fmt = get_format("bitblas")
    for i, (o, n) in enumerate([(64, 128), (48, 256), (128, 384)]):
        if n % group:
            continue
        qw = rand_qweight(o, n, bits, group, seed=i + 7 * bits + group, bias=True)
        t = fmt.write(qw, bits, _ctx("bitblas", bits, group))
        assert t["qweight"].dtype == torch.int8 and t["qweight"].shape == (o, n * bits // 8)
        assert t["qzeros"].dtype == torch.int8 and t["qzeros"].shape == (n // group, o * bits // 8)
        assert set(t) == {"qweight", "qzeros", "scales", "bias"}  # no g_idx
        assert ref_bitblas_codes(t["qweight"], bits, n) == qw.int_weight.tolist()
        assert ref_bytes_unpack(t["qzeros"], bits, o) == qw.zeros.t().tolist()
        assert torch.equal(t["scales"], qw.scales.to(torch.float16))
        # independent decode -> (q - z) * s equals the ground truth
        q = torch.tensor(ref_bitblas_codes(t["qweight"], bits, n), dtype=torch.float32)
        z = torch.tensor(ref_bytes_unpack(t["qzeros"], bits, o), dtype=torch.float32).t()
        s = t["scales"].float()
        gi = torch.arange(n) // group
        assert torch.equal(((q - z[:, gi]) * s[:, gi]).half(), qw.dequantize(torch.float16))


def test_bitblas_compress_equals_gptq_bytes_before_lop3():
    # QuantCompress bytes == GPTQ qweight.T viewed as int8 (8-bit has no LOP3 step)
    qw = rand_qweight(32, 64, 8, 32, seed=3)
    bb = get_format("bitblas").write(qw, 8, _ctx("bitblas", 8, 32))["qweight"]
    gq = get_format("gptq_v2").write(qw, 8, _ctx("gptq_v2", 8, 32))["qweight"]
    assert torch.equal(bb, gq.t().contiguous().view(torch.int8))


@pytest.mark.parametrize("bits", [2, 4])
def test_lop3_positions_are_a_permutation(bits):
    pos = packing.lop3_positions(bits)
    assert sorted(pos) == list(range(0, 32, bits))
    w = torch.randint(-2**31, 2**31 - 1, (50, 7), dtype=torch.int64).to(torch.int32)
    assert torch.equal(packing.permute_fields(packing.permute_fields(w, bits, pos), bits, pos, inverse=True), w)
    # the delta swaps the writer applies are the same permutation, on int32 words and on int64 lanes
    for lanes in (w.clone(), w.clone().view(-1).view(torch.int64)):
        expect = packing.permute_fields(lanes.view(torch.int32), bits, pos)
        for shift, mask in packing.lop3_stages(bits):
            packing.delta_swap(lanes, torch.empty_like(lanes), shift, mask)
        assert torch.equal(lanes.view(torch.int32), expect)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_write_time_transforms_equal_the_eager_ones(bits):
    """The DerivedTensor functions the converters use while writing (BitBLAS transpose + field order in
    column blocks, GPTQ v1 group flips) equal the eager whole-array functions, over several blocks."""
    import numpy as np

    from effqat_plugin.converters.checkpoint import DerivedTensor

    g = torch.Generator().manual_seed(bits)
    pos = packing.lop3_positions(bits) if bits in (2, 4) else None
    fn = packing.transpose_swap(packing.lop3_stages(bits) if pos else None)
    for r, c in ((7, 3), (700, 300)):   # an odd word count (int32 lanes) and many 64-bit-lane blocks
        words = torch.randint(-2**31, 2**31 - 1, (r, c), generator=g, dtype=torch.int64).to(torch.int32)
        derived = DerivedTensor(words, (c, r * 4), torch.int8, fn).materialize()
        eager = words.t().contiguous()
        if pos is not None:
            eager = packing.permute_fields(eager, bits, pos)
        assert torch.equal(derived, eager.view(torch.int8))
    words = torch.randint(-2**31, 2**31 - 1, (700, 300), generator=g, dtype=torch.int64).to(torch.int32)

    pf = 32 // bits
    in_features, group = 700 * pf, 4 * pf
    flip = (torch.rand(in_features // group, 300, generator=g) < 0.1).numpy()
    fn = packing.group_flip_rows(flip, bits, in_features, group)
    derived = DerivedTensor(words, words.shape, torch.int32, fn).materialize()
    assert torch.equal(derived, packing.flip_group_words(words, flip, bits, in_features, group))
    assert packing.group_flip_rows(flip, bits, in_features, 3) is None  # groups not whole words: eager path
    assert not np.array_equal(derived.numpy(), words.numpy())


@pytest.mark.parametrize("staged", [True, False])
def test_write_safetensors_background_writer(tmp_path, monkeypatch, staged):
    """write_safetensors computes DerivedTensors while the previous tensor is written (one writer
    thread, two output buffers, memfd + sendfile where the OS has them, plain write() otherwise):
    the file holds every tensor in order, whatever the sizes (buffers grow), and an error in the writer
    thread reaches the caller."""
    import numpy as np
    from safetensors.torch import load_file

    from effqat_plugin.converters import checkpoint

    if not staged:
        monkeypatch.setattr(checkpoint._Scratch, "_allocate",
                            lambda self, slot, n: np.empty(n, dtype=np.uint8))
    g = torch.Generator().manual_seed(5)
    tensors, expected = {}, {}
    for i, rows in enumerate([3, 50, 7, 400, 400, 20]):   # sizes up and down: slots regrow and alternate
        w = torch.randint(-2**31, 2**31 - 1, (rows, 33), generator=g, dtype=torch.int64).to(torch.int32)
        flip = (torch.rand(rows, 33, generator=g) < 0.5).numpy()
        fn = lambda a, out, m=np.where(flip, -1, 0).astype(np.int32): np.bitwise_xor(a, m, out=out)
        tensors[f"d{i}"] = checkpoint.DerivedTensor(w, w.shape, torch.int32, fn)
        expected[f"d{i}"] = torch.from_numpy(np.bitwise_xor(w.numpy(), np.where(flip, -1, 0).astype(np.int32)))
        tensors[f"p{i}"] = expected[f"p{i}"] = torch.randn(rows, 5, generator=g).half()
    checkpoint.write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    got = load_file(tmp_path / "a.safetensors")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    def broken(*a):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "_write_all", broken)
    monkeypatch.setattr(checkpoint, "_copy_range", lambda *a: False)
    monkeypatch.setattr(checkpoint._Scratch, "append_to", lambda self, *a: broken())
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_safetensors(tmp_path / "b.safetensors", tensors, {"format": "pt"})


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_any_zero_field_matches_unpacked_codes(bits):
    """The word-level zero-field test equals unpacking every field, ragged widths included (padded
    fields are zero and must not count)."""
    g = torch.Generator().manual_seed(bits)
    maxq = (1 << bits) - 1
    for n in (32 // bits, 37, 64, 5):
        codes = torch.randint(1, maxq + 1, (6, n), generator=g).to(torch.uint8)   # no zero field
        words = packing.pack_words(codes, bits, 32 // bits, dim=1)
        assert not packing.any_zero_field(words, bits, n)
        for r, c in ((0, 0), (5, n - 1), (3, n // 2)):
            z = codes.clone()
            z[r, c] = 0
            zw = packing.pack_words(z, bits, 32 // bits, dim=1)
            assert packing.any_zero_field(zw, bits, n) == bool((packing.unpack_words(zw, bits, 32 // bits, n, dim=1) == 0).any())
            assert packing.any_zero_field(zw, bits, n)
