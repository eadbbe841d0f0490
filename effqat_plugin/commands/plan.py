"""`effqat plan MODEL`: host / device memory and disk per phase, from config.json alone."""
from __future__ import annotations

import argparse
import json
import os

USES_GPTQMODEL = False  # the CLI then skips importing GPTQModel at start-up (see env.quiet_third_party_logs)
DISTILL_TOPK = 64  # EQATConfig.e2e_distill_topk's default (config imports GPTQModel, which plan avoids)


def add_parser(sub) -> None:
    from effqat_plugin.gguf_presets import PRESETS as GGUF_PRESETS
    from effqat_plugin.memory_plan import PRESETS

    p = sub.add_parser("plan", help="memory and disk a quantize run will need, from the model config alone",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model folder, its config.json, a hub id (config only is fetched), or a preset: "
                                 + ", ".join(PRESETS))
    p.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=4096, help="Block-AP calibration samples")
    p.add_argument("--seq-len", type=int, default=2048, help="Block-AP tokens per sample")
    p.add_argument("--block-batch-size", type=int, default=2)
    p.add_argument("--e2e-samples", type=int, default=4096)
    p.add_argument("--e2e-seq-len", type=int, default=4096)
    p.add_argument("--e2e-batch-size", type=int, default=1, help="micro-batch on the device")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--offload-streams", action="store_true", help="plan with the streams in files on disk")
    p.add_argument("--self-generated", type=int, default=None, metavar="N",
                   help="self-generated samples to draw before Block-AP (default: --n-samples less the held-out "
                        "ones, as quantize's auto with --calib; 0 = none)")
    p.add_argument("--sample-memory", type=float, default=None, metavar="GIB",
                   help="memory the sampling model may use on the device (default: it fits whole); the rest "
                        "is offloaded by accelerate")
    p.add_argument("--e2e-distill", nargs="?", type=int, const=DISTILL_TOPK, default=0, metavar="TOPK",
                   help="plan for quantize --e2e-distill: the fp model's top-TOPK log-probabilities of every "
                        f"calibration token stay in host memory through E2E-QP (TOPK: {DISTILL_TOPK}, as "
                        "EQATConfig.e2e_distill_topk)")
    p.add_argument("--gguf-type", choices=list(GGUF_PRESETS), default=None,
                   help="plan quantize --format gguf --gguf-type at this llama.cpp preset: every tensor's type, "
                        "the file's size and E2E-QP's memory on those grids (--bits / --group-size unused)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def load_config(model: str) -> dict:
    from effqat_plugin.memory_plan import PRESETS

    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as e:  # noqa: BLE001 - offline or unknown id: one line for the user
        raise FileNotFoundError(f"no config for {model!r}: not a folder, config.json, preset or reachable hub id "
                                f"({type(e).__name__})") from None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(args) -> int:
    from effqat_plugin.memory_plan import GiB, Shape, plan

    cfg = load_config(args.model)
    try:
        shape = Shape.from_config(cfg)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{args.model}: config lacks a field the plan needs ({e})") from None
    n_self = args.self_generated
    if n_self is None:  # quantize --self-generated auto with --calib: the calibration's training split
        n_self = args.n_samples - min(16, args.n_samples // 8)
    cap = None if args.sample_memory is None else int(args.sample_memory * GiB)
    p = plan(shape, args.bits, args.group_size, args.n_samples, args.seq_len, args.block_batch_size,
             args.e2e_samples, args.e2e_seq_len, args.e2e_batch_size, args.device, args.offload_streams,
             self_generated=max(0, n_self), sample_cap=cap,
             distill_topk=args.e2e_distill, gguf_type=args.gguf_type)
    if args.json:
        print(json.dumps(p))
        return 0
    gib = lambda b: f"{b / GiB:8.1f}"  # noqa: E731
    grid = f"GGUF {args.gguf_type}" if args.gguf_type else f"w{args.bits}g{args.group_size}"
    print(f"{args.model}: {p['params'] / 1e9:.2f}B parameters, 16-bit checkpoint {p['checkpoint_16bit'] / GiB:.1f} GiB; "
          f"{grid}, Block-AP {args.n_samples} x {args.seq_len}, "
          f"E2E-QP {args.e2e_samples} x {args.e2e_seq_len} (micro-batch {args.e2e_batch_size}), device {args.device}")
    print(f"{'phase':<10}{'host GiB':>10}{'device GiB':>12}{'disk GiB':>10}")
    for phase in (("sample",) if "sample" in p else ()) + ("block_ap", "e2e_qp", "save"):
        row = p[phase]
        print(f"{phase:<10}{gib(row['host']):>10}{gib(row['device']):>12}{gib(row['disk']):>10}")
    if "sample" in p:
        sp = p["sample"]
        where = "offloaded by accelerate" if sp["placement"] == "offload" else "whole on the device"
        print(f"sampling {n_self} x {args.seq_len} self-generated tokens ({where}): "
              f"~{_duration(sp['seconds'])} (estimate from bandwidth and FLOP rates, memory_plan.SAMPLE_RATES)")
    if "gguf" in p:
        g = p["gguf"]
        types = ", ".join(f"{n} x {t}" for t, n in sorted(g["types"].items()))
        size = f"{g['file_bytes'] / GiB:.2f} GiB" if g["file_bytes"] >= GiB / 10 else f"{g['file_bytes'] / 2**20:.1f} MiB"
        print(f"GGUF {args.gguf_type}: tensors {size} (header and tokenizer on top); "
              f"decoder linears at {g['bpw']:.2f} bits per weight: {types}"
              + (f"; {g['fallbacks']} take a width fallback (in_features not a multiple of 256)"
                 if g["fallbacks"] else ""))
    if args.e2e_distill:
        print(f"E2E-QP distillation teacher: {p['block_ap']['teacher'] / GiB:.1f} GiB of host memory from Block-AP's "
              f"end through E2E-QP (top {args.e2e_distill} per token)")
    if not args.offload_streams:
        print(f"Block-AP activation streams: {p['block_ap']['streams'] / GiB:.1f} GiB of host memory "
              "(--offload-streams DIR moves them to disk)")
    return 0
