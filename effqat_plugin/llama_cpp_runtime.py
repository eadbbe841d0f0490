"""llama.cpp as an evaluation runtime: a GGUF file behind the call signature of a causal LM.

``effqat eval ... --runtime llama.cpp`` scores the same token windows as the other runtimes with the
logits llama.cpp itself computes (through ``llama-cpp-python``, which builds the vendored llama.cpp).
A quantized folder is first written as a lossless GGUF (``convert --to gguf``) into a temporary
folder; a ``.gguf`` path is run as it is.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise NotImplementedError("--runtime llama.cpp needs llama-cpp-python (bash scripts/setup.sh "
                                  f"installs it): {e}") from None
    return llama_cpp


class LlamaCppLM:
    """``model(input_ids=[B, T]).logits`` -> float32 ``[B, T, vocab]`` from llama.cpp, one row at a
    time, each from an empty KV cache (rows are independent windows, as in the torch runtimes)."""

    def __init__(self, gguf_path, n_ctx: int, n_threads: int | None = None):
        llama_cpp = _llama_cpp()
        self.path = str(gguf_path)
        self._llm = llama_cpp.Llama(model_path=self.path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                    logits_all=True, n_threads=n_threads or max(1, os.cpu_count() or 1),
                                    verbose=False)
        self.n_ctx = n_ctx
        self.config = SimpleNamespace(vocab_size=self._llm.n_vocab())

    def __call__(self, input_ids: torch.Tensor, **_):
        rows = []
        for row in input_ids.tolist():
            if len(row) > self.n_ctx:
                raise ValueError(f"window of {len(row)} tokens exceeds the context {self.n_ctx}")
            self._llm.reset()
            self._llm.eval(row)
            rows.append(np.array(self._llm.scores[:len(row)], dtype=np.float32))
        return SimpleNamespace(logits=torch.from_numpy(np.stack(rows)))

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError("--runtime llama.cpp runs on the CPU build of llama.cpp here (--device cpu)")
        return self

    def eval(self):
        return self

    def close(self):
        self._llm.close()


@contextlib.contextmanager
def gguf_for(path: str):
    """The GGUF file to run for ``path``: itself, or a lossless conversion of a quantized folder in a
    temporary folder removed afterwards."""
    if str(path).endswith(".gguf"):
        yield Path(path)
        return
    from effqat_plugin.converters import convert

    with tempfile.TemporaryDirectory(prefix="effqat-gguf-") as tmp:
        dst = Path(tmp) / f"{Path(path).resolve().name}.gguf"
        convert(path, dst, to="gguf")
        yield dst
