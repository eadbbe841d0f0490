"""Evaluation results next to a checkpoint: ``effqat_eval.json``, the quality table, PNG plots.

``effqat_eval.json`` (inside the checkpoint folder unless a path is given)::

    {"schema": "effqat-eval/1", "model": "<folder>", "fingerprint": {...weights...},
     "results": {"<column>": {"value": 12.3, "metric": "ppl", ...details}},
     "table": {"columns": [...], "rows": [{"name": "fp", "path": "...", "values": {"<column>": v}}]}}

``results`` are this checkpoint's own numbers (merged across runs, one entry per column such as
``wikitext2 ppl@2048`` or ``piqa acc``); ``table`` is the latest comparison table it took part in
(fp and every format of a pipeline run). ``fingerprint`` (weight file names and sizes) lets the model
card ignore a JSON that was copied next to different weights.

Plots (matplotlib, Agg backend; skipped with a log line when matplotlib is missing):
``block_ap_loss.png`` (per-layer Block-AP train / validation loss from ``quantize_config.json``
meta.eqat) and ``quality.png`` (the quality table, one panel per column).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

from .jsonio import STAGE_MARKER, read_json_or_empty, write_json_atomic

log = logging.getLogger("effqat.reports")

SCHEMA = "effqat-eval/1"
EVAL_JSON = "effqat_eval.json"
QUALITY_PNG = "quality.png"
BLOCK_AP_PNG = "block_ap_loss.png"
PAPER_TASKS = ("winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge")


def fingerprint(folder) -> dict:
    """Weight files (names and sizes) of a checkpoint folder: what its results belong to."""
    folder = Path(folder)
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}


def eval_json_path(model_dir) -> Path:
    return Path(model_dir) / EVAL_JSON


def _json_default(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def load_eval_json(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_JSON
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return {}
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def record_results(json_path, model_dir, results: Dict[str, dict], table: Optional[dict] = None) -> Path:
    """Merge ``results`` ({column: {"value": v, "metric": m, ...}}) into the JSON at ``json_path``."""
    json_path = Path(json_path)
    data = load_eval_json(json_path)
    fp = fingerprint(model_dir) if model_dir and Path(model_dir).is_dir() else {}
    if data.get("fingerprint") not in (None, fp):  # the weights changed: old numbers are stale
        data = {}
    data.update(schema=SCHEMA, model=str(model_dir), fingerprint=fp, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    merged = dict(data.get("results") or {})
    merged.update(results)
    data["results"] = merged
    if table is not None:
        data["table"] = table
    write_json_atomic(json_path, data, default=_json_default)
    return json_path


def results_for_card(folder) -> dict:
    """The folder's eval JSON if it belongs to these weights, else {}."""
    data = load_eval_json(folder)
    if data and data.get("fingerprint") and data["fingerprint"] != fingerprint(folder):
        log.warning("%s/%s belongs to other weights; not used in the card", folder, EVAL_JSON)
        return {}
    return data


def make_table(rows: List[dict]) -> dict:
    """rows: [{"name", "path", "values": {column: value}}] -> table dict with ordered columns."""
    cols: List[str] = []
    for r in rows:
        for c in r.get("values", {}):
            if c not in cols:
                cols.append(c)
    return {"columns": cols, "rows": rows}


def table_from_results(name: str, data: dict) -> dict:
    values = {c: r.get("value") for c, r in (data.get("results") or {}).items()}
    return make_table([{"name": name, "path": data.get("model"), "values": values}])


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def format_table(table: dict, markdown: bool = False) -> str:
    cols = table.get("columns") or []
    header = ["model"] + cols
    body = [[r.get("name", "?")] + [_fmt(r.get("values", {}).get(c)) for c in cols] for r in table.get("rows", [])]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def block_ap_layers(folder) -> List[dict]:
    """Per-layer Block-AP reports from ``quantize_config.json`` meta.eqat (empty when absent)."""
    eqat = eqat_meta(folder)
    return list((eqat.get("block_ap") or {}).get("layers") or [])


def eqat_meta(folder) -> dict:
    """meta.eqat of a checkpoint: the pipeline's stage marker when present (it also covers formats whose
    quantize config lost it), else ``quantize_config.json`` meta.eqat, with a separate E2E-QP run
    (`effqat e2e`, meta.eqat_e2e) folded into ``e2e_qp`` / ``settings``."""
    folder = Path(folder)

    marker = read_json_or_empty(folder / STAGE_MARKER).get("eqat")
    if isinstance(marker, dict) and marker:
        return marker
    meta = read_json_or_empty(folder / "quantize_config.json").get("meta") or {}
    eqat = dict(meta.get("eqat") or {})
    e2e = meta.get("eqat_e2e")
    if eqat and isinstance(e2e, dict) and isinstance(e2e.get("report"), dict):
        eqat["e2e_qp"] = e2e["report"]
        st = dict(eqat.get("settings") or {})
        es = e2e.get("settings") or {}
        st.update(e2e_epochs=es.get("epochs", st.get("e2e_epochs")),
                  e2e_batch_size=es.get("global_batch_size", st.get("e2e_batch_size")),
                  e2e_train_zeros=es.get("train_zeros", st.get("e2e_train_zeros")))
        eqat["settings"] = st
        eqat["e2e_data"] = e2e.get("data")
    return eqat


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; plots skipped (pip install effqat[plot])")
        return None
    return plt


def plot_block_ap(layers: List[dict], out_png, title: str = "Block-AP per-layer loss") -> bool:
    """Line plot of each decoder layer's Block-AP train and validation MSE; False when not drawn."""
    if not layers:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    idx = [int(r.get("index", i)) for i, r in enumerate(layers)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [r.get("train_loss") for r in layers]
    val = [r.get("val_loss") for r in layers]
    ax.plot(idx, train, "o-", label="train MSE")
    if any(v is not None for v in val):
        ax.plot(idx, [math.nan if v is None else v for v in val], "s-", label="validation MSE")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("MSE to fp outputs")
    if all(v is not None and v > 0 for v in train):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return True


def plot_quality(table: dict, out_png, title: str = "Quality") -> bool:
    """One bar panel per column of the quality table; False when not drawn."""
    cols = [c for c in table.get("columns") or []
            if any(isinstance(r.get("values", {}).get(c), (int, float)) for r in table.get("rows", []))]
    if not cols:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    names = [r.get("name", "?") for r in table["rows"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(max(4, 3.2 * len(cols)), 3.5), dpi=100, squeeze=False)
    for ax, c in zip(axes[0], cols):
        vals = [r.get("values", {}).get(c) for r in table["rows"]]
        vals = [math.nan if not isinstance(v, (int, float)) else float(v) for v in vals]
        bars = ax.bar(range(len(names)), vals, color="#4C72B0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(c, fontsize=9)
        if "ppl" in c and all(v > 0 for v in vals if not math.isnan(v)):
            ax.set_yscale("log")
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return True


def write_folder_report(folder, table: Optional[dict], results: Optional[Dict[str, dict]] = None,
                        json_path=None) -> dict:
    """Eval JSON + both plots into a checkpoint folder; returns {"json": path, "plots": [...]}."""
    folder = Path(folder)
    json_path = Path(json_path) if json_path else eval_json_path(folder)
    out = {"json": str(record_results(json_path, folder, results or {}, table)), "plots": []}
    plot_dir = json_path.parent
    if table and plot_quality(table, plot_dir / QUALITY_PNG, title=f"Quality: {folder.name}"):
        out["plots"].append(str(plot_dir / QUALITY_PNG))
    layers = block_ap_layers(folder)
    if layers and plot_block_ap(layers, plot_dir / BLOCK_AP_PNG):
        out["plots"].append(str(plot_dir / BLOCK_AP_PNG))
    return out
