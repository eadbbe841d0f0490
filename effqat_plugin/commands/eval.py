"""`effqat eval MODEL_DIR [MODEL_DIR ...] --data FILE | --dataset NAME [--tasks paper]`.

Perplexity at a given context length of fp, EQAT, GPTQ and BitBLAS folders on local text / token files
or `datasets` names, plus lm-eval-harness tasks when lm-eval is installed (``--tasks paper`` = the
EfficientQAT paper's WinoGrande, PIQA, HellaSwag, ARC-e, ARC-c, reporting acc). Prints a table (one
row per folder) and one JSON line per folder, and writes ``effqat_eval.json`` (its results + the table)
with PNG plots of the table and of the per-layer Block-AP loss: into each *quantized* checkpoint folder
(results belong next to the weights they measure), or into ``--out DIR/<name>/`` for every model.
An input fp model folder is never written to: without ``--out`` its results are only printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("effqat.eval")
RUNTIMES = ("effqat", "gptqmodel", "llama.cpp")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of model folders; table, JSON and plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="+", help="fp / EQAT / GPTQ / BitBLAS folder(s); the first is usually fp")
    p.add_argument("--data", action="append", default=[],
                   help=".txt / .raw (raw text, wikitext style), .jsonl ('text'), .parquet, or .safetensors with "
                        "int64 'input_ids' [N, T]; repeatable")
    p.add_argument("--dataset", action="append", default=[],
                   help="`datasets` name: wikitext2, c4, ptb, or PATH[:CONFIG[:SPLIT]] (must be in the local "
                        "cache when offline); repeatable")
    p.add_argument("--text-column", default="text", help="text column of --dataset PATH datasets")
    p.add_argument("--seq-len", type=int, default=256, help="context length (tokens per evaluated sequence)")
    p.add_argument("--n-samples", type=int, default=None, help="evaluate at most this many sequences")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runtime", type=_runtimes, default="effqat",
                   help="run quantized folders on effqat's kernels (effqat), through GPTQModel's TORCH backend "
                        "(gptqmodel, GPTQ folders), in llama.cpp (llama.cpp: a lossless GGUF of the folder, "
                        "perplexity only), or several (effqat,gptqmodel,llama.cpp: one table row per "
                        "runtime). A .gguf MODEL is always run in llama.cpp")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tasks", default=None,
                   help="lm-eval-harness tasks, comma separated; 'paper' = winogrande,piqa,hellaswag,arc_easy,"
                        "arc_challenge (acc). Needs: pip install effqat[eval]")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--name", action="append", default=[], help="row name per model (default: folder name)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="write the JSON here instead of MODEL_DIR/effqat_eval.json (one model only)")
    p.add_argument("--out", default=None,
                   help="write each model's JSON and plots into OUT/<name>/ instead of next to quantized checkpoints")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON or plots")
    p.add_argument("--table-only", action="store_true", help="print only the table (no JSON lines)")
    p.set_defaults(func=run)


def _runtimes(spec: str):
    out = [r.strip() for r in spec.split(",") if r.strip()]
    bad = [r for r in out if r not in RUNTIMES]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"runtime {spec!r}: use one or more of {', '.join(RUNTIMES)} "
                                         "(comma separated)")
    return list(dict.fromkeys(out))


def _writable_target(model_dir: str) -> bool:
    """Results go next to a quantized checkpoint only: never into an fp (input) model folder, nor into
    our bundled assets; those results are printed (or written under --out / --json)."""
    from effqat_plugin import __file__ as pkg_init
    from effqat_plugin.loading import is_quantized_folder

    if model_dir.endswith(".gguf"):
        log.info("%s is a GGUF file; its results are not written next to it (use --out)", model_dir)
        return False
    assets = Path(pkg_init).resolve().parent / "assets"
    p = Path(model_dir).resolve()
    if p == assets or assets in p.parents:
        log.info("%s is a bundled asset; results are not written into it (use --out)", model_dir)
        return False
    if not is_quantized_folder(str(p)):
        log.info("%s is not a quantized checkpoint; its results are not written into it (use --out)", model_dir)
        return False
    return os.access(p, os.W_OK)


def _report_path(args, model_dir: str, name: str):
    """Where this model's JSON goes (plots beside it), or None when nothing is written."""
    if args.no_save:
        return None
    if args.json_path:
        return args.json_path
    if args.out:
        from effqat_plugin.reports import EVAL_JSON

        return str(Path(args.out) / name / EVAL_JSON)
    return "" if _writable_target(model_dir) else None


def run(args) -> int:
    from effqat_plugin.evaluation import evaluate_folder, require_lm_eval, resolve_tasks
    from effqat_plugin.reports import make_table, format_table, write_folder_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = resolve_tasks(args.tasks)
    if tasks:
        require_lm_eval()
    data = list(args.data) + list(args.dataset)
    if not data and not tasks:
        raise ValueError("nothing to evaluate: give --data FILE, --dataset NAME and/or --tasks")
    for d in args.data:
        if not os.path.isfile(d):
            raise FileNotFoundError(f"data file not found: {d}")
    for m in args.model_dir:
        if not (os.path.isdir(m) or (m.endswith(".gguf") and os.path.isfile(m))):
            raise FileNotFoundError(f"model folder (or .gguf file) not found: {m}")
    if args.json_path and len(args.model_dir) > 1:
        raise ValueError("--json takes one model folder; with several, each gets MODEL_DIR/effqat_eval.json")
    if args.name and len(args.name) != len(args.model_dir):
        raise ValueError("give one --name per model folder")
    names = args.name or [Path(m).resolve().name for m in args.model_dir]
    if args.out and len(set(names)) != len(names):
        raise ValueError("--out needs distinct model names; give --name per model")
    if args.out and args.json_path:
        raise ValueError("give --out or --json, not both")
    from effqat_plugin.loading import is_quantized_folder

    dest = args.out or (os.path.dirname(os.path.abspath(args.json_path)) if args.json_path else None)
    for m in args.model_dir:
        mp = Path(m).resolve()
        if dest and mp.is_dir() and not is_quantized_folder(str(mp)) and (Path(dest).resolve() == mp or mp in Path(dest).resolve().parents):
            raise ValueError(f"{dest} lies inside the input model folder {m}; results never go into an fp model folder")

    runtimes = args.runtime if isinstance(args.runtime, list) else [args.runtime]
    cache: dict = {}
    all_results, rows = [], []
    for n, m in zip(names, args.model_dir):
        # fp folders run the same on every runtime: evaluated once (by torch); quantized ones once
        # per runtime; a .gguf file only in llama.cpp
        if m.endswith(".gguf"):
            per_rt = ["llama.cpp"]
        elif is_quantized_folder(m):
            per_rt = runtimes
        else:
            per_rt = [next((r for r in runtimes if r != "llama.cpp"), "effqat")]
        first = None
        for rt in per_rt:
            res = evaluate_folder(m, data, seq_len=args.seq_len, n_samples=args.n_samples,
                                  batch_size=args.batch_size, runtime=rt, device=args.device, tasks=tasks,
                                  text_column=args.text_column, lm_eval_limit=args.limit,
                                  num_fewshot=args.num_fewshot, cache=cache)
            for r in res.values():
                r["runtime"] = rt
            first = first or res
            rows.append({"name": n if len(per_rt) == 1 else f"{n} ({rt})", "path": str(m),
                         "values": {c: r["value"] for c, r in res.items()}})
        all_results.append(first)  # JSON line / file: the first runtime's numbers
    table = make_table(rows)
    print(format_table(table))
    for n, m, res in zip(names, args.model_dir, all_results):
        line = {"model": m, "name": n}
        ppl = [r for r in res.values() if r.get("metric") == "ppl"]
        if ppl:  # the keys the single-data form always printed
            line.update(data=ppl[0]["data"], samples=ppl[0]["samples"], seq_len=ppl[0]["seq_len"],
                        perplexity=round(ppl[0]["value"], 4))
        line["results"] = {c: round(r["value"], 6) for c, r in res.items()}
        target = _report_path(args, m, n)
        if target is not None:
            out = write_folder_report(m, table, res, json_path=target or None)
            line["json"], line["plots"] = out["json"], out["plots"]
        if not args.table_only:
            print(json.dumps(line))
    return 0
