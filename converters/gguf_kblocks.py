"""llama.cpp's K block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): the exact block bytes to and from the
fields of :class:`effqat_plugin.quantizer.KGridParams`.

:func:`encode` writes ``(d, dmin, sc, m, q)`` as the GGUF bytes of one weight matrix; :func:`decode`
reads the bytes back into the fields (used on llama.cpp's own quantizer output, the initialization of
a K-grid run). One super-block of 256 weights per block, blocks in row order along in_features. Byte
layouts as in ggml-quants.c / ``gguf.quants`` (whose ``dequantize`` is the tests' oracle):

* ``Q2_K`` (84 B): scales[16] (sc low nibble, m high nibble), qs[64] (2-bit q; byte ``32h + l`` holds
  ``q[128h + 32s + l] << 2s`` for s = 0..3), d, dmin (fp16).
* ``Q3_K`` (110 B): hmask[32] (bit b of byte l: bit 2 of ``q + 4`` at ``32b + l``), qs[64] (low 2 bits
  of ``q + 4``, as Q2_K), scales[12] (``sc + 32`` in 6 bits: low nibbles in bytes 0..7, j < 8 low half,
  j >= 8 high half; the top 2 bits of ``j`` in byte ``8 + j % 4`` at bit ``2 * (j // 4)``), d.
* ``Q4_K`` (144 B): d, dmin, scales[12] (8 6-bit sc and m, :func:`_pack_k4`), qs[128] (byte
  ``32c + l`` = ``q[64c + l] | q[64c + 32 + l] << 4``).
* ``Q5_K`` (176 B): d, dmin, scales[12] (as Q4_K), qh[32] (bit b of byte l: bit 4 of q at ``32b + l``),
  qs[128] (low 4 bits, as Q4_K).
* ``Q6_K`` (210 B): ql[128], qh[64], scales[16] (int8 sc), d. With ``L = q + 32`` and half
  ``h`` (128 weights, rows ``s`` of 32): ``ql[64h + l] = L[s0] | L[s2] << 4``, ``ql[64h + 32 + l] =
  L[s1] | L[s3] << 4`` (low nibbles), ``qh[32h + l] = sum_s (L[s] >> 4) << 2s``.

The uniform 32-wide types (Q4_0, Q5_0, Q8_0, Q4_1, Q5_1: ``quantizer.UNIFORM32_GRIDS``, sc fixed at 1,
m at 1) take the same fields and go through ``gguf_blocks``' layouts (stored code = q + 8, q + 16, q as
int8, q; the block min of Q4_1 / Q5_1 is ``-dmin``).

Fields outside their type's range are refused (:class:`QuantFormatError`), never wrapped; rows that
are not a multiple of the type's block (256 for the K types) are refused with a ValueError (they take
a fallback type).
"""
from __future__ import annotations

import numpy as np
import torch

from effqat_plugin.converters import gguf_blocks
from effqat_plugin.qweight import QuantFormatError
from effqat_plugin.quantizer import QK_K, UNIFORM32_GRIDS, KGridParams, check_kgrid_width, kgrid

# name -> bytes per super-block of 256 weights
K_TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def bits_per_weight(qtype: str) -> float:
    return K_TYPE_SIZE[qtype] * 8 / QK_K


def _np(t: torch.Tensor | None, dtype) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().astype(dtype, copy=False)


def _check_range(name: str, a: np.ndarray, lo: int, hi: int, qtype: str):
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise QuantFormatError(f"{qtype}: {name} must lie in [{lo}, {hi}], got [{int(a.min())}, {int(a.max())}]")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """``[n]`` float16 -> ``[n, 2]`` uint8 (little endian, as ggml_fp16_t)."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _f16_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float16)


# ---- sub-field packers -------------------------------------------------------------------------

def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """``[n, 256]`` values in [0, 3] -> ``[n, 64]``: byte 32h + l holds L[128h + 32s + l] << 2s."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    qs = qs.reshape(-1, 2, 1, 32)
    return ((qs >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, QK_K)


def _pack_highbit(bit: np.ndarray) -> np.ndarray:
    """``[n, 256]`` bits -> ``[n, 32]``: bit b of byte l is the bit of weight 32b + l."""
    bit = bit.reshape(-1, 8, 32).astype(np.uint8)
    out = np.zeros((bit.shape[0], 32), np.uint8)
    for b in range(8):
        out |= bit[:, b] << b
    return out


def _unpack_highbit(h: np.ndarray) -> np.ndarray:
    h = h.reshape(-1, 1, 32)
    return ((h >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)


def _pack_nibbles64(L: np.ndarray) -> np.ndarray:
    """``[n, 256]`` values in [0, 15] -> ``[n, 128]``: byte 32c + l = L[64c + l] | L[64c + 32 + l] << 4."""
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles64(qs: np.ndarray) -> np.ndarray:
    qs = qs.reshape(-1, 4, 1, 32)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, QK_K)


def _pack_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4 inverted)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _unpack_k4(s: np.ndarray):
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(s6: np.ndarray) -> np.ndarray:
    """16 6-bit values (``sc + 32``) -> 12 bytes."""
    s6 = s6.astype(np.uint8)
    out = np.zeros((s6.shape[0], 12), np.uint8)
    out[:, 0:8] = (s6[:, 0:8] & 0xF) | ((s6[:, 8:16] & 0xF) << 4)
    hi = s6 >> 4
    for j in range(16):
        out[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return out


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    lo = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    hi = np.stack([(s[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    return lo | (hi << 4)


def _pack_q6(L: np.ndarray):
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _unpack_q6(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    ql = ql.reshape(-1, 2, 2, 32)               # [n, h, (s0|s2), (s1|s3) , l]
    lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    qh = qh.reshape(-1, 2, 1, 32)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return (lo | (hi << 4)).reshape(-1, QK_K)


# ---- encode / decode ----------------------------------------------------------------------------

def encode(p: KGridParams) -> np.ndarray:
    """The GGUF bytes of ``p``: uint8 ``[out, in / block * type_size]``."""
    qtype = p.qtype
    g = kgrid(qtype)
    out, inf = p.shape
    nsb = check_kgrid_width(inf, qtype)
    n = out * nsb
    if tuple(p.d.shape) != (out, nsb) or tuple(p.sc.shape) != (out, nsb, g.n_groups):
        raise QuantFormatError(f"{qtype}: d must be [{out}, {nsb}] and sc [{out}, {nsb}, {g.n_groups}]")
    if p.d.dtype != torch.float16:
        raise QuantFormatError(f"{qtype}: d must be float16 (it is stored as fp16), got {p.d.dtype}")
    d = _np(p.d, np.float16).reshape(n)
    sc = _np(p.sc, np.int16).reshape(n, g.n_groups)
    q = _np(p.q, np.int16).reshape(n, g.block)
    _check_range("q", q, g.q_lo, g.q_hi, qtype)
    _check_range("sc", sc, g.sc_lo, g.sc_hi, qtype)
    if g.asymmetric:
        if p.dmin is None or p.m is None or tuple(p.dmin.shape) != (out, nsb) or tuple(p.m.shape) != tuple(p.sc.shape):
            raise QuantFormatError(f"{qtype}: dmin must be shaped like d and m like sc")
        if p.dmin.dtype != torch.float16:
            raise QuantFormatError(f"{qtype}: dmin must be float16, got {p.dmin.dtype}")
        dmin = _np(p.dmin, np.float16).reshape(n)
        m = _np(p.m, np.int16).reshape(n, g.n_groups)
        _check_range("m", m, g.m_lo, g.m_hi, qtype)
    if qtype in UNIFORM32_GRIDS:   # stored code q - q_lo (Q8_0: q itself, as int8); Q4_1 / Q5_1's m = -dmin
        c = torch.from_numpy(q.astype(np.int8) if qtype == "Q8_0" else (q - g.q_lo).astype(np.uint8)).view(torch.uint8)
        mins = None if not g.asymmetric else -p.dmin.reshape(out, nsb)
        return gguf_blocks.pack(qtype, p.d.reshape(out, nsb), c.reshape(out, nsb, g.block), mins)

    if qtype == "Q2_K":
        parts = [(sc | (m << 4)).astype(np.uint8), _pack_2bit(q), _f16_bytes(d), _f16_bytes(dmin)]
    elif qtype == "Q3_K":
        L = q + 4
        parts = [_pack_highbit(L >> 2), _pack_2bit(L & 3), _pack_q3_scales(sc + 32), _f16_bytes(d)]
    elif qtype == "Q4_K":
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k4(sc, m), _pack_nibbles64(q)]
    elif qtype == "Q5_K":
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k4(sc, m), _pack_highbit(q >> 4), _pack_nibbles64(q & 0xF)]
    else:  # Q6_K
        ql, qh = _pack_q6(q + 32)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == K_TYPE_SIZE[qtype]
    return blocks.reshape(out, nsb * K_TYPE_SIZE[qtype])


def decode(raw: np.ndarray, qtype: str) -> KGridParams:
    """The fields of GGUF bytes ``raw`` (uint8 ``[out, in / block * type_size]``)."""
    g = kgrid(qtype)
    if qtype in UNIFORM32_GRIDS:
        d, c, mins = gguf_blocks.unpack(raw, qtype)
        q = c.view(torch.int8) if qtype == "Q8_0" else (c.to(torch.int16) + g.q_lo).to(torch.int8)
        out, nb = d.shape
        ones = torch.ones((out, nb, 1), dtype=torch.int8)
        kw = {} if mins is None else dict(dmin=-mins, m=ones.clone())
        return KGridParams(qtype, d, ones, q.reshape(out, nb * g.block), **kw)
    size = K_TYPE_SIZE[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{qtype}: expected uint8 [rows, n * {size}] bytes, got {list(raw.shape)}")
    out, nsb = raw.shape[0], raw.shape[1] // size
    b = raw.reshape(out * nsb, size)
    dmin = m = None
    if qtype == "Q2_K":
        s, qs, d, dmin = b[:, :16], b[:, 16:80], b[:, 80:82], b[:, 82:84]
        sc, m, q = s & 0xF, s >> 4, _unpack_2bit(qs)
    elif qtype == "Q3_K":
        hm, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], b[:, 108:110]
        q = (_unpack_2bit(qs) | (_unpack_highbit(hm) << 2)).astype(np.int16) - 4
        sc = _unpack_q3_scales(s).astype(np.int16) - 32
    elif qtype == "Q4_K":
        d, dmin, s, qs = b[:, :2], b[:, 2:4], b[:, 4:16], b[:, 16:144]
        (sc, m), q = _unpack_k4(s), _unpack_nibbles64(qs)
    elif qtype == "Q5_K":
        d, dmin, s, qh, qs = b[:, :2], b[:, 2:4], b[:, 4:16], b[:, 16:48], b[:, 48:176]
        (sc, m), q = _unpack_k4(s), _unpack_nibbles64(qs) | (_unpack_highbit(qh) << 4)
    else:  # Q6_K
        ql, qh, s, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        q = _unpack_q6(ql, qh).astype(np.int16) - 32
        sc = np.ascontiguousarray(s).view(np.int8)

    def t8(a, shape):
        return torch.from_numpy(np.ascontiguousarray(a).astype(np.int8)).reshape(shape)

    def t16(a):
        return torch.from_numpy(_f16_from(a)).reshape(out, nsb)

    kw = {}
    if g.asymmetric:
        kw = dict(dmin=t16(dmin), m=t8(m, (out, nsb, g.n_groups)))
    return KGridParams(qtype, t16(d), t8(sc, (out, nsb, g.n_groups)), t8(q, (out, nsb * QK_K)), **kw)
