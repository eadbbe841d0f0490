#!/usr/bin/env python
"""Benchmark effqat's packed low-bit kernels against fp16 F.linear and GPTQModel's TORCH/TRITON kernels.

On a CUDA machine, for Llama-2-7B/70B linear shapes (out x in) 4096x4096, 11008x4096, 8192x8192,
28672x8192 at 1 / 16 / 2048 tokens, prints the median time of
  * fp16 ``F.linear`` (dense weight),
  * effqat dequant-GEMM (2/3/4-bit) through the ``triton`` and ``cuda`` backends,
  * GPTQModel 7.7 TorchLinear (TORCH) and TritonV2Linear (TRITON) on the same integers (2/4-bit;
    GPTQ's 3-bit is a different bit stream, reported as n/a),
  * the memory-bandwidth floor: bytes the op must move / measured device copy bandwidth,
and with ``--e2e`` the E2E-QP training step (forward + backward to the step sizes) of
PackedQuantLinear vs the fake-quant path (torch dequantize-then-matmul every step) with peak memory.

Targets (issue 4): >= 3x over fp16 at batch 1 for w2; E2E-QP step <= 1.2x fake-quant at <= its memory.
Paper anchor: INT2 GEMV 2.9-4.4x faster than FP16 on A100 (BitBLAS).

Without CUDA the script runs its CPU-side setup only (argument parsing, weight generation and
packing on shrunken shapes, a reference-path correctness check) and says so; ``--dry-run`` forces that.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from effqat_plugin import kernels as K
from effqat_plugin.kernels import reference as R

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "8192x8192": (8192, 8192),
          "28672x8192": (28672, 8192)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of OUTxIN shapes")
    ap.add_argument("--batches", default="1,16,2048", help="comma list of token counts")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--backends", default="triton,cuda", help="effqat backends to time")
    ap.add_argument("--no-gptq", action="store_true", help="skip GPTQModel kernels")
    ap.add_argument("--e2e", action="store_true", help="also time the E2E-QP training step")
    ap.add_argument("--e2e-tokens", type=int, default=4096)
    ap.add_argument("--dry-run", action="store_true", help="CPU-side setup only")
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    a = ap.parse_args(argv)
    a.shape_list = []
    for s in a.shapes.split(","):
        s = s.strip()
        if s in SHAPES:
            a.shape_list.append((s, SHAPES[s]))
        else:
            o, i = (int(v) for v in s.lower().split("x"))
            a.shape_list.append((s, (o, i)))
    a.batch_list = [int(b) for b in a.batches.split(",")]
    a.bits_list = [int(b) for b in a.bits.split(",")]
    a.backend_list = [b.strip() for b in a.backends.split(",") if b.strip()]
    a.torch_dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    for b in a.bits_list:
        K.values_per_word(b)
    for b in a.backend_list:
        if b not in K.BACKENDS:
            ap.error(f"unknown backend {b}")
    return a


def make_weights(out_f, in_f, bits, gs, device, seed=0):
    """Random codes / zeros / scales; packs on the target device (cheap on GPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    maxq = (1 << bits) - 1
    ng = R.n_groups(gs, in_f)
    w = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8).to(device)
    z = torch.randint(0, maxq + 1, (out_f, ng), generator=g, dtype=torch.uint8).to(device)
    s = (torch.rand(out_f, ng, generator=g) * 0.01 + 0.001).to(device)
    return w, K.pack_int_weight(w, bits), z, s


def time_cuda(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # us
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cuda(lambda: dst.copy_(src), 20, 5)
    del src, dst
    return 2 * (1 << 30) / (us * 1e-6)


def gptq_modules(w_int, z, s, bits, gs, dtype):
    """GPTQModel TorchLinear / TritonV2Linear on the same integers (v1 zero convention z-1)."""
    mods = {}
    if bits not in (2, 4, 8):
        return mods
    import os
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    try:
        from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear
    except Exception:  # noqa: BLE001
        TritonV2Linear = None
    out_f, in_f = w_int.shape
    pf = 32 // bits
    qweight = K.pack_int_weight(w_int, bits)  # same bytes as GPTQ qweight for 2/4/8 bits
    zm1 = ((z.to(torch.int32) - 1) & ((1 << bits) - 1)).to(torch.uint8)  # v1 stores z - 1
    qzeros = K.pack_int_weight(zm1, bits).t().contiguous()  # [n_groups, out/pf]
    assert qzeros.shape[1] == -(-out_f // pf)
    for name, cls in (("gptq_torch", TorchLinear), ("gptq_triton", TritonV2Linear)):
        if cls is None:
            continue
        try:
            m = cls(bits=bits, group_size=gs, sym=False, desc_act=False, in_features=in_f,
                    out_features=out_f, bias=False)
            m.qweight.copy_(qweight.cpu())
            m.qzeros.copy_(qzeros.cpu())
            m.scales.copy_(s.t().to(torch.float16).cpu())
            m.g_idx.copy_(torch.arange(in_f, dtype=torch.int32) // gs)
            m = m.to("cuda")
            m.post_init()
            mods[name] = m
        except Exception as e:  # noqa: BLE001
            print(f"  [{name}] unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return mods


def bench_linear(a, results):
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s  "
          f"dtype {a.dtype}  group {a.group_size}")
    hdr = f"{'shape':>11} {'M':>5} {'what':>18} {'us':>10} {'vs fp16':>8} {'floor us':>9}"
    print(hdr)
    esz = 2
    for sname, (out_f, in_f) in a.shape_list:
        dense = (torch.randn(out_f, in_f, device="cuda") * 0.02).to(a.torch_dtype)
        for M in a.batch_list:
            x = torch.randn(M, in_f, device="cuda", dtype=a.torch_dtype)
            io_bytes = (M * in_f + M * out_f) * esz
            t16 = time_cuda(lambda: F.linear(x, dense), a.iters, a.warmup)
            floor16 = (out_f * in_f * esz + io_bytes) / bw * 1e6
            print(f"{sname:>11} {M:>5} {'fp16 F.linear':>18} {t16:>10.1f} {1.0:>8.2f} {floor16:>9.1f}")
            results.append(dict(shape=sname, M=M, what="fp16", us=t16, floor_us=floor16))
            for bits in a.bits_list:
                w_int, packed, z, s = make_weights(out_f, in_f, bits, a.group_size, "cuda")
                ng = s.shape[1]
                qbytes = packed.numel() * 4 + ng * out_f * (1 + 4) + io_bytes
                floor = qbytes / bw * 1e6
                for be in a.backend_list:
                    if K.active_backend("cuda", be) != be:
                        print(f"{sname:>11} {M:>5} {f'effqat w{bits} {be}':>18} {'n/a':>10}")
                        continue
                    fn = lambda: K.qlinear(x, packed, s, z, bits, a.group_size, in_f, backend=be)  # noqa: E731
                    with torch.no_grad():
                        t = time_cuda(fn, a.iters, a.warmup)
                    print(f"{sname:>11} {M:>5} {f'effqat w{bits} {be}':>18} {t:>10.1f} "
                          f"{t16 / t:>8.2f} {floor:>9.1f}")
                    results.append(dict(shape=sname, M=M, what=f"effqat_w{bits}_{be}", us=t,
                                        speedup=t16 / t, floor_us=floor))
                if not a.no_gptq:
                    mods = gptq_modules(w_int, z, s, bits, a.group_size, a.torch_dtype)
                    if bits == 3:
                        print(f"{sname:>11} {M:>5} {'gptq w3':>18} {'n/a':>10}  (GPTQ 3-bit is a "
                              f"different bit stream)")
                    for name, m in mods.items():
                        xh = x.to(torch.float16)
                        try:
                            with torch.no_grad():
                                t = time_cuda(lambda: m(xh), a.iters, a.warmup)
                        except Exception as e:  # noqa: BLE001
                            print(f"  [{name}] failed: {type(e).__name__}: {e}", file=sys.stderr)
                            continue
                        print(f"{sname:>11} {M:>5} {f'{name} w{bits}':>18} {t:>10.1f} "
                              f"{t16 / t:>8.2f} {floor:>9.1f}")
                        results.append(dict(shape=sname, M=M, what=f"{name}_w{bits}", us=t,
                                            speedup=t16 / t, floor_us=floor))
                    del mods
                del w_int, packed, z, s
                torch.cuda.empty_cache()
        del dense


def bench_e2e(a, results):
    """E2E-QP step on one linear: forward + backward to s (and x) vs fake-quant in torch."""
    print(f"\nE2E-QP step (fwd+bwd, grads to x and s), {a.e2e_tokens} tokens, {a.dtype}")
    print(f"{'shape':>11} {'bits':>4} {'path':>22} {'ms':>8} {'peak MiB':>9} {'ratio':>6}")
    for sname, (out_f, in_f) in a.shape_list:
        for bits in a.bits_list:
            w_int, packed, z, s0 = make_weights(out_f, in_f, bits, a.group_size, "cuda")
            gs = a.group_size
            x0 = torch.randn(a.e2e_tokens, in_f, device="cuda", dtype=a.torch_dtype)

            def fake_quant_step():
                s = s_fq
                zz = z.to(a.torch_dtype).repeat_interleave(gs, 1)[:, :in_f]
                ss = s.repeat_interleave(gs, 1)[:, :in_f]
                w = ((w_int.to(a.torch_dtype) - zz) * ss).to(a.torch_dtype)
                y = F.linear(x_fq, w)
                y.float().pow(2).mean().backward()

            def ours_step():
                y = K.qlinear(x_ours, packed, s_ours, z, bits, gs, in_f)
                y.float().pow(2).mean().backward()

            rows = {}
            for name, step in (("fake-quant (torch)", fake_quant_step), ("effqat qlinear", ours_step)):
                s_fq = s0.clone().requires_grad_(True)
                s_ours = s0.clone().requires_grad_(True)
                x_fq = x0.clone().requires_grad_(True)
                x_ours = x0.clone().requires_grad_(True)
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                n = max(3, a.iters // 5)
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / n * 1e3
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows[name] = (ms, peak)
            ref_ms = rows["fake-quant (torch)"][0]
            for name, (ms, peak) in rows.items():
                print(f"{sname:>11} {bits:>4} {name:>22} {ms:>8.2f} {peak:>9.0f} {ms / ref_ms:>6.2f}")
                results.append(dict(shape=sname, bits=bits, what=f"e2e_{name}", ms=ms, peak_mib=peak))
            del w_int, packed, z, s0, x0
            torch.cuda.empty_cache()


def dry_run(a):
    """CPU-side setup: shrunken shapes, pack, reference forward vs dense fp32."""
    print("CPU-side setup only (no CUDA or --dry-run): shapes shrunk 64x, reference backend")
    for sname, (out_f, in_f) in a.shape_list:
        o, i = max(8, out_f // 64), max(a.group_size, in_f // 64)
        for bits in a.bits_list:
            w_int, packed, z, s = make_weights(o, i, bits, a.group_size, "cpu")
            dense = R.dequantize(packed, s, z, bits, a.group_size, i, torch.float32)
            x = torch.randn(3, i)
            y = K.qlinear(x, packed, s, z, bits, a.group_size, i, backend="reference")
            err = (y - x @ dense.t()).abs().max().item()
            mb = packed.numel() * 4 / 2**20
            print(f"  {sname} -> {o}x{i} w{bits}: packed {tuple(packed.shape)} ({mb:.2f} MiB, "
                  f"{packed.numel() * 32 / (o * i):.2f} bits/weight)  max|err| {err:.2e}")
            assert err < 1e-4
    print("CUDA benchmarks skipped: run scripts/gpu_checks.sh on a machine with a GPU.")


def main(argv=None):
    a = parse_args(argv)
    results = []
    if a.dry_run or not torch.cuda.is_available():
        dry_run(a)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    bench_linear(a, results)
    if a.e2e:
        bench_e2e(a, results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
