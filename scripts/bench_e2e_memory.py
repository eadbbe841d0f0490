"""Peak memory of one E2E-QP training step: packed W_int (our kernels) vs fake-quant holding fp16 weights.

Both paths build the same Llama-shaped model from a config and run the same step (forward, backward into
the step sizes, AdamW update, step-size clamp) on the same batch; only the quantized linears differ:

* ``packed``: ``PackedQuantLinear`` - W_int packed in ``bits`` per weight, uint8 zeros, fp32 scales
  (trainable); forward/backward dequantize on the fly and never keep a dequantized weight;
* ``fakequant``: fp16 weight held in memory, fp32 scales (trainable) and zeros; the forward
  fake-quantizes the weight (``quantizer.fake_quantize``: dequant-then-matmul, straight-through
  roundings) and autograd keeps what it needs for the step-size gradient.

Each (config, path) runs in a fresh subprocess so peaks do not mix. On CPU the number is the peak RSS
(VmHWM) minus the RSS after imports (the Python/torch baseline), with glibc's mmap threshold fixed at
64 KiB so freed transients are returned instead of fragmenting the heap; with ``--device cuda`` it is
``torch.cuda.max_memory_allocated``. Non-quantized parts (embeddings, norms, lm_head) are fp16 in both.

    python scripts/bench_e2e_memory.py                    # default configs, w2g64, CPU
    python scripts/bench_e2e_memory.py --bits 2 3 --configs small medium --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    # name: (hidden, intermediate, layers, heads, vocab)
    "tiny": (64, 172, 5, 8, 512),        # stories260k-sized: embeddings and runtime overhead dominate
    "small": (1024, 2816, 8, 8, 512),    # ~100M quantized weights
    "medium": (2048, 5632, 8, 16, 512),  # ~400M quantized weights
    "large": (4096, 11008, 4, 32, 512),  # 4 Llama-2-7B-shaped layers, ~800M quantized weights
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def worker(args) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from effqat_plugin.kernels import PackedQuantLinear, pack_int_weight
    from effqat_plugin.layout import set_submodule
    from effqat_plugin.quantizer import fake_quantize, init_scales_zeros

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dev = torch.device(args.device)
    hidden, inter, layers, heads, vocab = CONFIGS[args.config]
    bits, group = args.bits, args.group_size
    maxq = (1 << bits) - 1

    class FakeQuantFP16Linear(nn.Module):
        """fp16 weight held; fake-quantized (dequant-then-matmul) in every forward."""

        def __init__(self, out_f, in_f):
            super().__init__()
            self.register_buffer("weight", (torch.randn(out_f, in_f, device=dev) * 0.02).half())
            s, z = init_scales_zeros(self.weight, bits, group)
            self.scales = nn.Parameter(s)
            self.register_buffer("zeros", z.clamp(0, maxq))

        def forward(self, x):
            w_hat = fake_quantize(self.weight.float(), self.scales, self.zeros, bits, group)
            return F.linear(x, w_hat.to(x.dtype))

    def packed_linear(out_f, in_f):
        ng = -(-in_f // group)
        m = PackedQuantLinear(in_f, out_f, bits, group, device=dev)
        with torch.no_grad():
            m.qweight.copy_(pack_int_weight(torch.randint(0, maxq + 1, (out_f, in_f), dtype=torch.uint8,
                                                          device=dev), bits))
            m.zeros.fill_(maxq // 2 + 1)
            m.scales.copy_(torch.rand(out_f, ng, device=dev) * 0.01 + 0.005)
        return m

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _trim()
    base_kb = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.time()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n_quant = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
            n_quant += mod.in_features * mod.out_features
            new = (packed_linear if args.path == "packed" else FakeQuantFP16Linear)(mod.out_features, mod.in_features)
            set_submodule(model, name, new)
    # materialize what is left on meta (embeddings, norms, lm_head) in fp16, frozen
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.empty(p.shape, dtype=torch.float16, device=dev)
                t.fill_(1.0) if p.dim() == 1 else t.normal_(0, 0.02)
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.scales for m in model.modules() if hasattr(m, "scales") and isinstance(m.scales, nn.Parameter)]
    for p in params:
        p.requires_grad_(True)
    model.train()
    model_kb = _rss_kb("VmRSS")
    model_cuda = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0

    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)).to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for _ in range(args.steps):  # step 1 allocates the AdamW state; later steps show the steady state
        with amp:
            # embeddings are fp16: run the blocks in fp32 on CPU, bf16 autocast on CUDA
            h = model.model.embed_tokens(ids).float() if dev.type == "cpu" else model.model.embed_tokens(ids)
            out = model(inputs_embeds=h, labels=ids, use_cache=False) if dev.type == "cuda" else None
            if out is None:
                model.lm_head.float()  # tiny vocab: negligible; fp32 logits on CPU
                model.model.norm.float()
                for layer in model.model.layers:
                    layer.input_layernorm.float()
                    layer.post_attention_layernorm.float()
                out = model(inputs_embeds=h, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p in params:
                p.clamp_(1e-4, 1e4)
    seconds = time.time() - t0
    peak_kb = _rss_kb("VmHWM")
    res = {"config": args.config, "path": args.path, "bits": bits, "group_size": group, "device": dev.type,
           "quantized_weights": n_quant, "trainable_scales": sum(p.numel() for p in params),
           "baseline_rss_mb": base_kb / 1024, "model_rss_mb": (model_kb - base_kb) / 1024,
           "peak_rss_mb": (peak_kb - base_kb) / 1024, "loss": float(out.loss), "seconds": round(seconds, 2)}
    if dev.type == "cuda":
        res["model_cuda_mb"] = model_cuda / 2**20
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "small", "medium"], choices=sorted(CONFIGS))
    ap.add_argument("--bits", nargs="+", type=int, default=[2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["packed", "fakequant"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.path, args.bits = args.worker, args.bits[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    metric = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    rows = []
    print(f"E2E-QP one training step ({args.steps} steps run, batch {args.batch_size} x {args.seq_len} tokens), "
          f"g{args.group_size}, {args.device}; memory = "
          + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS minus post-import RSS"))
    print(f"{'config':8} {'bits':>4} {'quant W':>9} {'packed MB':>10} {'fakequant MB':>13} {'ratio':>6}   "
          f"(model only: packed / fakequant MB)")
    for name in args.configs:
        for bits in args.bits:
            got = {}
            for path in ("packed", "fakequant"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--config", name, "--bits",
                       str(bits), "--group-size", str(args.group_size), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device]
                # fixed mmap threshold: large tensors are mmapped and returned on free, so RSS shows what
                # is needed, not glibc heap fragmentation (which otherwise retains every freed transient)
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"worker {name}/{path}/w{bits} failed")
                got[path] = json.loads(line[0][7:])
            ratio = got["packed"][metric] / max(got["fakequant"][metric], 1e-9)
            mk = "model_cuda_mb" if args.device == "cuda" else "model_rss_mb"
            print(f"{name:8} {bits:>4} {got['packed']['quantized_weights'] / 1e6:>8.1f}M "
                  f"{got['packed'][metric]:>10.1f} {got['fakequant'][metric]:>13.1f} {ratio:>6.3f}   "
                  f"({got['packed'][mk]:.1f} / {got['fakequant'][mk]:.1f})")
            rows.append({"config": name, "bits": bits, "ratio": ratio, **{p: got[p] for p in got}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
