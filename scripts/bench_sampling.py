"""Sampling time per 1K tokens: the model held whole vs accelerate's big-model offload.

    python scripts/bench_sampling.py [--hidden 512 --layers 8 --vocab 8000] [--n 8 --seq-len 64]
                                     [--max-memory-mb 48] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]

A random-weight Llama (transformers' LlamaConfig, nothing downloaded) is saved to a temporary folder
and sampled (``data.sample_from_model``, the run's sampler) twice with the same seed: whole on the device, and with
``max_memory`` capped below its size, so accelerate keeps the layers that do not fit on disk (on
CPU) or in host memory / on disk (on CUDA) and brings them in at every decoding step. Loading and
sampling are timed apart. Prints one JSON line per placement and a markdown table; also checks that both wrote the same tokens (they
do on CPU, where the operations are the same; on CUDA they may differ in the last bits).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(folder: str, hidden: int, layers: int, vocab: int, inter: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--inter", type=int, default=None, help="default: 2.6875 x hidden (Llama's ratio)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-memory-mb", type=float, default=48.0, help="cap of the offloaded run (MB)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from effqat_plugin import model_sampler
    from effqat_plugin.data import sample_from_model

    device = torch.device(a.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="effqat-bench-sampling-") as tmp:
        folder = os.path.join(tmp, "model")
        params = build(folder, a.hidden, a.layers, a.vocab, a.inter or int(2.6875 * a.hidden))
        outs = {}
        for name, cap in (("whole", None), ("offload", int(a.max_memory_mb * 1e6))):
            placement = model_sampler.plan_placement(folder, a.n, a.seq_len, device, a.dtype, max_memory=cap)
            t0 = time.time()
            with model_sampler.loaded_for_sampling(folder, placement, offload_root=tmp) as model:
                t1 = time.time()
                ids = sample_from_model(model, a.n, a.seq_len, seed=2, bos_token_id=1)
                t2 = time.time()
            outs[name] = ids
            tokens = a.n * a.seq_len
            row = {"placement": "offload" if placement.offload else "whole", "device": a.device,
                   "dtype": model_sampler.dtype_name(placement.dtype), "params_m": round(params / 1e6, 1),
                   "weights_mb": round(placement.weight_bytes / 1e6, 1),
                   "on_device_mb": round(placement.budget / 1e6, 1), "tokens": tokens,
                   "load_s": round(t1 - t0, 2), "sample_s": round(t2 - t1, 2),
                   "sample_s_per_1k_tokens": round(1000 * (t2 - t1) / tokens, 3), "threads": torch.get_num_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    same = torch.equal(outs["whole"], outs["offload"])
    print(f"same tokens: {same}")
    print("| placement | dtype | weights MB | on device MB | tokens | load s | sampling s | s / 1K tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['placement']} | {r['dtype']} | {r['weights_mb']} | {r['on_device_mb']} | {r['tokens']} | "
              f"{r['load_s']} | {r['sample_s']} | {r['sample_s_per_1k_tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
