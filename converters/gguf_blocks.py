"""GGUF block layouts that hold EfficientQAT's ``x = s * (q - z)`` exactly, and their encoders.

ggml's legacy block types run along each row (along in_features) in blocks of 32, with one fp16
step ``d`` per block (layouts as in ``gguf.quants``, whose dequantizers are the tests' oracle):

* ``Q4_0``: ``x = d * (c - 8)``,  ``c`` in [0, 15]: 2 and 3 bits (``c = q - z + 8`` is in [1, 15]).
* ``Q5_0``: ``x = d * (c - 16)``, ``c`` in [0, 31]: 4 bits (``c = q - z + 16`` is in [1, 31]).
* ``Q8_0``: ``x = d * c``, ``c`` an int8: up to 8 bits when every ``q - z`` is in [-128, 127]
  (always for <= 7 bits; for 8 bits only when zero points sit near the middle).

With ``d = s`` (the checkpoint's fp16 scale of the block's group) all three are lossless; a block
must not straddle two groups, so the group size must be a multiple of 32 (or one group per row).
Q4_1 / Q5_1 (``x = d * c + m``, ``c`` in [0, 15] / [0, 31], an fp16 ``m`` after ``d``) would round
``m = -s * z`` to fp16, so this exporter never chooses them.

:func:`pack` / :func:`unpack` are the byte layouts alone (steps, mins and stored codes) of all five
types, shared with a GGUF run's trained 32-wide grids (``gguf_kblocks``), where llama.cpp's presets
do use Q5_1 (Q5_K's width fallback).
"""
from __future__ import annotations

import numpy as np
import torch

from effqat_plugin.qweight import QuantFormatError, QuantizedWeight

BLOCK = 32
# name -> (code offset, bytes per block): the types that hold x = s * (q - z) exactly, smallest first
LOSSLESS_TYPES = {"Q4_0": (8, 18), "Q5_0": (16, 22), "Q8_0": (0, 34)}
_ORDER = ("Q4_0", "Q5_0", "Q8_0")
# the asymmetric ones (x = d * c + m): bytes per block
WITH_MIN_TYPES = {"Q4_1": 20, "Q5_1": 24}
_FIFTH_BIT_TYPES = ("Q5_0", "Q5_1")   # a uint32 of the codes' fifth bits before the nibbles


def block_bytes(qtype: str) -> int:
    return WITH_MIN_TYPES[qtype] if qtype in WITH_MIN_TYPES else LOSSLESS_TYPES[qtype][1]


def group_fits_blocks(group_size: int, in_features: int) -> bool:
    """Every 32-wide block of a row lies inside one quantization group."""
    return group_size == -1 or group_size >= in_features or group_size % BLOCK == 0


def shape_type(bits: int, in_features: int, group_size: int) -> str | None:
    """The block type a module of this shape takes, before looking at its codes: None when no
    block type holds its rows (not a multiple of 32 long, or groups that split a block). "Q8_0"
    (8 bits) still needs every ``q - z`` to fit int8 (:func:`needed_type`)."""
    if in_features % BLOCK or not group_fits_blocks(group_size, in_features):
        return None
    return "Q4_0" if bits <= 3 else "Q5_0" if bits == 4 else "Q8_0"


def needed_type(qw: QuantizedWeight) -> str | None:
    """The smallest lossless block type for ``qw``, or None (then only exact F32 holds it):
    rows that are not a multiple of 32 long, or 8-bit codes whose ``q - z`` leaves int8."""
    t = shape_type(qw.bits, qw.in_features, qw.group_size)
    if t != "Q8_0":
        return t
    lo, hi = _delta_range(qw)
    return t if lo >= -128 and hi <= 127 else None


def widest(types) -> str | None:
    """One type that holds every listed need (a row set stored as one tensor); None if any is F32."""
    types = list(types)
    if any(t is None for t in types):
        return None
    return max(types, key=_ORDER.index)


def _delta_range(qw: QuantizedWeight) -> tuple[int, int]:
    d = qw.int_weight.to(torch.int16) - qw.zeros.to(torch.int16)[:, qw.g_idx.long()]
    return int(d.min()), int(d.max())


def _block_params(qw: QuantizedWeight):
    """Per-block zero points (int16) and fp16 steps ``[out, in / 32]``; steps must be fp16 already."""
    nb = qw.in_features // BLOCK
    gidx = qw.g_idx.long()[torch.arange(nb) * BLOCK]
    s = qw.scales[:, gidx]
    s16 = s.to(torch.float16)
    if not torch.equal(s16.float(), s.float()):
        raise QuantFormatError("scales are not fp16 values; a GGUF block step is fp16, so it would round")
    return qw.zeros.to(torch.int16)[:, gidx], s16


def encode(qw: QuantizedWeight, qtype: str) -> np.ndarray:
    """Rows of ``qw`` as ``qtype`` blocks: uint8 ``[out, in / 32 * bytes_per_block]``.

    Q4_0 / Q5_0 codes are computed in uint8 as ``q + (offset - z)`` modulo 256: a true value inside
    the type's range comes out exactly, one outside it wraps to a large value, which the range check
    catches (so one pass, no int16 copy of the weight)."""
    offset, _ = LOSSLESS_TYPES[qtype]
    out, nb = qw.out_features, qw.in_features // BLOCK
    z, d = _block_params(qw)
    if qtype == "Q8_0":   # the int8 codes are q - z themselves
        delta = qw.int_weight.to(torch.int16).reshape(out, nb, BLOCK) - z[..., None]
        if int(delta.min()) < -128 or int(delta.max()) > 127:
            raise QuantFormatError("codes minus zero points leave Q8_0's range")
        c = delta.to(torch.int8).view(torch.uint8)
    else:
        shift = ((offset - z) & 0xFF).to(torch.uint8)
        c = qw.int_weight.to(torch.uint8).reshape(out, nb, BLOCK) + shift[..., None]
        if int(c.max()) > 2 * offset - 1:
            raise QuantFormatError(f"codes minus zero points leave {qtype}'s range")
    return pack(qtype, d, c)


def pack(qtype: str, d: torch.Tensor, c: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """The bytes of ``qtype`` blocks from their fp16 steps ``d`` ``[out, nb]``, fp16 mins ``m`` (Q4_1 /
    Q5_1 only, shaped like ``d``) and stored codes ``c`` (uint8 ``[out, nb, 32]``, in range; Q8_0's are
    its int8 codes viewed as uint8): uint8 ``[out, nb * bytes_per_block]``."""
    nbytes = block_bytes(qtype)
    has_min = qtype in WITH_MIN_TYPES
    for name, t in (("steps", d), ("mins", m)):   # converting here would round a field silently
        if t is not None and t.dtype != torch.float16:
            raise QuantFormatError(f"{qtype}: block {name} must be float16, got {t.dtype}")
    if has_min != (m is not None) or (m is not None and m.shape != d.shape):
        raise QuantFormatError(f"{qtype} " + ("needs one fp16 min per block, shaped like the steps" if has_min
                                              else "has no block mins"))
    out, nb = d.shape
    blocks = torch.empty((out, nb, nbytes), dtype=torch.uint8)
    blocks[..., :2] = d.contiguous().view(torch.uint8).reshape(out, nb, 2)
    at = 2
    if has_min:
        blocks[..., 2:4] = m.contiguous().view(torch.uint8).reshape(out, nb, 2)
        at = 4
    if qtype == "Q8_0":
        blocks[..., at:] = c
    else:
        hi = c[..., 16:]
        if qtype in _FIFTH_BIT_TYPES:   # a little-endian uint32 of the 32 fifth bits, then the nibbles
            fifth = (c >> 4).numpy()
            blocks[..., at:at + 4] = torch.from_numpy(np.packbits(fifth, axis=-1, bitorder="little"))
            at += 4
        blocks[..., at:] = (c[..., :16] & 0x0F) | (hi << 4)
    return blocks.reshape(out, nb * nbytes).numpy()


def unpack(raw: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`pack` undone: the fp16 steps ``[out, nb]``, stored codes (uint8 ``[out, nb, 32]``) and
    fp16 mins (Q4_1 / Q5_1; else None) of uint8 rows ``[out, nb * bytes_per_block]``."""
    nbytes = block_bytes(qtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{qtype}: expected uint8 [rows, n * {nbytes}] bytes, got {list(raw.shape)}")
    out, nb = raw.shape[0], raw.shape[1] // nbytes
    b = torch.from_numpy(raw.reshape(out, nb, nbytes).copy())
    d = b[..., :2].contiguous().view(torch.float16).reshape(out, nb)
    m, at = None, 2
    if qtype in WITH_MIN_TYPES:
        m, at = b[..., 2:4].contiguous().view(torch.float16).reshape(out, nb), 4
    if qtype == "Q8_0":
        return d, b[..., at:].contiguous(), m
    five = qtype in _FIFTH_BIT_TYPES
    qs = b[..., at + 4:] if five else b[..., at:]
    c = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    if five:
        fifth = np.unpackbits(b[..., at:at + 4].numpy(), axis=-1, bitorder="little")
        c = c | (torch.from_numpy(fifth) << 4)
    return d, c, m


def dequantized_f32(qw: QuantizedWeight) -> np.ndarray:
    """The exact weights ``(q - z) * s`` in float32 (every product of an fp16 step and a small
    integer is exact in float32): the fallback for rows no block type holds."""
    return qw.dequantize().to(torch.float32).numpy()
