"""Quality table on one model: fp, RTN, GPTQModel's GPTQ, EQAT Block-AP, EQAT Block-AP + E2E-QP.

Every row uses the same calibration and held-out evaluation token data (sampled from the fp model
itself unless files are given), the same bits / group size, and is scored by the same perplexity
function. The GPTQ and EQAT rows are measured on checkpoints reloaded by `GPTQModel.from_quantized`
(TORCH backend), i.e. what a user of the saved folder gets.

    python scripts/bench_quality.py --bits 2 --group-size 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from effqat_plugin.env import prepare_runtime_env

prepare_runtime_env()

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "effqat_plugin", "assets", "stories260k")


def ppl_of(model, ids, rt):
    from effqat_plugin.evaluation import perplexity

    return perplexity(model, ids, 8, rt)


def reloaded_ppl(folder, ids, rt):
    """Perplexity of a saved folder as GPTQModel users load it (TORCH backend, fp16, CPU)."""
    from gptqmodel import BACKEND, GPTQModel

    q = GPTQModel.from_quantized(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    return ppl_of(q.model, ids, rt)


def rtn_row(model_dir, bits, group, ids, rt):
    from transformers import AutoModelForCausalLM

    from effqat_plugin.layout import resolve_layout
    from effqat_plugin.quantizer import rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layout = resolve_layout(model)
    with torch.no_grad():
        for layer in layout.layers:
            for name in layout.linear_names:
                lin = layer.get_submodule(name)
                lin.weight.copy_(rtn_quantize(lin.weight, bits, group).dequantize())
    return ppl_of(model, ids, rt)


def gptq_row(model_dir, bits, group, calib, ids, rt, work):
    """GPTQModel's own GPTQ, run in a child process: its packer can crash the process outright on
    shapes it does not support (3-bit with out_features 172), which must become a table note."""
    import subprocess

    from effqat_plugin.data import save_token_file

    save_token_file(os.path.join(work, "calib.safetensors"), calib)
    save_token_file(os.path.join(work, "eval.safetensors"), ids)
    out = os.path.join(work, "gptq")
    cmd = [sys.executable, os.path.abspath(__file__), "--gptq-child", out, "--model", model_dir,
           "--bits", str(bits), "--group-size", str(group), "--calib", os.path.join(work, "calib.safetensors"),
           "--eval-data", os.path.join(work, "eval.safetensors")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    result = os.path.join(out + ".json")
    if run.returncode == 0 and os.path.exists(result):
        with open(result) as f:
            return json.load(f)["ppl"], "sym=False, same calibration"
    errors = [ln for ln in (run.stderr or "").splitlines() if "Error" in ln]
    return float("nan"), "GPTQModel failed: " + (errors[-1][:100] if errors else f"exit {run.returncode}")


def gptq_child(out, model_dir, bits, group, calib, ids, rt):
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(model_dir, QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False,
                                                     offload_to_disk=False), dtype=torch.float32)
    model.quantize([{"input_ids": row.tolist()} for row in calib], batch_size=4)
    model.save(out)
    with open(out + ".json", "w") as f:
        json.dump({"ppl": reloaded_ppl(out, ids, rt)}, f)


def eqat_row(model_dir, bits, group, calib, ids, rt, work, e2e_epochs, extra):
    from gptqmodel import GPTQModel

    from effqat_plugin import EQATConfig

    cfg = EQATConfig(bits=bits, group_size=group, e2e_epochs=e2e_epochs, **extra)
    model = GPTQModel.load(model_dir, cfg, dtype=torch.float32)
    t0 = time.time()
    model.quantize(calib, show_progress=False)
    seconds = time.time() - t0
    out = os.path.join(work, f"eqat-e2e{e2e_epochs}")
    model.save(out, fmt="gptq_v2" if bits == 3 else "gptq")
    return reloaded_ppl(out, ids, rt), f"{seconds:.0f}s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib", help=".safetensors input_ids for calibration (default: sampled, seed 0)")
    ap.add_argument("--eval-data", help=".safetensors input_ids for evaluation (default: sampled, seed 1)")
    ap.add_argument("--e2e-epochs", type=int, default=None, help="default: EQATConfig's")
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--gptq-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from effqat_plugin.config import EQATConfig
    from effqat_plugin.data import load_token_file, sample_from_model
    from effqat_plugin.runtime import resolve_runtime

    rt = resolve_runtime("cpu")
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = (load_token_file(args.calib) if args.calib
             else sample_from_model(fp, args.n_calib, args.seq_len, seed=0))
    ids = (load_token_file(args.eval_data) if args.eval_data
           else sample_from_model(fp, args.n_eval, args.seq_len, seed=1))
    if args.gptq_child:
        gptq_child(args.gptq_child, args.model, args.bits, args.group_size, calib, ids, rt)
        return 0
    e2e_epochs = EQATConfig.__dataclass_fields__["e2e_epochs"].default if args.e2e_epochs is None else args.e2e_epochs
    rows = [("fp32", ppl_of(fp, ids, rt), "")]
    b, g = args.bits, args.group_size
    rows.append((f"RTN w{b}g{g}", rtn_row(args.model, b, g, ids, rt), "min/max init, no training"))
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_gptq:
            p, note = gptq_row(args.model, b, g, calib, ids, rt, work)
            rows.append((f"GPTQModel GPTQ w{b}g{g}", p, note or "sym=False, same calibration"))
        p, note = eqat_row(args.model, b, g, calib, ids, rt, work, 0, {})
        rows.append((f"EQAT Block-AP w{b}g{g}", p, note))
        p, note = eqat_row(args.model, b, g, calib, ids, rt, work, e2e_epochs, {})
        rows.append((f"EQAT Block-AP + E2E-QP w{b}g{g}", p, note))
    print(f"\nperplexity on {ids.shape[0]} x {ids.shape[1]} held-out tokens; calibration {tuple(calib.shape)}; "
          f"model {os.path.basename(os.path.normpath(args.model))}")
    print(f"| {'method':<34} | {'ppl':>10} | note")
    print(f"|{'-' * 36}|{'-' * 12}|------")
    for name, p, note in rows:
        shown = "n/a" if math.isnan(p) else f"{p:10.2f}"
        print(f"| {name:<34} | {shown:>10} | {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"method": n, "ppl": p, "note": note} for n, p, note in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
