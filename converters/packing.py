"""Vectorized bit packing shared by every on-disk format.

All functions work on torch tensors (CPU, multi-threaded element-wise ops) and loop only over the
handful of fields inside one 32-bit word, never over values. Codes are ``uint8`` in
``[0, 2**bits - 1]``; packed words are ``int32`` (the dtype every format stores), handled with
wrap-around arithmetic so the sign bit is just bit 31.

Layouts:
* **per-word** (``pack_words``): ``per_word`` values per int32, value ``j`` of a word at bit
  ``bits*j`` (LSB first), words never straddle. GPTQ 2/4/8-bit (``per_word = 32 // bits``) and the
  original EQAT format for every width (3-bit: 10 values per word, top 2 bits unused).
* **stream** (``pack_stream``): one continuous little-endian bit stream, value ``i`` at bit
  ``bits*i``; used for GPTQ 3-bit (32 values in 3 words; values 10 and 21 straddle two words).
  For 2/4/8-bit the stream and the per-word layout are the same bytes.
Packing runs along a chosen axis (``dim=0``: along rows, as GPTQ ``qweight`` packs ``in``;
``dim=1``: along columns, as ``qzeros`` packs ``out``). Ragged lengths are padded with zero codes.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

EQAT_PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32)


def _move(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Put the packing axis first (dim=0 unchanged, dim=1 transposed), contiguous."""
    return (x if dim == 0 else x.t()).contiguous()


def words_for(n: int, bits: int, per_word: int | None = None) -> int:
    """Number of int32 words holding ``n`` values (per-word layout, or stream when per_word is None)."""
    if per_word is None:
        return -(-n * bits // 32)
    return -(-n // per_word)


def pack_words(codes: torch.Tensor, bits: int, per_word: int, dim: int = 0) -> torch.Tensor:
    """Pack uint8 codes ``per_word`` to an int32 along ``dim`` (0 or 1); returns int32."""
    if per_word * bits > 32:
        raise ValueError(f"{per_word} values of {bits} bits do not fit in 32 bits")
    # numpy, single-threaded: no OpenMP barriers (which stall badly on a busy 2-core machine)
    c = _move(codes, dim).numpy()
    n, m = c.shape
    nw = words_for(n, bits, per_word)
    pad = nw * per_word - n
    if pad:
        c = np.concatenate([c, np.zeros((pad, m), dtype=c.dtype)], 0)
    c = c.reshape(nw, per_word, m)
    out = c[:, 0, :].astype(np.uint32)
    tmp = np.empty_like(out)
    for j in range(1, per_word):
        np.left_shift(c[:, j, :], np.uint32(bits * j), out=tmp, dtype=np.uint32)
        np.bitwise_or(out, tmp, out=out)
    return _move(torch.from_numpy(out.view(np.int32)), dim)


def unpack_words(words: torch.Tensor, bits: int, per_word: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_words`: ``n`` uint8 codes along ``dim``."""
    w = _move(_as_int32(words), dim).numpy().view(np.uint32)
    nw, m = w.shape
    if nw != words_for(n, bits, per_word):
        raise ValueError(f"{nw} packed words cannot hold exactly {n} values at {per_word} per word")
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((nw, per_word, m), dtype=np.uint8)
    tmp = np.empty_like(w)
    for j in range(per_word):
        np.right_shift(w, np.uint32(bits * j), out=tmp)
        np.bitwise_and(tmp, mask, out=tmp)
        out[:, j, :] = tmp
    out = out.reshape(nw * per_word, m)[:n]
    return _move(torch.from_numpy(out), dim)


def unused_bits_set(words: torch.Tensor, bits: int, per_word: int, n: int, dim: int = 0) -> int:
    """Count words with non-zero bits outside the ``n`` valid fields (corruption / wrong width hint)."""
    w = _move(_as_int32(words), dim)
    used = per_word * bits
    cnt = 0
    if used < 32:
        cnt += int(((w >> used) != 0).sum()) if used < 32 else 0
    tail = w.shape[0] * per_word - n
    if tail:
        keep = per_word - tail
        cnt += int(((w[-1] >> (keep * bits)) & ((1 << ((tail) * bits)) - 1) != 0).sum())
    return cnt


def pack_stream(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Continuous bit stream along ``dim`` (GPTQ 3-bit); ``ceil(n*bits/32)`` int32 words."""
    if 32 % bits == 0:
        return pack_words(codes, bits, 32 // bits, dim)
    c = _move(codes, dim)
    n, m = c.shape
    nblk = -(-n // 32)
    pad = nblk * 32 - n
    c = c.to(torch.int32)
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)], 0)
    c = c.view(nblk, 32, m)
    out = torch.zeros((nblk, bits, m), dtype=torch.int32)
    for i in range(32):
        bit = bits * i
        w, s = divmod(bit, 32)
        out[:, w, :] |= c[:, i, :] << s
        if s + bits > 32:
            out[:, w + 1, :] |= c[:, i, :] >> (32 - s)
    out = out.view(nblk * bits, m)[: words_for(n, bits)]
    return _move(out, dim).contiguous()


def unpack_stream(words: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_stream`."""
    if 32 % bits == 0:
        return unpack_words(words, bits, 32 // bits, n, dim)
    w = _move(_as_int32(words), dim)
    nw, m = w.shape
    if nw != words_for(n, bits):
        raise ValueError(f"{nw} packed words cannot hold exactly {n} {bits}-bit values (need {words_for(n, bits)})")
    nblk = -(-n // 32)
    full = nblk * bits
    if full != nw:
        w = torch.cat([w, w.new_zeros(full - nw, m)], 0)
    w = w.view(nblk, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty((nblk, 32, m), dtype=torch.uint8)
    for i in range(32):
        bit = bits * i
        k, s = divmod(bit, 32)
        if s + bits <= 32:
            v = (w[:, k, :] >> s) & mask
        else:
            lo_bits = 32 - s
            v = ((w[:, k, :] >> s) & ((1 << lo_bits) - 1)) | ((w[:, k + 1, :] << lo_bits) & mask)
        out[:, i, :] = v.to(torch.uint8)
    out = out.view(nblk * 32, m)[:n]
    return _move(out, dim).contiguous()


# --- block-parallel helpers for the write-time transforms --------------------------------------

_POOL: ThreadPoolExecutor | None = None


def _in_halves(n: int, step: int, body) -> None:
    """Run ``body(start, stop)`` over ``range(0, n, step)`` blocks, the second half on a pool thread
    when the host has 2+ cores: the numpy lookups and copies inside release the GIL, so a
    compute-bound transform (BitBLAS's table lookups, AWQ's nibble transpose) runs on two cores."""
    global _POOL
    blocks = list(range(0, n, step))
    if len(blocks) < 2 or (os.cpu_count() or 1) < 2:
        for j in blocks:
            body(j, min(j + step, n))
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="effqat-transform")
    half = len(blocks) // 2

    def run(part):
        for j in part:
            body(j, min(j + step, n))
    fut = _POOL.submit(run, blocks[half:])
    run(blocks[:half])
    fut.result()


# --- word-wide arithmetic (GPTQ v1 zero points) -------------------------------------------------

def word_constant(bits: int) -> int:
    """The per-field "one" GPTQModel adds/subtracts word-wide (0x55555555 at 2-bit, ...)."""
    per = 32 // bits
    return sum(1 << (bits * j) for j in range(per))


def add_word_constant(words: torch.Tensor, bits: int, sign: int) -> torch.Tensor:
    """``words + sign * C`` modulo 2**32, as int32 (what GPTQModel does to v1 qzeros)."""
    c = np.uint32(word_constant(bits))
    w = _as_int32(words).contiguous().numpy().view(np.uint32)
    with np.errstate(over="ignore"):
        out = w + c if sign > 0 else w - c   # uint32 arithmetic wraps modulo 2**32
    return torch.from_numpy(out.view(np.int32))


def any_zero_field(words: torch.Tensor, bits: int, n: int) -> bool:
    """Whether any of the ``n`` ``bits``-wide fields along dim 1 of per-word packed ``words``
    (``[rows, ceil(n / (32 // bits))]``, 2/4/8-bit) is 0, by OR-folding each field into its low bit
    (word-wide shifts) instead of unpacking every field; padded fields past ``n`` do not count."""
    pf = 32 // bits
    t = _as_int32(words).contiguous().numpy().view(np.uint32).copy()
    s = 1
    while s < bits:
        np.bitwise_or(t, t >> np.uint32(s), out=t)
        s <<= 1
    low = np.uint32(word_constant(bits))
    if n % pf and t.size:
        pad = sum(1 << (bits * j) for j in range(n % pf, pf))
        t[:, -1] |= np.uint32(pad)
    return bool(np.any((t & low) != low))


# --- BitBLAS byte layout ------------------------------------------------------------------------

def lop3_positions(bits: int) -> list[int]:
    """Destination bit offset of field ``o`` of a 32-bit word after BitBLAS's fp16 LOP3 interleave.

    Field ``o`` (``bits`` wide) moves to ``(o % 2) * 16 + (o // 2) * bits``; for 2-bit, bytes 1 and 2
    of the result are then swapped.
    """
    n = 32 // bits
    pos = []
    for o in range(n):
        p = (o % 2) * 16 + (o // 2) * bits
        if bits == 2:
            byte = p // 8
            if byte == 1:
                p += 8
            elif byte == 2:
                p -= 8
        pos.append(p)
    return pos


def _permute_loop(w: np.ndarray, bits: int, positions: tuple, inverse: bool) -> np.ndarray:
    mask = np.uint32((1 << bits) - 1)
    out = np.zeros_like(w)
    tmp = np.empty_like(w)  # one scratch buffer: no per-field allocations
    for o, p in enumerate(positions):
        src, dst = (p, bits * o) if inverse else (bits * o, p)
        np.right_shift(w, np.uint32(src), out=tmp)
        np.bitwise_and(tmp, mask, out=tmp)
        np.left_shift(tmp, np.uint32(dst), out=tmp)
        np.bitwise_or(out, tmp, out=out)
    return out


@lru_cache(maxsize=16)
def _permute_tables(bits: int, positions: tuple, inverse: bool):
    """The permutation of every possible low / high 16-bit half (fields never straddle halves)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    return _permute_loop(v, bits, positions, inverse), _permute_loop(v << np.uint32(16), bits, positions, inverse)


def lop3_stages(bits: int) -> list[tuple[int, int]]:
    """``lop3_positions(bits)`` as delta swaps ``(shift, mask)`` applied in order to every 32-bit word
    (see :func:`delta_swap`): 2-bit swaps fields 1/2 of each nibble pair, then nibbles 1/2 of each
    16-bit half (evens of a byte pair to the low byte, odds to the high one, which is the interleave
    with its byte 1/2 swap already applied); 4-bit swaps nibbles 1/2 of each half, then bytes 1/2.
    Twelve word-wide operations instead of two table lookups per word."""
    return {2: [(2, 0x0C0C0C0C), (4, 0x00F000F0)], 4: [(4, 0x00F000F0), (8, 0x0000FF00)]}[bits]


def delta_swap(x: torch.Tensor, t: torch.Tensor, shift: int, mask: int) -> None:
    """Swap the bits selected by the 32-bit ``mask`` with the bits ``shift`` above them, in every
    32-bit word of ``x`` (int32, or int64 holding two words), in place; ``t`` is scratch of x's shape.
    The masks never reach a word's sign bit, so arithmetic shifts are as good as logical ones."""
    if x.dtype == torch.int64:
        mask |= mask << 32
    torch.bitwise_right_shift(x, shift, out=t)
    t.bitwise_xor_(x)
    t.bitwise_and_(mask)
    x.bitwise_xor_(t)
    t.bitwise_left_shift_(shift)
    x.bitwise_xor_(t)


def transpose_swap(stages):
    """``fn(words, out)``: ``out = words.T`` with the delta swaps ``stages`` (``lop3_stages``; None:
    transpose only) applied to every word, on numpy int32 arrays (``words`` [r, c], ``out`` [c, r])
    for :class:`~converters.checkpoint.DerivedTensor`. torch's tiled transpose copy (4x numpy's on a
    688 x 16384-word down_proj), then the swaps on 256 KB blocks of 64-bit lanes while they are in
    cache, on two threads. None on a big-endian host (``permute_fields`` then does it eagerly)."""
    if sys.byteorder != "little":
        return None

    def fn(words: np.ndarray, out: np.ndarray) -> None:
        r, c = words.shape
        o = torch.from_numpy(out.view(np.int32).reshape(c, r))
        o.copy_(torch.from_numpy(words.view(np.int32)).t())
        if not stages:
            return
        flat = o.view(-1)
        lanes = flat.view(torch.int64) if flat.numel() % 2 == 0 else flat

        def block(j, k):
            x = lanes[j:k]
            t = torch.empty_like(x)
            for shift, mask in stages:
                delta_swap(x, t, shift, mask)
        _in_halves(lanes.numel(), 1 << 15, block)
    return fn


def permute_fields(words: torch.Tensor, bits: int, positions: list[int], inverse: bool = False) -> torch.Tensor:
    """Move each ``bits``-wide field ``o`` of every int32 word to bit ``positions[o]`` (or back).

    A field permutation moves bits independently, so ``perm(w) = perm(low half) | perm(high half)``:
    two lookups in 65536-entry tables instead of four passes per field (16 fields at 2 bits).
    """
    w = _as_int32(words).contiguous().numpy().view(np.uint32)
    lo, hi = _permute_tables(bits, tuple(positions), inverse)
    idx = np.bitwise_and(w, np.uint32(0xFFFF))
    out = np.take(lo, idx, mode="clip")   # indices are < 65536 by construction; 'clip' skips the
    np.right_shift(w, np.uint32(16), out=idx)   # bounds check that makes the default 7x slower
    np.bitwise_or(out, np.take(hi, idx, mode="clip"), out=out)
    return torch.from_numpy(out.view(np.int32))


# --- 4-bit nibble transpose (AWQ: codes packed along out instead of in) -------------------------

def nibble_transpose(order, inverse: bool = False):
    """``fn(words, out)`` moving 4-bit codes packed 8 per int32 along ``in`` (GPTQ / EQAT ``qweight``
    ``[in/8, out]``) to 8 per int32 along ``out`` (``[in, out/8]``), field ``j`` of word ``k`` holding
    column ``8k + order[j]`` (AWQ's interleave); ``inverse``: back. numpy int32 arrays, for
    :class:`~converters.checkpoint.DerivedTensor`; None on a big-endian host.

    Per block of rows (cache-sized): pick each 8-column block's words in ``order`` (a uint32 gather),
    transpose words to byte planes (byte ``b`` holds rows ``2b, 2b+1`` of one column), swap the middle
    nibbles of each byte pair (now rows x columns are transposed 2x2) and scatter the bytes to their
    rows: four passes over the data instead of unpacking and repacking 8 codes per word (14x faster
    on a 4096 x 11008 qweight).
    """
    if sys.byteorder != "little":
        return None
    order = np.asarray(order, dtype=np.intp)
    inv = np.argsort(order)

    def rows_per_block(row_bytes: int) -> int:
        return max(1, (256 << 10) // max(row_bytes, 1))

    def forward(words: np.ndarray, out: np.ndarray) -> None:
        r, c = words.shape
        k = c // 8
        w = words.view(np.uint32).reshape(r, k, 8)
        o = out.view(np.uint8).reshape(r, 4, 2, k, 4)                      # [row8, b, e, k, q]

        def block(i, j):
            picked = np.take(w[i:j], order, axis=2)                         # [row8, k, j] in order
            by = picked.view(np.uint8).reshape(j - i, c, 4)
            planes = np.empty((j - i, 4, c), dtype=np.uint8)               # [row8, b, (k j)]
            for b in range(4):
                planes[:, b] = by[..., b]
            x = torch.from_numpy(planes.view(np.int64))   # 2x2 nibble transpose of each byte pair
            delta_swap(x, torch.empty_like(x), 4, 0x00F000F0)
            pairs = planes.reshape(j - i, 4, k * 4, 2)                     # [row8, b, (k q), e]
            for e in (0, 1):
                o[i:j, :, e] = pairs[..., e].reshape(j - i, 4, k, 4)
        _in_halves(r, rows_per_block(4 * c), block)

    def backward(words: np.ndarray, out: np.ndarray) -> None:
        rows, k = words.shape
        r, c = rows // 8, 8 * k
        a = words.view(np.uint8).reshape(r, 4, 2, k, 4)
        o = out.view(np.uint32).reshape(r, k, 8)

        def block(i, j):
            pairs = np.empty((j - i, 4, k * 4, 2), dtype=np.uint8)          # [row8, b, (k q), e]
            for e in (0, 1):
                pairs[..., e] = a[i:j, :, e].reshape(j - i, 4, k * 4)
            planes = pairs.reshape(j - i, 4, c)
            x = torch.from_numpy(planes.view(np.int64))   # 2x2 nibble transpose of each byte pair
            delta_swap(x, torch.empty_like(x), 4, 0x00F000F0)
            picked = np.empty((j - i, c, 4), dtype=np.uint8)
            for b in range(4):
                picked[..., b] = planes[:, b]
            o[i:j] = np.take(picked.view(np.uint32).reshape(j - i, k, 8), inv, axis=2)
        _in_halves(r, rows_per_block(4 * c), block)

    return backward if inverse else forward


# --- whole-group code flips (GPTQ v1 sign-flip encoding) -------------------------------------

def group_flip_mask(flip_go: torch.Tensor, bits: int, in_features: int, group_size: int) -> torch.Tensor:
    """int32 words ``[ceil(in/pf), out]`` with every field of a flipped group set to all ones.

    ``flip_go`` is bool ``[n_groups, out]``; input row ``i`` belongs to group ``i // group_size``
    (no act-order). XOR-ing a qweight packed along ``in`` (2/4/8-bit) with this mask turns each code
    ``W`` of a flipped group into ``maxq - W`` and leaves the padded fields of a ragged last word
    zero. When the group is a whole number of words the mask is built per word row, not per value.
    """
    pf = 32 // bits
    rows = words_for(in_features, bits, pf)
    g = in_features if group_size == -1 else group_size
    f = flip_go.numpy()
    if g % pf == 0:
        per = g // pf
        m = np.repeat(f, per, axis=0)[:rows]
        out = np.where(m, np.uint32(0xFFFFFFFF), np.uint32(0))
        tail = rows * pf - in_features
        if tail:
            out[-1] &= np.uint32((1 << (bits * (pf - tail))) - 1)
        return torch.from_numpy(out.view(np.int32))
    maxq = (1 << bits) - 1
    gid = np.arange(in_features) // g
    codes = np.where(f[gid], np.uint8(maxq), np.uint8(0))
    return pack_words(torch.from_numpy(codes), bits, pf, dim=0)


def xor_words(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``words ^ mask`` on int32 tensors (numpy, single-threaded)."""
    a = _as_int32(words).contiguous().numpy()
    return torch.from_numpy(np.bitwise_xor(a, _as_int32(mask).contiguous().numpy()))


def flip_group_words(qweight: torch.Tensor, flip_go: np.ndarray, bits: int, in_features: int,
                     group_size: int) -> torch.Tensor:
    """``qweight ^ group_flip_mask(...)`` without building the full mask when groups are whole words.

    Each group's word rows are XOR-ed with one ``[out]`` row of all-ones / zeros by broadcasting
    (numpy, one pass over qweight); ragged or unaligned groups fall back to the full mask.
    """
    fn = group_flip_rows(flip_go, bits, in_features, group_size)
    if fn is not None:
        w = _as_int32(qweight).contiguous()
        res = torch.empty_like(w)
        fn(w.numpy(), res.numpy())
        return res
    return xor_words(qweight, group_flip_mask(torch.from_numpy(np.ascontiguousarray(flip_go)), bits,
                                              in_features, group_size))


def group_flip_rows(flip_go: np.ndarray, bits: int, in_features: int, group_size: int):
    """``fn(words, out)`` writing ``words ^ group_flip_mask(...)`` into ``out`` (numpy ``[rows, out]``
    int32 arrays), for :class:`~converters.checkpoint.DerivedTensor`; None unless every group is a
    whole number of words (then ``flip_group_words`` handles it eagerly)."""
    pf = 32 // bits
    g = in_features if group_size == -1 else group_size
    if g % pf or in_features % g:
        return None
    per = g // pf
    m = np.where(flip_go, np.uint32(0xFFFFFFFF), np.uint32(0))[:, None, :]          # [G, 1, out]

    def fn(words: np.ndarray, out: np.ndarray) -> None:
        cols = words.shape[1]
        np.bitwise_xor(words.view(np.uint32).reshape(-1, per, cols), m, out=out.view(np.uint32).reshape(-1, per, cols))
    return fn


def negate_rows(flip: np.ndarray):
    """``fn(scales, out)`` writing ``negate_where(scales, flip)`` into ``out`` (numpy fp16 / fp32
    arrays of ``flip``'s shape) for :class:`~converters.checkpoint.DerivedTensor`."""
    def fn(scales: np.ndarray, out: np.ndarray) -> None:
        itype, sign = {2: (np.uint16, 0x8000), 4: (np.uint32, 0x80000000)}[scales.itemsize]
        np.bitwise_xor(scales.view(itype), np.where(flip, itype(sign), itype(0)), out=out.view(itype))
    return fn


def negate_where(scales: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """``-scales`` where ``flip`` (same shape), by toggling the sign bit (fp16 / bf16 / fp32)."""
    bits_view = scales.contiguous().view(torch.int16 if scales.element_size() == 2 else torch.int32)
    out = torch.empty_like(bits_view)   # bf16 has no numpy dtype: work on the integer view
    negate_rows(flip)(bits_view.numpy(), out.numpy())
    return out.view(scales.dtype)
