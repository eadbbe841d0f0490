"""Quality table: fp, RTN, GPTQModel GPTQ, AutoRound (default + light), EQAT Block-AP, EQAT Block-AP + E2E-QP.

Every row uses the same calibration tokens and the same held-out evaluation tokens, the same bits /
group size, and the same perplexity function. Every quantized row is a checkpoint on disk reloaded by
``GPTQModel.from_quantized`` (TORCH backend, fp16, CPU), i.e. what a user of the saved folder gets:

Quantized rows are evaluated on the weights GPTQModel unpacks (fp16), in fp32 (see ``reloaded_ppl``).

* GPTQ: GPTQModel 7.7's own GPTQ (sym=False, no act-order).
* AutoRound 0.16.1 (``pip install auto-round``): its default recipe (200 iterations) and its light one
  (50), asymmetric, exported ``format="auto_gptq"``; GPTQModel refuses asymmetric v1 folders not made
  by itself, so the export is converted with ``effqat convert --to gptq_v2`` (lossless) and loaded.
* EQAT: ``EQATConfig`` defaults. Block-AP runs once; its checkpoint is saved (the "Block-AP only" row),
  then E2E-QP continues on the same in-memory model exactly as ``run_eqat`` does (the full row).
* EQAT symmetric (method ``eqat-sym``, or ``--sym`` to add it): the same with ``sym=True`` (every zero
  point fixed at 2^(b-1), ``effqat quantize --sym``), i.e. what symmetric-only kernels can serve.
* Variants: ``--eqat-set KEY=VALUE`` changes the whole EQAT recipe (rows ``eqat[KEY=VALUE]``);
  ``--e2e-variant KEY=VALUE`` adds E2E-QP runs on the one Block-AP result (rows ``eqat[e2e:...]``).

Each quantizing method runs in a child process (a crash becomes a table note; memory is returned) and
leaves ``WORK/<config>/<method>.json``; a re-run with the same ``--work`` skips finished rows, so a long
grid can be run in pieces. Times are quantization only (no loading or evaluation): CPU seconds of the
child process (all its threads), shown as a ratio to GPTQ's, and wall seconds beside them; CPU time
holds when other jobs share the machine, wall time does not.

    python scripts/get_smollm2.py   # -> ~/.cache/effqat/smollm2-135m
    python scripts/bench_quality.py --model ~/.cache/effqat/smollm2-135m \\
        --text-calib ../shared/data/wikitext-2/valid.txt --text-eval ../shared/data/wikitext-2/test.txt \\
        --configs w2g64,w3g128,w4g128 --work runs/bench-smollm2
    python scripts/bench_quality.py            # stories260k, samples drawn from the model itself

On a machine shared with other jobs, run it as ``OMP_NUM_THREADS=1 nice -n 15 ...``: with more
threads than free cores, torch's OpenMP barriers spin and a Block-AP layer took 10x longer here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

from effqat_plugin.env import prepare_runtime_env

prepare_runtime_env()

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "effqat_plugin", "assets", "stories260k")
METHODS = ("fp", "rtn", "gptq", "autoround-light", "autoround", "eqat")
EXTRA_METHODS = ("eqat-sym",)   # run only when asked (--methods ... or --sym)
AUTOROUND_ITERS = {"autoround": 200, "autoround-light": 50}
LABELS = {"fp": "fp32", "rtn": "RTN (min/max)", "gptq": "GPTQModel GPTQ (sym=False)",
          "autoround-light": "AutoRound light (50 it), auto_gptq", "autoround": "AutoRound default (200 it), auto_gptq",
          "eqat-blockap": "EQAT Block-AP only", "eqat": "EQAT Block-AP + E2E-QP (default)",
          "eqat-sym-blockap": "EQAT --sym Block-AP only", "eqat-sym": "EQAT --sym Block-AP + E2E-QP"}


def label_of(method: str) -> str:
    base, bracket, variant = method.partition("[")
    return LABELS.get(base, base) + (f" [{variant}" if bracket else "")


def variant_suffix(settings, samples_from, e2e_variants=()) -> str:
    """What ``--eqat-set`` / ``--self-generated-from`` / ``--e2e-variant`` add to an EQAT row's name
    (and its cached result's file name), so variants share one work folder's data and its baseline
    rows: ``eqat[block_loss=channel_rms]``."""
    parts = [f"{k}={v}" for k, v in sorted((settings or {}).items())]
    if samples_from:
        parts.append("samples=" + os.path.splitext(os.path.basename(samples_from))[0])
    parts += [f"e2e:{spec}" for spec in e2e_variants or ()]
    return f"[{','.join(parts)}]" if parts else ""


def parse_settings(pairs, option: str = "--eqat-set") -> dict:
    """``--eqat-set KEY=VALUE`` pairs as EQATConfig overrides (VALUE read as JSON when it parses:
    numbers, true/false; else kept as a string)."""
    from effqat_plugin import EQATConfig

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in EQATConfig.__dataclass_fields__:
            raise SystemExit(f"{option} {pair!r}: expected KEY=VALUE with KEY an EQATConfig field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_e2e_variant(spec: str) -> dict:
    """``--e2e-variant KEY=VALUE[,KEY=VALUE]``: EQATConfig overrides for one extra E2E-QP run on the
    same Block-AP result; only E2E-QP's own fields (``e2e_*``), since Block-AP is not re-run."""
    out = parse_settings(spec.split(","), "--e2e-variant")
    bad = [k for k in out if not k.startswith("e2e_")]
    if bad:
        raise SystemExit(f"--e2e-variant {spec!r}: {bad} are not E2E-QP fields (e2e_*); use --eqat-set")
    return out


def parse_config(spec: str):
    b, g = spec.lower().lstrip("w").split("g")
    return int(b), int(g)


# ------------------------------------------------------------------------------------------------ eval
def ppl_all(model, evals: dict) -> dict:
    from effqat_plugin.evaluation import perplexity
    from effqat_plugin.runtime import resolve_runtime

    rt = resolve_runtime("cpu")
    return {label: perplexity(model, ids, 4, rt) for label, ids in evals.items()}


def reloaded_ppl(folder, evals):
    """Perplexities of a saved folder as GPTQModel loads it: ``GPTQModel.from_quantized`` (TORCH
    backend, fp16) unpacks every module, GPTQModel's own ``dequantize_model`` turns its TorchLinear
    modules into plain linears holding exactly the fp16 weights its kernel computes with, and the
    model is evaluated in fp32 like the fp row (fp16 matmuls on CPU took ~4x longer for the same text)."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import dequantize_model

    q = GPTQModel.from_quantized(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    return ppl_all(dequantize_model(q.model).float().eval(), evals)


def load_evals(work):
    from effqat_plugin.data import load_token_file

    with open(os.path.join(work, "evals.json")) as f:
        labels = json.load(f)
    return {label: load_token_file(os.path.join(work, f"eval_{label}.safetensors")) for label in labels}


# ------------------------------------------------------------------------------------------------ rows
class Clock:
    """Wall and CPU seconds (all threads of this process) since creation. CPU time is what the table
    compares: on a shared machine wall time depends on the neighbours, CPU time on the method."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def lap(self) -> dict:
        return {"seconds": time.time() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def fp_rows(model_dir, bits, group, calib, evals, out):
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [{"method": "fp", "ppl": ppl_all(fp, evals), "seconds": None, "note": ""}]


def rtn_rows(model_dir, bits, group, calib, evals, out):
    """Min/max round-to-nearest fake-quantized in fp32 (the quantizer's init; no checkpoint)."""
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
    return [{"method": "rtn", "ppl": ppl_all(model, evals), "seconds": None, "note": "fake-quant fp32"}]


def gptq_rows(model_dir, bits, group, calib, evals, out):
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(model_dir, QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False,
                                                     offload_to_disk=False), dtype=torch.float32)
    clock = Clock()
    model.quantize([{"input_ids": row.tolist()} for row in calib], batch_size=4)
    took = clock.lap()
    model.save(out)
    del model
    return [{"method": "gptq", "ppl": reloaded_ppl(out, evals), **took, "note": "sym=False"}]


def autoround_rows(method, model_dir, bits, group, calib, evals, out):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effqat_plugin.cli import main as effqat_main

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    iters = AUTOROUND_ITERS[method]
    clock = Clock()
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=False, iters=iters,
                   dataset=[row[None] for row in calib], nsamples=calib.shape[0], seqlen=calib.shape[1],
                   device_map="cpu")
    ar.quantize_and_save(out + ".auto_gptq", format="auto_gptq")
    took = clock.lap()
    del ar, model
    # AutoRound writes into a sub-folder named after the model and scheme
    export = next(root for root, _, files in os.walk(out + ".auto_gptq") if "config.json" in files)
    # GPTQModel 7.7 refuses asymmetric v1 folders it did not write; gptq_v2 (true zeros) loads
    rc = effqat_main(["convert", export, out, "--to", "gptq_v2"])
    if rc != 0:
        raise RuntimeError(f"effqat convert of the AutoRound export failed (exit {rc})")
    return [{"method": method, "ppl": reloaded_ppl(out, evals), **took,
             "note": f"iters={iters}, exported auto_gptq -> effqat convert --to gptq_v2"}]


def eqat_rows(model_dir, bits, group, calib, evals, out, text_calib=False, sym=False, settings=None,
              samples_from=None, e2e_variants=()):
    """Block-AP once (saved: the Block-AP-only row), then E2E-QP on the same in-memory model as
    ``eqat_run.run_eqat`` does (saved: the full row); EQATConfig defaults throughout (``settings``
    overrides some, ``--eqat-set``), and with text calibration both phases also train on as many
    self-generated samples, as ``effqat quantize`` does by default: drawn here in fp32 on the CPU, or
    read from ``samples_from`` (an ``effqat sample`` file, e.g. drawn in bf16). Sampling is not timed:
    the CLI does it once before Block-AP. Each of ``e2e_variants`` (``--e2e-variant``) is one more
    E2E-QP run from the same Block-AP state (restored in between), a row ``eqat[e2e:...]``: E2E-QP
    rules compared without re-running Block-AP, the cost of a row."""
    from gptqmodel import GPTQModel

    from effqat_plugin import EQATConfig
    from effqat_plugin.e2e_qp import E2EQP
    from effqat_plugin.eqat_run import (collect_qweights, sample_self_generated, split_calibration,
                                        with_self_generated)
    from effqat_plugin.runtime import resolve_runtime

    fmt = "gptq_v2" if bits == 3 else "gptq"
    settings = settings or {}
    full_cfg = EQATConfig(bits=bits, group_size=group, sym=sym, **settings)
    cfg = EQATConfig(bits=bits, group_size=group, sym=sym, **{**settings, "e2e_epochs": 0})
    name = "eqat-sym" if sym else "eqat"
    train_ids, val_ids = split_calibration(calib, full_cfg.block_val_samples)
    extra = None
    if text_calib and samples_from:
        from effqat_plugin.model_sampler import vocab_size_of
        from effqat_plugin.sample_file import check_against, read_sample_file

        extra = check_against(read_sample_file(samples_from), vocab_size_of(model_dir), calib.shape[1],
                              train_ids.shape[0])
    elif text_calib:  # as `effqat quantize --self-generated auto`: as many samples the fp model writes
        from transformers import AutoModelForCausalLM

        fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        extra = sample_self_generated(fp, train_ids.shape[0], calib.shape[1], full_cfg.seed)
        del fp
    e2e_ids = with_self_generated(full_cfg, train_ids, train_ids, extra)[1]
    model = GPTQModel.load(model_dir, cfg, dtype=torch.float32)
    clock = Clock()
    model.quantize(calib, show_progress=False, self_generated=extra)  # Block-AP trains on them too
    t_block = clock.lap()
    model.save(out + "-blockap", fmt=fmt)
    blk = model._eqat_result.block_ap
    rows = [{"method": f"{name}-blockap", **t_block, "note": f"lr s/z {blk.quant_lr:.3g}, w {blk.weight_lr:.3g}",
             "layers": [[r.train_loss, r.val_loss] for r in blk.reports],
             "lr_search": blk.lr_search}]
    block_state = ({k: v.detach().clone() for k, v in model.model.state_dict().items()}
                   if e2e_variants else None)
    folders = {}
    for spec in ("",) + tuple(e2e_variants):
        if spec:
            model.model.load_state_dict(block_state)
        run_cfg = dataclasses.replace(full_cfg, **parse_e2e_variant(spec)) if spec else full_cfg
        clock = Clock()
        rep = E2EQP(model.model, run_cfg, resolve_runtime(None), show_progress=False,
                    lr_fraction=blk.lr_fraction).run(e2e_ids, val_ids)
        t_e2e = clock.lap()
        result = model._eqat_result
        result.e2e = rep
        result.qweights = collect_qweights(model.model, result.qweights.keys())
        model.quantize_config = run_cfg
        row_name, folder = (f"{name}[e2e:{spec}]", f"{out}-e2e-{spec}") if spec else (name, out)
        model.save(folder, fmt=fmt)
        folders[row_name] = folder
        rows.append({"method": row_name, **{k: t_block[k] + t_e2e[k] for k in t_block},
                     "e2e": {"epochs_run": rep.epochs_run, "best_epoch": rep.best_epoch,
                             "val_loss_before": rep.val_loss_before, "val_loss_after": rep.val_loss_after},
                     "note": f"E2E-QP lr {rep.lr:.3g}, {rep.epochs_run} epochs (kept {rep.best_epoch}), {rep.steps} "
                             f"steps on {e2e_ids.shape[0]} samples ({e2e_ids.shape[0] - train_ids.shape[0]} self-generated)"})
    del model, block_state
    rows[0]["ppl"] = reloaded_ppl(out + "-blockap", evals)
    for row in rows[1:]:
        row["ppl"] = reloaded_ppl(folders[row["method"]], evals)
    return rows


def clear_leftovers(out: str) -> None:
    """Remove the folders an interrupted run of this row left (``out``, ``out-blockap``, ``out-e2e-*``,
    ``out.auto_gptq``): the row has no result file, so none of them is a result, and the savers refuse
    to overwrite a folder, which would fail the row only after its whole Block-AP."""
    stem = glob.escape(out)
    for path in [out, out + "-blockap", out + ".auto_gptq", *glob.glob(stem + "-e2e-*")]:
        if os.path.isdir(path):
            print(f"removing the leftover {path} of an interrupted run", flush=True)
            shutil.rmtree(path)


def child(method, model_dir, config, work, settings=None, samples_from=None, e2e_variants=()):
    from effqat_plugin.data import load_token_file

    bits, group = parse_config(config)
    calib = load_token_file(os.path.join(work, "calib.safetensors"))
    evals = load_evals(work)
    out = os.path.join(work, config, method + variant_suffix(settings, samples_from, e2e_variants))
    os.makedirs(os.path.join(work, config), exist_ok=True)
    clear_leftovers(out)
    fn = {"fp": fp_rows, "rtn": rtn_rows, "gptq": gptq_rows, "eqat": eqat_rows}.get(method)
    if method in ("eqat", "eqat-sym"):
        with open(os.path.join(work, "data.json")) as f:
            text = not str(json.load(f)["calib"][0]).startswith("sampled")
        fn = functools.partial(eqat_rows, text_calib=text, sym=method == "eqat-sym", settings=settings,
                               samples_from=samples_from, e2e_variants=e2e_variants)
    rows = (fn(model_dir, bits, group, calib, evals, out) if fn
            else autoround_rows(method, model_dir, bits, group, calib, evals, out))
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1, default=str)


def run_child(args, method, config) -> list:
    """The rows of one method (cached in WORK/<config>/<method>.json); a failure becomes a note row.
    With ``--cached-only`` a row not measured yet is left out instead of run."""
    variant = rows_suffix = ""
    if method.startswith("eqat"):
        settings = parse_settings(args.eqat_set)
        variant = variant_suffix(settings, args.self_generated_from, args.e2e_variant)
        rows_suffix = variant_suffix(settings, args.self_generated_from)
    result = os.path.join(args.work, config, method + variant + ".json")
    if not os.path.exists(result) and args.cached_only:
        print(f"  {config} {method}: not measured in {args.work} (left out)", flush=True)
        return []
    if not os.path.exists(result):
        log = os.path.join(args.work, config, method + variant + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--model", args.model,
               "--configs", config, "--work", args.work]
        if variant:
            cmd += [f"--eqat-set={pair}" for pair in args.eqat_set]
            cmd += [f"--self-generated-from={args.self_generated_from}"] if args.self_generated_from else []
            cmd += [f"--e2e-variant={spec}" for spec in args.e2e_variant]
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"  {config} {method}: exit {rc} after {time.time() - t0:.0f}s (log {log})", flush=True)
        if rc != 0 or not os.path.exists(result):
            with open(log, errors="replace") as f:
                errs = [ln.strip() for ln in f if "Error" in ln]
            note = "failed: " + (errs[-1][:120] if errs else f"exit {rc}")
            return [{"method": method + variant, "ppl": {}, "seconds": None, "note": note}]
    with open(result) as f:
        rows = json.load(f)
    for r in rows:  # a variant's rows are named after it (LABELS then shows the plain method's label + it)
        if rows_suffix:  # eqat -> eqat[k=v], eqat[e2e:x] -> eqat[k=v,e2e:x]
            base, bracket, rest = r["method"].partition("[")
            r["method"] = base + rows_suffix[:-1] + ("," + rest if bracket else "]")
    return rows


# ------------------------------------------------------------------------------------------------ data
def prepare_data(args):
    """calib.safetensors and eval_<label>.safetensors in WORK (kept: every row reads the same tokens).
    Evaluation sets named in a later run are added; rows finished before then lack them (re-run those)."""
    from transformers import AutoModelForCausalLM

    from effqat_plugin.data import load_token_file, sample_from_model, save_token_file
    from effqat_plugin.evaluation import data_label, load_eval_ids, load_tokenizer_for

    os.makedirs(args.work, exist_ok=True)
    labels_path = os.path.join(args.work, "evals.json")
    labels = []
    if os.path.exists(labels_path):
        with open(labels_path) as f:
            labels = json.load(f)
    wanted = [(spec, args.n_eval) for spec in args.text_eval] + [(spec, args.n_ood) for spec in args.text_ood]
    missing = [(spec, n) for spec, n in wanted if data_label(spec) not in labels]
    if labels and not missing:
        return
    tok = load_tokenizer_for(args.model)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if not labels:
        if args.text_calib:
            calib = load_token_file(args.text_calib, tok, seq_len=args.calib_len, n_samples=args.n_calib)
        else:
            calib = sample_from_model(fp, args.n_calib, args.calib_len, seed=0)
        save_token_file(os.path.join(args.work, "calib.safetensors"), calib)
    for spec, n in missing:
        label = data_label(spec)
        save_token_file(os.path.join(args.work, f"eval_{label}.safetensors"),
                        load_eval_ids(spec, tok, seq_len=args.eval_len, n_samples=n))
        labels.append(label)
    if args.n_selfgen and "self-generated" not in labels:
        # out of domain for text calibration: what the model itself writes (seed 1; the calibration never sees it)
        save_token_file(os.path.join(args.work, "eval_self-generated.safetensors"),
                        sample_from_model(fp, args.n_selfgen, args.eval_len, seed=1))
        labels.append("self-generated")
    with open(labels_path, "w") as f:
        json.dump(labels, f)
    calib = load_token_file(os.path.join(args.work, "calib.safetensors"))
    sources = {data_label(spec): source_name(spec) for spec, _ in wanted}
    sources["self-generated"] = "text the fp model writes, seed 1"
    with open(os.path.join(args.work, "data.json"), "w") as f:
        json.dump({"calib": [args.text_calib or "sampled from the model (seed 0)", list(calib.shape)],
                   "eval": {lb: list(load_token_file(os.path.join(args.work, f"eval_{lb}.safetensors")).shape)
                            for lb in labels},
                   "sources": {lb: sources.get(lb, lb) for lb in labels}}, f)


def source_name(path: str) -> str:
    """A data file as a table names it: its folder and file name (``wikitext-2/test.txt``)."""
    path = os.path.normpath(str(path))
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def gptq_cpu_seconds(rows):
    """GPTQ's quantization CPU time in one config's rows: what the other methods' times are divided by."""
    return next((r["cpu_seconds"] for r in rows if r["method"] == "gptq" and r.get("cpu_seconds")), None)


def format_table(args, results) -> str:
    with open(os.path.join(args.work, "data.json")) as f:
        data = json.load(f)
    labels = list(data["eval"])
    head = ["config", "method"] + [f"{lb} ppl" for lb in labels] + ["quantize CPU time", "CPU time / GPTQ",
                                                                     "wall time", "note"]
    lines = [f"model {os.path.basename(os.path.normpath(args.model))}; calibration {data['calib'][1][0]} x "
             f"{data['calib'][1][1]} tokens of {os.path.basename(str(data['calib'][0]))}; eval "
             + ", ".join(f"{lb} {s[0]} x {s[1]}" for lb, s in data["eval"].items()),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, rows in results.items():
        gptq = gptq_cpu_seconds(rows)
        for r in rows:
            ppl = [f"{r['ppl'][lb]:,.2f}" if lb in r.get("ppl", {}) and math.isfinite(r["ppl"][lb]) else "n/a"
                   for lb in labels]
            sec, wall = r.get("cpu_seconds"), r.get("seconds")
            ratio = f"{sec / gptq:.2f}x" if sec and gptq else "–"
            lines.append("| " + " | ".join([config if r["method"] != "fp" else "–", label_of(r["method"]),
                                            *ppl, f"{sec:.0f} s" if sec else "–", ratio,
                                            f"{wall:.0f} s" if wall else "–", r.get("note", "")]) + " |")
    return "\n".join(lines)


def reference_table(args, results) -> dict:
    """The table as data (``effqat_plugin.model_card.reference_section`` renders one config of it):
    what was measured on which tokens, and per config each method's perplexities and CPU time as a
    ratio to that config's GPTQ row."""
    with open(os.path.join(args.work, "data.json")) as f:
        data = json.load(f)
    sources = data.get("sources", {})
    calib_src, (n, t) = data["calib"]
    out = {"schema": "effqat-reference-quality/1", "made_by": "scripts/bench_quality.py",
           "model": os.path.basename(os.path.normpath(args.model)),
           "calibration": f"{n} x {t} tokens of {source_name(calib_src) if os.sep in str(calib_src) else calib_src}",
           "evaluation": {lb: f"{s[0]} x {s[1]} tokens of {sources.get(lb, lb)}" for lb, s in data["eval"].items()},
           "fp": None, "configs": {}}
    ppl = lambda r: {lb: round(v, 2) for lb, v in r["ppl"].items() if math.isfinite(v)}  # noqa: E731
    for config, rows in results.items():
        gptq = gptq_cpu_seconds(rows)
        out["fp"] = next((ppl(r) for r in rows if r["method"] == "fp" and r.get("ppl")), out["fp"])
        out["configs"][config] = [
            {"method": r["method"], "label": label_of(r["method"]), "ppl": ppl(r),
             "cpu_time_vs_gptq": round(r["cpu_seconds"] / gptq, 2) if r.get("cpu_seconds") and gptq else None}
            for r in rows if r.get("ppl") and r["method"] != "fp"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--text-calib", help="calibration text (.txt/.jsonl/.parquet) or .safetensors input_ids; "
                                         "default: sampled from the model (seed 0)")
    ap.add_argument("--text-eval", action="append", default=[], help="evaluation text or token file; repeatable")
    ap.add_argument("--text-ood", action="append", default=[],
                    help="out-of-domain evaluation text (e.g. scripts/get_ood_text.py's KJV); repeatable")
    ap.add_argument("--n-ood", type=int, default=16, help="samples of each --text-ood")
    ap.add_argument("--n-selfgen", type=int, default=None,
                    help="also evaluate on this many self-generated samples (default: 8 with --text-eval, else 32)")
    ap.add_argument("--configs", default="w2g64", help="comma separated, e.g. w2g64,w3g128,w4g128")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma separated subset of {','.join(METHODS + EXTRA_METHODS)}")
    ap.add_argument("--sym", action="store_true", help="also run EQAT with --sym (method eqat-sym)")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--work", default="runs/bench-quality", help="work folder (checkpoints, logs, per-row results)")
    ap.add_argument("--json", help="also write the table as JSON here (the form of the reference table that "
                                   "model cards quote: effqat_plugin/assets/reference_quality.json)")
    ap.add_argument("--cached-only", action="store_true",
                    help="build the table from the rows already measured in --work; run nothing")
    ap.add_argument("--eqat-set", action="append", default=[], metavar="KEY=VALUE",
                    help="EQATConfig override for the EQAT rows (repeatable), e.g. block_loss=channel_rms; "
                         "the rows are named eqat[KEY=VALUE] and cached beside the plain ones")
    ap.add_argument("--self-generated-from", metavar="FILE",
                    help="the EQAT rows' self-generated samples from this `effqat sample` file (e.g. drawn with "
                         "--dtype bfloat16) instead of drawn here in fp32")
    ap.add_argument("--e2e-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="one more E2E-QP run on the same Block-AP result with these e2e_* overrides "
                         "(repeatable), e.g. e2e_max_auto_epochs=2; rows eqat[e2e:...]")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for spec in args.e2e_variant:  # a bad one stops here with one line, not as a failed row after Block-AP
        parse_e2e_variant(spec)
    if args.child:
        child(args.child, args.model, args.configs, args.work, parse_settings(args.eqat_set),
              args.self_generated_from, args.e2e_variant)
        return 0
    if args.n_selfgen is None:
        args.n_selfgen = 8 if args.text_eval else 32
    methods = [m for m in args.methods.split(",") if m]
    if args.sym and "eqat-sym" not in methods:
        methods.append("eqat-sym")
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; use {METHODS + EXTRA_METHODS}")
    prepare_data(args)
    results = {}
    for config in args.configs.split(","):
        parse_config(config)
        results[config] = []
        for m in methods:
            if m == "fp" and config != args.configs.split(",")[0]:
                continue
            results[config] += run_child(args, m, config)
    table = format_table(args, results)
    print(table)
    with open(os.path.join(args.work, "table.md"), "w") as f:
        f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reference_table(args, results), f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
