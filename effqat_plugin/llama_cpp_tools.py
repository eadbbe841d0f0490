"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) for benchmarks.

``scripts/build_llama_tools.sh`` builds them from the llama.cpp llama-cpp-python vendors (the same
quantizer effqat_plugin.gguf_presets mirrors) into ``$EFFQAT_LLAMA_TOOLS`` or the repository's
``.cache/llama-tools``; this module only finds and runs them. ``perplexity`` gives llama.cpp's own
number for a GGUF file, to compare effqat's K-grid files with llama-quantize's on equal terms.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
_REPO = Path(__file__).resolve().parents[1]
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf)")


def tool_path(name: str) -> Path | None:
    """The built ``name`` binary: $EFFQAT_LLAMA_TOOLS/bin, then .cache/llama-tools/bin of the
    repository, then PATH; None when none is found (run scripts/build_llama_tools.sh)."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    roots = [Path(os.environ["EFFQAT_LLAMA_TOOLS"])] if os.environ.get("EFFQAT_LLAMA_TOOLS") else []
    roots.append(_REPO / ".cache" / "llama-tools")
    for root in roots:
        p = root / "bin" / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    """The built tool ``name``, or FileNotFoundError saying how to build it (one message for every caller)."""
    p = tool_path(name)
    if p is None:
        raise FileNotFoundError(f"{name} is not built: run scripts/build_llama_tools.sh "
                                f"(or set EFFQAT_LLAMA_TOOLS)")
    return p


def parse_perplexity(output: str) -> float:
    """The number of llama-perplexity's "Final estimate: PPL = X +/- Y" line."""
    m = _FINAL.findall(output)
    if not m:
        raise ValueError("llama-perplexity printed no 'Final estimate: PPL = ' line")
    return float(m[-1])


def perplexity(model, text_file, ctx: int = 512, chunks: int | None = None, threads: int | None = None,
               timeout: float | None = None) -> float:
    """llama-perplexity's final PPL of the GGUF ``model`` on ``text_file`` (windows of ``ctx`` tokens,
    at most ``chunks`` of them; the text needs at least 2 * ctx tokens)."""
    model, text_file = Path(model), Path(text_file)
    for p in (model, text_file):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    if ctx < 8 or (chunks is not None and chunks < 1):
        raise ValueError(f"ctx must be at least 8 and chunks at least 1, got ctx={ctx}, chunks={chunks}")
    cmd = [str(require_tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        tail = " | ".join(ln for ln in out.strip().splitlines()[-3:])
        raise RuntimeError(f"llama-perplexity failed (exit {r.returncode}): {tail}")
    return parse_perplexity(out)
