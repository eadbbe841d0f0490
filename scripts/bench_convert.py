#!/usr/bin/env python
"""Benchmark the converters on a synthetic original-EQAT checkpoint with Llama-2-7B shapes (w2g64).

Writes the source once (random packed words: every bit pattern is a valid code), then for each target
runs, each in a fresh subprocess, a plain copy of the source folder (the I/O floor: read + write every
byte, no conversion) and the conversion, and prints both throughputs (MB of source per second), their
ratio (conversion / copy: 1.0 means as fast as copying; the median of ``--repeat`` back-to-back pairs,
with their range: disk write-back makes single pairs vary 2-4x here) and the conversion's peak RSS
against the largest source shard.

    python scripts/bench_convert.py [--layers 32] [--bits 2] [--shard-size 2GB]
                                    [--targets gptq gptq_v2 bitblas eqat] [--repeat 1]
    python scripts/bench_convert.py --bits 4 --targets awq gptq_v2
    python scripts/bench_convert.py --targets gguf gptq_v2      # one llama.cpp file (Q4_0 at w2)

``gguf`` needs a tokenizer llama.cpp's converter knows: the source then carries the SmolLM2 test
tokenizer (tests/assets/smollm2_tokenizer) and its 49152-token vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "assets" / "smollm2_tokenizer"
GGUF_VOCAB = 49152
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def zero_point_words(ng: int, out: int, bits: int, g, uniform: bool) -> torch.Tensor:
    """EQAT qzeros words [ng, out / pf]. ``uniform``: every bit pattern (a quarter of 2-bit zero points
    are 0, the worst case for v1 output's sign flip); else as trained checkpoints have them: near the
    middle of the range (round(N(maxq / 2, maxq / 6)), 2.3% zeros at 2 bits, 0.3% at 4; our stories260k
    w2g64 run has 0.2%)."""
    pf = 32 // bits
    if uniform:
        return torch.randint(-2**31, 2**31 - 1, (ng, out // pf), generator=g, dtype=torch.int64).to(torch.int32)
    maxq = (1 << bits) - 1
    z = (torch.randn(ng, out, generator=g) * (maxq / 6) + maxq / 2).round().clamp(0, maxq).to(torch.int64)
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    words = (z.view(ng, out // pf, pf) << shifts).sum(-1)
    return words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else words.to(torch.int32)


def build_source(path: Path, layers: int, shard_bytes: int, bits=2, group=64, uniform_zeros=False,
                 vocab=VOCAB) -> int:
    """Write an EQAT folder shard by shard; returns the packed bytes of the quantized tensors."""
    path.mkdir(parents=True)
    pf = 32 // bits
    g = torch.Generator().manual_seed(0)
    shard, size, n, packed, weight_map = {}, 0, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            for k in shard:
                weight_map[k] = name
            n += 1
            shard, size = {}, 0

    def add(k, t):
        nonlocal size
        nb = t.numel() * t.element_size()
        if shard and size + nb > shard_bytes:
            flush()
        shard[k] = t
        size += nb

    add("model.embed_tokens.weight", (torch.randn(vocab, HIDDEN, generator=g) * 0.02).half())
    for i in range(layers):
        for nm, (o, n_in) in LINEARS.items():
            p = f"model.layers.{i}.{nm}"
            ng = n_in // group
            qweight = torch.randint(-2**31, 2**31 - 1, (n_in // pf, o), generator=g, dtype=torch.int64).to(torch.int32)
            qzeros = zero_point_words(ng, o, bits, g, uniform_zeros)
            scales = (torch.rand(ng, o, generator=g) * 0.01 + 1e-4).half()
            g_idx = (torch.arange(n_in, dtype=torch.int32) // group)
            for k, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
                add(f"{p}.{k}", t)
                packed += t.numel() * t.element_size()
        add(f"model.layers.{i}.input_layernorm.weight", torch.ones(HIDDEN, dtype=torch.float16))
        add(f"model.layers.{i}.post_attention_layernorm.weight", torch.ones(HIDDEN, dtype=torch.float16))
    add("model.norm.weight", torch.ones(HIDDEN, dtype=torch.float16))
    add("lm_head.weight", (torch.randn(vocab, HIDDEN, generator=g) * 0.02).half())
    flush()
    # rename to the HF pattern and write the index
    total = n
    renamed = {}
    for i in range(total):
        old = path / f"model-{i:05d}.safetensors"
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(old, path / new)
        renamed[f"model-{i:05d}.safetensors"] = new
    wm = {k: renamed[v] for k, v in weight_map.items()}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": vocab, "torch_dtype": "float16", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096}))
    if vocab == GGUF_VOCAB:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(TOKENIZER / name, path / name)
    return packed


CHILD = r"""
import json, sys, time, logging
logging.basicConfig(level=logging.ERROR)
from effqat_plugin.converters import convert
t = time.time()
rep = convert(sys.argv[1], sys.argv[2], to=sys.argv[3], max_shard_size=sys.argv[4])
sec = time.time() - t
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so it would report the parent's peak
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"seconds": sec, "rss_kb": hwm,
                  "files": len(rep["files"]), "bytes_written": rep["bytes_written"]}))
"""

COPY_CHILD = r"""
import json, os, shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
t = time.time()
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
print(json.dumps({"seconds": time.time() - t}))
"""


def _child(code: str, *args) -> dict:
    os.sync()  # do not time the write-back of the previous step
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env=os.environ.copy())
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode))
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4, 8])
    ap.add_argument("--shard-size", default="2GB", help="source and output shard size")
    ap.add_argument("--targets", nargs="+", default=["gptq", "gptq_v2", "bitblas", "eqat"])
    ap.add_argument("--repeat", type=int, default=3, help="copy+convert pairs per target (the median pair is "
                                                           "shown, with the range of ratios)")
    ap.add_argument("--uniform-zeros", action="store_true",
                    help="zero points uniformly random (worst case for gptq v1's sign flip) instead of as trained")
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    from effqat_plugin.converters.checkpoint import parse_size

    work = Path(args.workdir or tempfile.mkdtemp(prefix="effqat-bench-"))
    vocab = GGUF_VOCAB if "gguf" in args.targets else VOCAB
    src = work / (f"Llama-2-7b-EfficientQAT-w{args.bits}g64{'-uniform-zeros' if args.uniform_zeros else ''}"
                  f"{'-v49152' if vocab == GGUF_VOCAB else ''}")
    try:
        t = time.time()
        if (src / "model.safetensors.index.json").exists() and args.workdir:   # reuse a kept source
            packed = sum(n for n in json.loads((src / "packed.json").read_text()).values())
        else:
            packed = build_source(src, args.layers, parse_size(args.shard_size), bits=args.bits,
                                  uniform_zeros=args.uniform_zeros, vocab=vocab)
            (src / "packed.json").write_text(json.dumps({"packed": packed}))
        shards = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        print(f"source: {args.layers} layers w{args.bits}g64, {len(shards)} shards, {total / 1e6:.0f} MB total, "
              f"{packed / 1e6:.0f} MB packed quantized tensors, largest shard {largest / 1e6:.0f} MB "
              f"(built in {time.time() - t:.1f} s)")
        print(f"{'target':8s} {'copy s':>7s} {'copy MB/s':>10s} {'conv s':>7s} {'conv MB/s':>10s} "
              f"{'conv/copy':>9s} {'(min-max)':>11s} {'peak RSS MB':>12s} {'RSS/shard':>9s}")
        for tgt in args.targets:
            pairs = []
            for _ in range(args.repeat):
                cdst, dst = work / "out-copy", work / (f"out-{tgt}.gguf" if tgt == "gguf" else f"out-{tgt}")
                try:
                    c = _child(COPY_CHILD, src, cdst)["seconds"]
                    shutil.rmtree(cdst, ignore_errors=True)
                    res = _child(CHILD, src, dst, tgt, args.shard_size)
                except RuntimeError as e:
                    print(f"{tgt:8s} FAILED: {e}")
                    break
                finally:
                    shutil.rmtree(cdst, ignore_errors=True)
                    if dst.is_file():
                        dst.unlink()
                    shutil.rmtree(dst, ignore_errors=True)
                pairs.append((c / res["seconds"], c, res))
            if not pairs:
                continue
            pairs.sort(key=lambda p: p[0])
            ratio, c, res = pairs[len(pairs) // 2]   # the median pair (write-back makes single pairs noisy)
            rss = max(p[2]["rss_kb"] for p in pairs) * 1024
            spread = f"{pairs[0][0]:.2f}-{pairs[-1][0]:.2f}"
            print(f"{tgt:8s} {c:7.2f} {total / 1e6 / c:10.0f} {res['seconds']:7.2f} "
                  f"{total / 1e6 / res['seconds']:10.0f} {ratio:9.2f} {spread:>11s} {rss / 1e6:12.0f} {rss / largest:9.2f}")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
