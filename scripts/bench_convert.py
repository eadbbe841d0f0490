#!/usr/bin/env python
"""Benchmark the converters on a synthetic original-EQAT checkpoint with Llama-2-7B shapes (w2g64).

Writes the source once (random packed words: every 2-bit pattern is a valid code), then converts it
to each target in a fresh subprocess and prints seconds, MB/s of packed input (qweight + qzeros +
scales + g_idx of the quantized modules; also total input) and the child's peak RSS against the
largest source shard.

    python scripts/bench_convert.py [--layers 32] [--shard-size 2GB] [--targets gptq gptq_v2 bitblas eqat]
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
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def build_source(path: Path, layers: int, shard_bytes: int, bits=2, group=64) -> int:
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

    add("model.embed_tokens.weight", (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).half())
    for i in range(layers):
        for nm, (o, n_in) in LINEARS.items():
            p = f"model.layers.{i}.{nm}"
            ng = n_in // group
            qweight = torch.randint(-2**31, 2**31 - 1, (n_in // pf, o), generator=g, dtype=torch.int64).to(torch.int32)
            qzeros = torch.randint(-2**31, 2**31 - 1, (ng, o // pf), generator=g, dtype=torch.int64).to(torch.int32)
            scales = (torch.rand(ng, o, generator=g) * 0.01 + 1e-4).half()
            g_idx = (torch.arange(n_in, dtype=torch.int32) // group)
            for k, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
                add(f"{p}.{k}", t)
                packed += t.numel() * t.element_size()
        add(f"model.layers.{i}.input_layernorm.weight", torch.ones(HIDDEN, dtype=torch.float16))
        add(f"model.layers.{i}.post_attention_layernorm.weight", torch.ones(HIDDEN, dtype=torch.float16))
    add("model.norm.weight", torch.ones(HIDDEN, dtype=torch.float16))
    add("lm_head.weight", (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).half())
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
        "num_key_value_heads": 32, "vocab_size": VOCAB, "torch_dtype": "float16"}))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard-size", default="2GB", help="source and output shard size")
    ap.add_argument("--targets", nargs="+", default=["gptq", "gptq_v2", "bitblas", "eqat"])
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    from effqat_plugin.converters.checkpoint import parse_size

    work = Path(args.workdir or tempfile.mkdtemp(prefix="effqat-bench-"))
    src = work / "Llama-2-7b-EfficientQAT-w2g64"
    try:
        t = time.time()
        packed = build_source(src, args.layers, parse_size(args.shard_size))
        shards = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        print(f"source: {args.layers} layers, {len(shards)} shards, {total / 1e6:.0f} MB total, "
              f"{packed / 1e6:.0f} MB packed quantized tensors, largest shard {largest / 1e6:.0f} MB "
              f"(built in {time.time() - t:.1f} s)")
        print(f"{'target':8s} {'seconds':>8s} {'MB/s packed':>12s} {'MB/s total':>11s} {'peak RSS MB':>12s} "
              f"{'RSS/shard':>9s}")
        rows = []
        for tgt in args.targets:
            dst = work / f"out-{tgt}"
            os.sync()  # do not time the write-back of the previous step
            r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), tgt, args.shard_size],
                               capture_output=True, text=True, env=os.environ.copy())
            if r.returncode:
                print(f"{tgt:8s} FAILED: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rss = res["rss_kb"] * 1024
            row = (tgt, res["seconds"], packed / 1e6 / res["seconds"], total / 1e6 / res["seconds"],
                   rss / 1e6, rss / largest)
            rows.append(row)
            print(f"{row[0]:8s} {row[1]:8.1f} {row[2]:12.0f} {row[3]:11.0f} {row[4]:12.0f} {row[5]:9.2f}")
            shutil.rmtree(dst, ignore_errors=True)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
