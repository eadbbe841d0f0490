"""GGUF at llama.cpp's K presets: effqat's trained files against llama-quantize (plain and with an
importance matrix), side by side in one run, perplexity computed by llama.cpp itself.

Rows, per preset (default Q2_K, Q3_K_M, Q4_K_M):

* ``fp16``: the fp model as an F16 GGUF (llama.cpp's converter), once.
* ``llama-quantize``: that file quantized by llama.cpp's own tool.
* ``llama-quantize+imatrix``: the same with ``llama-imatrix`` run on the calibration.
* ``effqat``: ``effqat quantize MODEL OUT.gguf --format gguf --gguf-type PRESET`` on the calibration
  (extra training arguments with ``--effqat-args``; ``--effqat-label L`` names the row ``effqat[L]``, so
  the default recipe and a reduced one can sit in one work folder and one table).
* ``autoround`` (its default 200 iterations), ``autoround-rtn`` (``iters=0``, which AutoRound
  recommends for GGUF except at 3 bits) and ``autoround-ext`` (its enhanced GGUF algorithm): AutoRound
  0.16.1's own GGUF export at the preset (``scripts/bench_gguf_autoround.py``; Q2_K is its Q2_K_S), in
  a child process with ``--autoround-site`` on its path (AutoRound is not in the test environment).

Every row uses the same calibration: the first ``--n-calib`` x ``--calib-len`` tokens of
``--calib`` (wikitext-2 valid by default): effqat takes the file with ``--n-samples / --seq-len``,
llama-imatrix with ``--chunks / -c``. Perplexity: ``llama-perplexity -c --ctx --chunks --chunks`` on
each ``--eval`` text (wikitext-2 test, and a text of another domain: ``scripts/get_ood_text.py``).
Reported per row: file bytes, bits per weight (over the quantized tensors' weights, as llama.cpp
counts them: file bytes x 8 / parameters), perplexities, seconds, and seconds as a ratio to
``llama-quantize`` + ``llama-imatrix`` on the same machine in the same run.

``--pad-to-256``: the model is first rewritten as an exactly equivalent one whose hidden size is the
next multiple of 256 (zero columns and rows; RMSNorm weights scaled so the normalized values are
unchanged), so that every linear takes the preset's K type rather than its 32-wide fallback.

Needs llama.cpp's tools: ``bash scripts/build_llama_tools.sh``.

    python scripts/bench_gguf.py --model ~/.cache/effqat/smollm2-135m --work runs/bench-gguf \\
        --eval ../shared/data/wikitext-2/test.txt --eval ~/.cache/effqat/kjv.txt
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUTOROUND_ROWS = {"autoround": ["--iters", "200"], "autoround-rtn": ["--iters", "0"],
                  "autoround-ext": ["--iters", "200", "--alg-ext"]}
SHARED = REPO.parent / "shared" / "data" / "wikitext-2"


def log(msg: str) -> None:
    print(f"[bench_gguf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw) -> float:
    """Run ``cmd`` (a list); its wall seconds. Output goes to the log file ``kw['log']``."""
    logf = kw.pop("log")
    t0 = time.time()
    with open(logf, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        tail = Path(logf).read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {r.returncode}); {logf}: " + " | ".join(tail))
    return time.time() - t0


def pad_to_256(src: Path, dst: Path) -> Path:
    """An exactly equivalent Llama-family model whose hidden size H is a multiple of 256 (module doc).

    transformers needs H = heads x head_dim, so heads are added too (keeping head_dim and the GQA
    ratio; H is the smallest multiple of 256 and of head_dim x ratio): new query / key / value heads
    with zero weights, whose outputs o_proj drops (zero columns). The residual stream gets H - h zero
    channels: zero input columns for every tensor that reads it, zero output rows for o_proj and
    down_proj, RMSNorm weights times sqrt(h / H) and eps times h / H (the mean square over H
    channels of which H - h are zero is h / H of the mean over h)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dst / "config.json").exists():
        return dst
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = model.config
    h, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    ratio = heads // kv
    step = math.lcm(256, hd * ratio)
    H = -(-h // step) * step
    if H == h:
        raise ValueError(f"{src}: hidden size {h} is already a multiple of 256")
    H_heads, H_kv = H // hd, H // hd // ratio

    def padded(t, dim, to):
        shape = list(t.shape)
        shape[dim] = to - t.shape[dim]
        return torch.cat([t, torch.zeros(shape)], dim=dim)

    new = {}
    for k, t in model.state_dict().items():
        if t.ndim == 1 and t.shape[0] == h:              # the RMSNorms of the residual stream
            t = padded(t * math.sqrt(h / H), 0, H)
        elif t.ndim == 2:
            if k.endswith("q_proj.weight"):
                t = padded(t, 0, H_heads * hd)
            elif k.endswith(("k_proj.weight", "v_proj.weight")):
                t = padded(t, 0, H_kv * hd)
            if k.endswith("o_proj.weight"):
                t = padded(padded(t, 1, H_heads * hd), 0, H)
            elif k.endswith("down_proj.weight"):
                t = padded(t, 0, H)
            elif t.shape[1] == h:
                t = padded(t, 1, H)
        new[k] = t.contiguous()
    cfg.head_dim, cfg.hidden_size = hd, H
    cfg.num_attention_heads, cfg.num_key_value_heads = H_heads, H_kv
    cfg.rms_norm_eps = cfg.rms_norm_eps * h / H
    out = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    res = out.load_state_dict(new, strict=False)
    if [k for k in res.missing_keys if "rotary" not in k] or res.unexpected_keys:
        raise RuntimeError(f"padding {src}: state dict mismatch {res}")
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        err = (out(ids).logits - model(ids).logits).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(f"the padded model is not equivalent (max logit difference {err})")
    log(f"padded hidden {h} -> {H}, heads {heads}/{kv} -> {H_heads}/{H_kv}; max logit difference {err:.2e}")
    tmp = dst.with_name(dst.name + ".tmp")
    out.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(dst)
    return dst


def quantized_weights(gguf_path: Path) -> tuple[int, int]:
    """(weights in quantized tensors, their bytes), read from the file's tensor table."""
    import gguf

    n = nbytes = 0
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
            n += int(t.n_elements)
            nbytes += int(t.n_bytes)
    return n, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="fp HF model folder")
    ap.add_argument("--work", default="runs/bench-gguf")
    ap.add_argument("--presets", default="Q2_K,Q3_K_M,Q4_K_M")
    ap.add_argument("--rows", default="fp16,llama-quantize,llama-quantize+imatrix,effqat")
    ap.add_argument("--calib", default=str(SHARED / "valid.txt"))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval", action="append", default=[], help="evaluation text (repeatable)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad-to-256", action="store_true")
    ap.add_argument("--effqat-args", default="", help="extra arguments of effqat quantize")
    ap.add_argument("--effqat-label", default="",
                    help="names the effqat row effqat[LABEL] (and its file), so runs with other --effqat-args "
                         "share one work folder and table")
    ap.add_argument("--autoround-site", default=str(REPO / ".cache" / "ar-site"),
                    help="a folder holding auto-round 0.16.1 (pip install --target DIR --no-deps auto-round==0.16.1 "
                         "py-cpuinfo), put on the AutoRound rows' PYTHONPATH")
    ap.add_argument("--json", default=None, help="write the results here (default WORK/results.json)")
    args = ap.parse_args(argv)

    from effqat_plugin import llama_cpp_tools
    from effqat_plugin.converters.gguf_export import fp_to_gguf

    def tool(name: str) -> Path:
        try:
            return llama_cpp_tools.require_tool(name)
        except FileNotFoundError as e:
            sys.exit(f"bench_gguf: {e}")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    if args.pad_to_256:
        model = pad_to_256(model, work / (model.name + "-pad256"))
    evals = args.eval or [str(SHARED / "test.txt")]
    rows_wanted = args.rows.split(",")
    unknown = set(rows_wanted) - {"fp16", "llama-quantize", "llama-quantize+imatrix", "effqat", *AUTOROUND_ROWS}
    if unknown:
        sys.exit(f"bench_gguf: unknown rows {sorted(unknown)}")
    results_path = Path(args.json or work / "results.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def ppl(path: Path) -> dict:
        return {Path(e).parent.name + "/" + Path(e).name: llama_cpp_tools.perplexity(
            path, e, ctx=args.ctx, chunks=args.chunks, threads=args.threads) for e in evals}

    def record(name, path, seconds, **extra):
        n, nb = quantized_weights(path) if "fp16" not in name else (0, 0)
        row = {"file": str(path), "bytes": path.stat().st_size, "seconds": round(seconds, 1),
               "bpw_quantized": round(8 * nb / n, 4) if n else 16.0, "ppl": ppl(path), **extra}
        results[name] = row
        results_path.write_text(json.dumps(results, indent=1))
        log(f"{name}: {row['ppl']} ({row['bytes']} B, {row['seconds']} s)")

    f16 = work / "fp16.gguf"
    if not f16.exists():
        t = time.time()
        fp_to_gguf(model, f16)
        if "fp16" in rows_wanted:
            record("fp16", f16, time.time() - t)
    calib = work / "calib.txt"
    if not calib.exists():
        calib.write_text(Path(args.calib).read_text())
    imatrix = work / "imatrix.gguf"
    t_imatrix = results.get("_imatrix_seconds")
    if "llama-quantize+imatrix" in rows_wanted and (not imatrix.exists() or t_imatrix is None):
        t_imatrix = run([tool("llama-imatrix"), "-m", f16, "-f", calib, "-c", args.calib_len,
                         "--chunks", args.n_calib, "-o", imatrix, "-t", args.threads], log=work / "imatrix.log")
        results["_imatrix_seconds"] = round(t_imatrix, 1)
        results_path.write_text(json.dumps(results, indent=1))
    for preset in args.presets.split(","):
        for row in rows_wanted:
            label = f"{row}[{args.effqat_label}]" if row == "effqat" and args.effqat_label else row
            name = f"{preset} {label}"
            if row == "fp16" or name in results:
                continue
            stem = re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{preset}-{label}").strip("-")
            out, logf = work / f"{stem}.gguf", work / f"{stem}.log"
            if row == "llama-quantize":
                s = run([tool("llama-quantize"), f16, out, preset, args.threads], log=logf)
                record(name, out, s)
            elif row == "llama-quantize+imatrix":
                s = run([tool("llama-quantize"), "--imatrix", imatrix, f16, out, preset,
                         args.threads], log=logf)
                record(name, out, s, with_imatrix_seconds=round(s + t_imatrix, 1))
            elif row == "effqat":
                cmd = [sys.executable, "-m", "effqat_plugin.cli", "quantize", model, out, "--format", "gguf",
                       "--gguf-type", preset, "--calib", calib, "--n-samples", args.n_calib, "--seq-len",
                       args.calib_len, "--overwrite", "--quiet", *shlex.split(args.effqat_args)]
                s = run(cmd, log=logf)
                record(name, out, s, effqat_args=args.effqat_args)
            elif row in AUTOROUND_ROWS:
                extra = AUTOROUND_ROWS[row]
                cmd = [sys.executable, REPO / "scripts" / "bench_gguf_autoround.py", "--model", model, "--out", out,
                       "--preset", preset, "--calib", calib, "--n-samples", args.n_calib, "--seq-len",
                       args.calib_len, *extra]
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    p for p in (args.autoround_site, str(REPO), os.environ.get("PYTHONPATH", "")) if p))
                s = run(cmd, log=logf, env=env)
                record(name, out, s, autoround_args=" ".join(extra))
    print(format_table(results))
    return 0


def format_table(results: dict) -> str:
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    evals = sorted({e for v in rows.values() for e in v["ppl"]})
    lines = ["| row | bytes | bpw (quantized tensors) | " + " | ".join(f"ppl {e}" for e in evals) +
             " | seconds | time / (llama-quantize + imatrix) |", "|" + "---|" * (5 + len(evals))]
    for name, v in rows.items():
        preset = name.split(" ")[0]
        ref = rows.get(f"{preset} llama-quantize+imatrix", {}).get("with_imatrix_seconds")
        ratio = f"{v['seconds'] / ref:.1f}x" if ref and name != "fp16" else "-"
        lines.append(f"| {name} | {v['bytes']:,} | {v['bpw_quantized']} | " +
                     " | ".join(f"{v['ppl'].get(e, float('nan')):.3f}" for e in evals) +
                     f" | {v.get('with_imatrix_seconds', v['seconds'])} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
