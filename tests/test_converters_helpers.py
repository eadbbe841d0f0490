"""Shared builders for the converter tests (no tests here), and independent reference decoders.

The decoders below are written from the format descriptions with plain Python integers, one value at
a time, and never call ``effqat_plugin.converters.packing``; they are the check on the vectorized code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from effqat_plugin.qweight import QuantizedWeight

STORIES = Path(__file__).resolve().parents[1] / "effqat_plugin" / "assets" / "stories260k"


def rand_qweight(out_f, in_f, bits, group, seed, bias=False) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    ng = 1 if group == -1 else -(-in_f // group)
    w = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.int32).to(torch.uint8)
    z = torch.randint(0, maxq + 1, (out_f, ng), generator=g, dtype=torch.int32).to(torch.uint8)
    # every zero-point value 0..maxq appears (when there is room), and the maximum code too
    flat = z.view(-1)
    k = min(flat.numel(), maxq + 1)
    perm = torch.randperm(flat.numel(), generator=g)[:k]
    flat[perm] = torch.arange(k, dtype=torch.uint8)
    w.view(-1)[0] = maxq
    s = (torch.rand((out_f, ng), generator=g) * 0.05 + 1e-3).to(torch.float16)
    b = (torch.randn(out_f, generator=g) * 0.1).to(torch.float16) if bias else None
    return QuantizedWeight(int_weight=w, zeros=z, scales=s, bits=bits,
                           group_size=group if group == -1 or group <= in_f else -1, bias=b)


LLAMA_LINEARS = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (172, 64), "mlp.up_proj": (172, 64),
    "mlp.down_proj": (64, 172),
}


def stories_model(bits, group, seed=0, layers=5, linears=None):
    """(qweights, other tensors) with the bundled stories260k shapes (hidden 64, intermediate 172)."""
    linears = linears or LLAMA_LINEARS
    qws, tensors = {}, {}
    gen = torch.Generator().manual_seed(seed + 1000)
    tensors["model.embed_tokens.weight"] = torch.randn(512, 64, generator=gen).to(torch.float16)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    for i in range(layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(64, generator=gen).to(torch.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.rand(64, generator=gen).to(torch.float16)
        for j, (name, (o, n)) in enumerate(linears.items()):
            qws[f"model.layers.{i}.{name}"] = rand_qweight(o, n, bits, group, seed * 100 + i * 10 + j)
    return qws, tensors


def config_files(tmp: Path, intermediate_size: int | None = None, **overrides) -> Path:
    """A folder with stories260k's config / tokenizer files (no weights), optionally other sizes."""
    if intermediate_size is not None:
        overrides["intermediate_size"] = intermediate_size
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    d = tmp / f"cfg{tag}"
    if not d.exists():
        d.mkdir()
        for n in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(STORIES / n, d / n)
        if overrides:
            c = json.loads((d / "config.json").read_text())
            c.update(overrides)
            (d / "config.json").write_text(json.dumps(c, indent=2))
    return d


BITBLAS_DIMS = {"hidden_size": 128, "intermediate_size": 256}   # config of small_bitblas_model


def llama_linears(inter: int) -> dict:
    """stories260k's linears with an MLP of width ``inter`` (128: every kernel takes the shapes)."""
    return {**LLAMA_LINEARS, "mlp.gate_proj": (inter, 64), "mlp.up_proj": (inter, 64),
            "mlp.down_proj": (64, inter)}


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        qa, qb = a[k], b[k]
        assert qa.equal(qb), k
        assert (qa.bias is None) == (qb.bias is None), k
        if qa.bias is not None:
            assert torch.equal(qa.bias.to(torch.float16), qb.bias.to(torch.float16)), k


def assert_tensors_same(a: dict, b: dict):
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def read_qcfg(path: Path) -> dict:
    return json.loads((Path(path) / "quantize_config.json").read_text())


# ---------------- independent reference decoders (plain Python ints) -----------------------------

def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def ref_unpack_per_word(words_2d, bits, per_word, n, along_rows):
    """Decode [words, cols] (along_rows) or [rows, words] packed int32, value j at bit bits*j."""
    W = words_2d.tolist()
    mask = (1 << bits) - 1
    if along_rows:
        cols = len(W[0])
        return [[(_u32(W[i // per_word][c]) >> (bits * (i % per_word))) & mask for c in range(cols)]
                for i in range(n)]
    return [[(_u32(row[i // per_word]) >> (bits * (i % per_word))) & mask for i in range(n)] for row in W]


def ref_unpack_stream(words_2d, bits, n, along_rows):
    """Continuous little-endian bit stream per column (along_rows) or per row."""
    W = words_2d.tolist()
    mask = (1 << bits) - 1
    if along_rows:
        cols = len(W[0])
        streams = [sum(_u32(W[r][c]) << (32 * r) for r in range(len(W))) for c in range(cols)]
        return [[(streams[c] >> (bits * i)) & mask for c in range(cols)] for i in range(n)]
    out = []
    for row in W:
        s = sum(_u32(v) << (32 * r) for r, v in enumerate(row))
        out.append([(s >> (bits * i)) & mask for i in range(n)])
    return out


def ref_bitblas_codes(qweight_int8, bits, in_f):
    """Undo BitBLAS's fp16 LOP3 interleave by definition, then QuantCompress; returns [out][in]."""
    rows = qweight_int8.tolist()
    mask = (1 << bits) - 1
    per = 32 // bits
    out = []
    for row in rows:
        b = [v & 0xFF for v in row]
        codes = []
        for w0 in range(0, len(b), 4):
            word = b[w0] | b[w0 + 1] << 8 | b[w0 + 2] << 16 | b[w0 + 3] << 24
            if bits == 2:  # undo the byte 1 <-> 2 swap
                bb = [(word >> (8 * i)) & 0xFF for i in range(4)]
                word = bb[0] | bb[2] << 8 | bb[1] << 16 | bb[3] << 24
            for o in range(per):
                if bits in (2, 4):
                    pos = (o % 2) * 16 + (o // 2) * bits
                else:
                    pos = o * bits
                codes.append((word >> pos) & mask)
        out.append(codes[:in_f])
    return out


def ref_bytes_unpack(int8_2d, bits, n):
    """QuantCompress along the last dim: byte j holds values j*e+k at bit bits*k."""
    rows = int8_2d.tolist()
    e = 8 // bits
    mask = (1 << bits) - 1
    return [[((row[i // e] & 0xFF) >> (bits * (i % e))) & mask for i in range(n)] for row in rows]
