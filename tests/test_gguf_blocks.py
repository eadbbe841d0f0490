"""GGUF block encoders against ``gguf.quants.dequantize`` (llama.cpp's reference decoder), bit for bit.

Every code, zero point and fp16 step goes in; the decoded rows must equal ``(q - z) * s`` in float32
exactly, at every bit width, group size (multiples of 32 and per-channel) and zero-point extreme.
"""
import numpy as np
import pytest

from effqat_plugin.converters import gguf_blocks
from effqat_plugin.qweight import QuantFormatError, QuantizedWeight

from test_converters_helpers import rand_qweight

gguf = pytest.importorskip("gguf")


def decode(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))


@pytest.mark.parametrize("bits,qtype", [(2, "Q4_0"), (3, "Q4_0"), (4, "Q5_0")])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_lossless_types_decode_to_the_exact_weights(bits, qtype, group):
    qw = rand_qweight(48, 256, bits, group, seed=bits * 10 + max(group, 0))
    assert gguf_blocks.needed_type(qw) == qtype
    raw = gguf_blocks.encode(qw, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (48, 256 // 32 * gguf_blocks.LOSSLESS_TYPES[qtype][1])
    got = decode(raw, qtype)
    assert np.array_equal(got, qw.dequantize().numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_q8_0_holds_every_width_when_codes_minus_zeros_fit_int8(bits):
    qw = rand_qweight(16, 128, bits, 64, seed=3)
    if bits == 8:  # trained 8-bit zero points sit mid-range; random ones would leave int8
        qw.zeros.fill_(128)
        qw.zeros[0, 0] = 127
        qw.int_weight[0, :64] = 0      # q - z = -127 .. 127 (and -128 below)
        qw.int_weight[1, :64] = 0
        qw.zeros[1, 0] = 128
    if bits == 8:
        assert gguf_blocks.needed_type(qw) == "Q8_0"
        d = qw.int_weight.int() - qw.zeros.int()[:, qw.g_idx.long()]
        assert int(d.min()) == -128 and int(d.max()) == 127   # both int8 extremes occur
    got = decode(gguf_blocks.encode(qw, "Q8_0"), "Q8_0")
    assert np.array_equal(got, qw.dequantize().numpy())


def test_wider_types_hold_narrower_codes():
    """One GGUF tensor may join modules of different widths: the widest type holds all of them."""
    qw = rand_qweight(8, 64, 2, 32, seed=5)
    for t in ("Q4_0", "Q5_0", "Q8_0"):
        assert np.array_equal(decode(gguf_blocks.encode(qw, t), t), qw.dequantize().numpy())
    assert gguf_blocks.widest(["Q4_0", "Q5_0"]) == "Q5_0"
    assert gguf_blocks.widest(["Q4_0", None]) is None


def test_what_no_block_type_holds():
    ragged = rand_qweight(8, 172, 2, 64, seed=1)       # rows not a multiple of 32
    assert gguf_blocks.needed_type(ragged) is None
    assert np.array_equal(gguf_blocks.dequantized_f32(ragged), ragged.dequantize().numpy())
    wide = rand_qweight(8, 64, 8, 32, seed=2)          # 8-bit, some q - z beyond int8
    wide.zeros.fill_(0)
    wide.int_weight[0, 0] = 255
    assert gguf_blocks.needed_type(wide) is None
    with pytest.raises(QuantFormatError, match="range"):
        gguf_blocks.encode(wide, "Q8_0")
    assert not gguf_blocks.group_fits_blocks(16, 64) and gguf_blocks.group_fits_blocks(16, 16)


def test_scales_must_already_be_fp16():
    qw = rand_qweight(4, 64, 4, 32, seed=4)
    qw32 = QuantizedWeight(qw.int_weight, qw.zeros, qw.scales.float() * (1 + 2 ** -20), 4, 32)
    with pytest.raises(QuantFormatError, match="fp16"):
        gguf_blocks.encode(qw32, "Q5_0")


def test_block_mins_only_where_the_type_has_them():
    """Q4_1 / Q5_1 carry an fp16 min per block after d; the symmetric types have none. pack refuses a
    missing, extra, misshaped or non-fp16 min instead of writing blocks that decode to other values."""
    import torch

    d = torch.full((2, 3), 0.5, dtype=torch.float16)
    c = torch.zeros((2, 3, 32), dtype=torch.uint8)
    m = torch.full((2, 3), -1.0, dtype=torch.float16)
    for args, msg in [(("Q4_1", d, c), "needs one fp16 min"), (("Q4_0", d, c, m), "has no block mins"),
                      (("Q5_1", d, c, m[:, :2]), "shaped like the steps"), (("Q5_1", d, c, m.float()), "float16")]:
        with pytest.raises(QuantFormatError, match=msg):
            gguf_blocks.pack(*args)
    raw = gguf_blocks.pack("Q5_1", d, c + 31, m)
    assert raw.shape == (2, 3 * gguf_blocks.block_bytes("Q5_1")) and np.all(decode(raw, "Q5_1") == 0.5 * 31 - 1)
