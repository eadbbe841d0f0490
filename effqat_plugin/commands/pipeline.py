"""`effqat pipeline MODEL OUT_ROOT`: fp -> Block-AP -> E2E-QP -> formats -> evaluation -> push, resumable.

    effqat pipeline MODEL OUT_ROOT --bits 2 --group-size 64 [--calib FILE] [--e2e-data FILE]
                    [--formats gptq,gptq_v2,bitblas,eqat,compressed-tensors] [--eval-data FILE ...] [--push USER/PREFIX]

Layout of OUT_ROOT (NAME = MODEL's name + ``-EfficientQAT-w{bits}g{group}``):

    NAME-gptq_v2/          Block-AP + E2E-QP result (true zero points); every other format is converted
                           from it (kept as the pipeline's master copy even when not in --formats)
    NAME-blockap-gptq_v2/  Block-AP only, when --e2e-data runs E2E-QP as its own stage (`effqat e2e`)
    NAME-gptq/, NAME-bitblas/, NAME-eqat/   the requested formats
    reports/               fp results, quality_table.json, quality.png, block_ap_loss.png
    pipeline.json          what the last run did (stages run / skipped / failed, outputs, commits)

Every stage writes its output atomically and then a ``.effqat_stage.json`` marker with a hash of its
inputs and settings; a re-run skips a stage whose marker matches and redoes it (and every stage
after it) when anything it depends on changed. ``--force`` redoes everything.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

from effqat_plugin.commands.quantize import add_training_arguments
from effqat_plugin.jsonio import STAGE_MARKER, read_json_or_empty, write_json_atomic
from effqat_plugin.reports import eqat_meta

log = logging.getLogger("effqat.pipeline")

ALL_FORMATS = ("gptq", "gptq_v2", "bitblas", "eqat", "compressed-tensors")
MASTER_FORMAT = "gptq_v2"
PUSH_MARKER = ".effqat_push.json"
REPO_SUFFIX = {"eqat": "EQAT", "gptq": "GPTQ", "gptq_v2": "GPTQv2", "bitblas": "BitBLAS",
               "compressed-tensors": "CT"}


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="quantize, E2E-QP, convert, evaluate and push in one resumable command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="fp HF model folder or hub id")
    p.add_argument("out_root", help="folder for every stage's output (created)")
    add_training_arguments(p)
    p.add_argument("--formats", default="gptq,gptq_v2,bitblas,eqat",
                   help="comma separated, from: " + ",".join(ALL_FORMATS))
    p.add_argument("--name", default=None, help="base name of the outputs (default: MODEL's name)")
    p.add_argument("--e2e-data", default=None,
                   help="E2E-QP training data; runs E2E-QP as its own stage (`effqat e2e`) on the Block-AP "
                        "output. Default: E2E-QP on the calibration data inside the quantize stage")
    p.add_argument("--e2e-seq-len", type=int, default=None, help="with --e2e-data (default: --seq-len)")
    p.add_argument("--eval-data", action="append", default=[], help="evaluation file (repeatable)")
    p.add_argument("--eval-dataset", action="append", default=[], help="`datasets` name to evaluate on")
    p.add_argument("--eval-seq-len", type=int, default=None, help="default: --seq-len")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--tasks", default=None, help="lm-eval tasks ('paper' = the paper's five); needs effqat[eval]")
    p.add_argument("--push", default=None, metavar="USER/PREFIX",
                   help="push every format to USER/PREFIX-<GPTQ|GPTQv2|BitBLAS|EQAT>")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--push-dry-run", action="store_true", help="print what would be pushed; no network")
    p.add_argument("--base-model", default=None, help="hub id of MODEL for the cards (default: MODEL)")
    p.add_argument("--endpoint", default=None, help="hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_fingerprint(path: Optional[str]) -> Optional[dict]:
    """Identity of a data file: path, size, and a hash of its first and last MiB (cheap on big files)."""
    if not path:
        return None
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(p), "size": st.st_size, "sha256_ends": h.hexdigest()}


def model_fingerprint(model: str) -> dict:
    if not os.path.isdir(model):
        return {"hub_id": model}
    p = Path(model).resolve()
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir())
             if f.name.endswith((".safetensors", ".json")) and not f.name.startswith(".")}
    return {"path": str(p), "files": files}


def read_marker(folder: Path) -> dict:
    return read_json_or_empty(folder / STAGE_MARKER)


def stage_done(folder: Path, key: str) -> bool:
    return folder.is_dir() and read_marker(folder).get("key") == key


def write_marker(folder: Path, stage: str, key: str, **info) -> None:
    data = {"stage": stage, "key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_json_atomic(folder / STAGE_MARKER, data, default=str)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.out_root)
        self.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        bad = [f for f in self.formats if f not in ALL_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"--formats: unknown {bad}; choose from {','.join(ALL_FORMATS)}")
        base = args.name or Path(args.model.rstrip("/")).name
        self.name = f"{base}-EfficientQAT-w{args.bits}g{args.group_size}"
        self.base_model = args.base_model or args.model
        self.stages: List[dict] = []
        self.failed: Dict[str, str] = {}
        self.calib_desc = (f"{Path(args.calib).name}" if args.calib
                           else "sequences sampled from the fp model itself (data-free default)")

    # -- helpers ---------------------------------------------------------------------------------
    def folder(self, fmt: str, blockap: bool = False) -> Path:
        return self.root / (f"{self.name}-blockap-{fmt}" if blockap else f"{self.name}-{fmt}")

    def note(self, stage: str, status: str, **info) -> None:
        self.stages.append({"stage": stage, "status": status, **info})
        log.info("stage %-22s %s%s", stage, status, "" if not info.get("output") else f" -> {info['output']}")

    def common_marker(self) -> dict:
        return {"base_model": self.base_model, "calibration": self.calib_desc,
                "e2e_data": Path(self.args.e2e_data).name if self.args.e2e_data else None}

    # -- stages ----------------------------------------------------------------------------------
    def quantize(self) -> tuple:
        a = self.args
        separate_e2e = bool(a.e2e_data) and a.e2e_epochs > 0
        from effqat_plugin.commands.quantize import config_from_args, streamed_quantization, train

        cfg = config_from_args(a, MASTER_FORMAT, e2e_epochs=0 if separate_e2e else None)
        # everything that shapes the checkpoint: the whole config (a changed default redoes the stage too)
        settings = {**cfg.eqat_settings(), "self_generated": a.self_generated}
        if a.self_generated_from or a.self_generated_dtype != "auto":  # keys of earlier runs unchanged
            settings.update(self_generated_from=file_fingerprint(a.self_generated_from),
                            self_generated_dtype=a.self_generated_dtype)
        key = _hash({"stage": "quantize", "model": model_fingerprint(a.model), "settings": settings,
                     "calib": file_fingerprint(a.calib), "n_samples": a.n_samples, "seq_len": a.seq_len})
        out = self.folder(MASTER_FORMAT, blockap=separate_e2e)
        stage = "block_ap" if separate_e2e else "block_ap+e2e_qp"
        if not a.force and stage_done(out, key):
            self.note(stage, "skipped (up to date)", output=str(out))
            return out, key
        t0 = time.time()
        # Layers streamed from the shards, checkpoint written layer by layer (streamed_run.py).
        work_dir = os.path.normpath(str(out)) + ".effqat-work"
        ids, run = streamed_quantization(a.model, cfg, work_dir, a.calib, a.n_samples, a.seq_len, a.seed,
                                         show_progress=not a.quiet)
        train(run, a, cfg, a.model, ids)
        run.finish(str(out), overwrite=True, fmt=MASTER_FORMAT)
        shutil.rmtree(work_dir, ignore_errors=True)
        del run
        gc.collect()
        write_marker(out, stage, key, settings=settings, eqat=eqat_meta(out), **self.common_marker())
        self.note(stage, f"done in {time.time() - t0:.1f}s", output=str(out))
        return out, key

    def e2e(self, src: Path, src_key: str) -> tuple:
        a = self.args
        seq = a.e2e_seq_len or a.seq_len
        key = _hash({"stage": "e2e_qp", "src": src_key, "data": file_fingerprint(a.e2e_data), "epochs": a.e2e_epochs,
                     "max_auto_epochs": a.e2e_max_auto_epochs, "train_zeros": a.train_zeros, "lr": a.e2e_lr,
                     "batch": a.e2e_batch_size, "seq_len": seq, "lr_preset": a.lr_preset, "seed": a.seed})
        out = self.folder(MASTER_FORMAT)
        if not a.force and stage_done(out, key):
            self.note("e2e_qp", "skipped (up to date)", output=str(out))
            return out, key
        from effqat_plugin.commands import e2e as e2e_cmd

        parser = argparse.ArgumentParser(prog="effqat")
        e2e_cmd.add_parser(parser.add_subparsers(dest="command"))
        argv = ["e2e", str(src), str(out), "--data", a.e2e_data, "--seq-len", str(seq), "--epochs", str(a.e2e_epochs),
                "--max-auto-epochs", str(a.e2e_max_auto_epochs), "--batch-size", str(a.e2e_batch_size),
                "--lr-preset", a.lr_preset, "--seed", str(a.seed), "--overwrite"]
        if a.train_zeros:
            argv.append("--train-zeros")
        if a.e2e_lr is not None:
            argv += ["--lr", str(a.e2e_lr)]
        if a.device:
            argv += ["--device", a.device]
        if a.quiet:
            argv.append("--quiet")
        t0 = time.time()
        e2e_args = parser.parse_args(argv)
        rc = e2e_args.func(e2e_args)
        if rc:
            raise ValueError(f"E2E-QP stage failed (exit {rc})")
        eq = eqat_meta(out) or eqat_meta(src)
        write_marker(out, "e2e_qp", key, eqat=eq, **self.common_marker())
        self.note("e2e_qp", f"done in {time.time() - t0:.1f}s", output=str(out))
        return out, key

    def convert(self, master: Path, master_key: str, fmt: str) -> Optional[tuple]:
        if fmt == MASTER_FORMAT:
            return master, master_key
        from effqat_plugin.converters import convert

        key = _hash({"stage": "format", "src": master_key, "fmt": fmt})
        out = self.folder(fmt)
        if not self.args.force and stage_done(out, key):
            self.note(f"format {fmt}", "skipped (up to date)", output=str(out))
            return out, key
        try:
            convert(master, out, to=fmt, overwrite=True)
        except ValueError as e:  # the format cannot hold this model (e.g. BitBLAS and ragged shapes)
            self.failed[fmt] = str(e)
            self.note(f"format {fmt}", f"FAILED: {e}")
            return None
        marker = read_marker(master)
        write_marker(out, "format", key, fmt=fmt, eqat=marker.get("eqat") or eqat_meta(master),
                     **self.common_marker())
        self.note(f"format {fmt}", "done", output=str(out))
        return out, key

    def evaluate(self, outputs: Dict[str, tuple]) -> Optional[dict]:
        a = self.args
        from effqat_plugin.evaluation import evaluate_folder, resolve_tasks
        from effqat_plugin.reports import (BLOCK_AP_PNG, QUALITY_PNG, block_ap_layers, make_table, plot_block_ap,
                                           plot_quality, record_results, write_folder_report)

        data = list(a.eval_data) + list(a.eval_dataset)
        tasks = resolve_tasks(a.tasks)
        if not data and not tasks:
            return None
        seq = a.eval_seq_len or a.seq_len
        reports = self.root / "reports"
        key = _hash({"stage": "eval", "fp": model_fingerprint(a.model),
                     "outputs": {f: k for f, (_, k) in sorted(outputs.items())},
                     "data": [file_fingerprint(d) if os.path.isfile(d) else d for d in data], "tasks": tasks,
                     "seq_len": seq, "samples": a.eval_samples})
        if not a.force and stage_done(reports, key):
            self.note("evaluation", "skipped (up to date)", output=str(reports))
            with open(reports / "quality_table.json", encoding="utf-8") as f:
                return json.load(f)
        t0 = time.time()
        reports.mkdir(parents=True, exist_ok=True)
        cache: dict = {}
        kw = dict(seq_len=seq, n_samples=a.eval_samples, batch_size=8, device=a.device or "cpu", tasks=tasks,
                  cache=cache)
        rows, per_folder = [], {}
        fp_res = evaluate_folder(a.model, data, **kw)
        record_results(reports / "fp_eval.json", a.model if os.path.isdir(a.model) else None, fp_res)
        rows.append({"name": "fp", "path": a.model, "values": {c: r["value"] for c, r in fp_res.items()}})
        for fmt in self.formats:
            if fmt not in outputs:
                continue
            folder = outputs[fmt][0]
            res = evaluate_folder(str(folder), data, **kw)
            per_folder[fmt] = (folder, res)
            rows.append({"name": f"w{a.bits}g{a.group_size} {fmt}", "path": str(folder),
                         "values": {c: r["value"] for c, r in res.items()}})
        table = make_table(rows)
        for fmt, (folder, res) in per_folder.items():
            write_folder_report(folder, table, res)
        with open(reports / "quality_table.json", "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
        plot_quality(table, reports / QUALITY_PNG, title=self.name)
        any_folder = next(iter(per_folder.values()), (None,))[0]
        if any_folder is not None:
            plot_block_ap(block_ap_layers(any_folder), reports / BLOCK_AP_PNG)
        write_marker(reports, "eval", key)
        self.note("evaluation", f"done in {time.time() - t0:.1f}s", output=str(reports))
        return table

    def push(self, outputs: Dict[str, tuple]) -> Dict[str, dict]:
        a = self.args
        from effqat_plugin.hub import push

        pushed = {}
        related = {fmt: f"{a.push}-{REPO_SUFFIX[fmt]}" for fmt in self.formats if fmt in outputs}
        for fmt, repo in related.items():
            folder = outputs[fmt][0]
            files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
                     if not p.name.startswith(".")}
            key = _hash({"repo": repo, "revision": a.revision, "files": files, "related": related,
                         "base": self.base_model, "endpoint": a.endpoint})
            rec = read_json_or_empty(folder / PUSH_MARKER)
            if not a.force and not a.push_dry_run and rec.get("key") == key:
                self.note(f"push {fmt}", f"skipped (already pushed as {rec.get('commit_oid')})", output=repo)
                pushed[fmt] = rec
                continue
            rep = push(folder, repo, private=a.private, revision=a.revision, dry_run=a.push_dry_run,
                       endpoint=a.endpoint, base_model=self.base_model, extra_card={"related": related})
            if a.push_dry_run:
                print(rep["description"])
                self.note(f"push {fmt}", "dry run", output=repo)
                pushed[fmt] = {"repo_id": repo, "dry_run": True}
                continue
            rec = {"key": key, "repo_id": repo, "commit_oid": rep["commit_oid"], "commit_url": rep["commit_url"]}
            write_json_atomic(folder / PUSH_MARKER, rec)
            self.note(f"push {fmt}", "done", output=repo)
            pushed[fmt] = rec
        return pushed

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        if a.calib and not os.path.isfile(a.calib):
            raise FileNotFoundError(f"calibration file not found: {a.calib}")
        if a.e2e_data and not os.path.isfile(a.e2e_data):
            raise FileNotFoundError(f"E2E-QP data file not found: {a.e2e_data}")
        for d in a.eval_data:
            if not os.path.isfile(d):
                raise FileNotFoundError(f"evaluation data file not found: {d}")
        if a.tasks:
            from effqat_plugin.evaluation import require_lm_eval

            require_lm_eval()
        if a.push and "/" not in a.push:
            raise ValueError("--push takes USER/PREFIX")
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        master, key = self.quantize()
        if a.e2e_data and a.e2e_epochs > 0:
            master, key = self.e2e(master, key)
        outputs: Dict[str, tuple] = {}
        for fmt in self.formats:
            done = self.convert(master, key, fmt)
            if done is not None:
                outputs[fmt] = done
        table = self.evaluate(outputs)
        pushed = self.push(outputs) if a.push else {}
        summary = {"name": self.name, "out_root": str(self.root), "seconds": round(time.time() - t0, 1),
                   "stages": self.stages, "outputs": {f: str(p) for f, (p, _) in outputs.items()},
                   "failed": self.failed, "quality_table": table, "pushed": pushed}
        with open(self.root / "pipeline.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
        return summary


def run(args) -> int:
    from effqat_plugin.reports import format_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = Pipeline(args).run()
    for s in summary["stages"]:
        print(f"{s['stage']:<24} {s['status']}" + (f"  -> {s['output']}" if s.get("output") else ""))
    if summary["quality_table"]:
        print()
        print(format_table(summary["quality_table"]))
    if summary["failed"]:
        for fmt, why in summary["failed"].items():
            print(f"effqat pipeline: format {fmt} not written: {why}")
        return 1
    return 0
