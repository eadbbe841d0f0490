"""Perplexity of fp and quantized models on token data (the quality number every table reports)."""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .runtime import Runtime

log = logging.getLogger("effqat.eval")


@torch.no_grad()
def causal_lm_loss(model: nn.Module, ids: torch.Tensor, batch_size: int, runtime: Runtime) -> float:
    """Mean next-token NLL over all predicted tokens of ``ids`` (exp of it is the perplexity)."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        batch = ids[i:i + batch_size].to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=batch, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int, runtime: Runtime) -> float:
    return math.exp(causal_lm_loss(model, ids, batch_size, runtime))


# ------------------------------------------------------------------------------------------------
# Evaluation data by name, lm-eval-harness tasks, and one-call evaluation of a folder.


# name -> (datasets path, config, split, text column, how many documents to join (None = all))
DATASET_PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", None),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "test", "text", None),
    "c4": ("allenai/c4", "en", "validation", "text", 3000),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence", None),
}
PAPER_TASKS = ("winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge")
LM_EVAL_INSTALL = "pip install effqat[eval]  (or: pip install 'lm-eval>=0.4.8')"
DATA_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet", ".safetensors")


def data_label(spec: str) -> str:
    """Short column label for a data spec: a file's name without its suffix, or the dataset name."""
    if os.path.isfile(spec):
        name = Path(spec).name
        for suf in (".safetensors", ".jsonl", ".parquet", ".json", ".txt"):
            if name.endswith(suf):
                return name[: -len(suf)]
        return name
    return spec.split(":")[0].rstrip("/").split("/")[-1]


def _dataset_texts(spec: str, text_column: str = "text") -> List[str]:
    """Texts of a ``datasets`` name: a preset (wikitext2, c4, ...), ``path[:config[:split]]`` or a local
    dataset folder. Needs the dataset in the local cache (or a reachable hub)."""
    import datasets

    name, config, split, column, limit = DATASET_PRESETS.get(spec, (None,) * 5)
    if name is None:
        parts = spec.split(":")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 else "test"
        column, limit = text_column, None
    try:
        if name == "allenai/c4":
            ds = datasets.load_dataset(name, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split="validation")
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, missing split ...
        raise ValueError(f"dataset {spec!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "pass a local file with --data instead") from None
    if column not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no column {column!r} (columns: {ds.column_names}); use --text-column")
    texts = ds[column] if limit is None else ds.select(range(min(limit, len(ds))))[column]
    return [t for t in texts if t]


def load_eval_ids(spec: str, tokenizer=None, seq_len: int = 2048, n_samples: Optional[int] = None,
                  text_column: str = "text") -> torch.Tensor:
    """``[N, seq_len]`` token rows from a file (.txt/.jsonl/.parquet text, .safetensors ``input_ids``) or a
    ``datasets`` name; text is tokenized as one stream joined by blank lines (wikitext-2 / C4 style)."""
    from .data import chunk_stream, load_token_file

    if os.path.isfile(spec) or spec.endswith(DATA_SUFFIXES):
        return load_token_file(spec, tokenizer, seq_len=seq_len, n_samples=n_samples)
    texts = _dataset_texts(spec, text_column)
    if tokenizer is None:
        raise ValueError(f"dataset {spec!r} is text and needs the model's tokenizer")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return chunk_stream(torch.as_tensor(ids), seq_len, n_samples)


def resolve_tasks(spec: Optional[str]) -> List[str]:
    if not spec:
        return []
    out: List[str] = []
    for t in spec.split(","):
        t = t.strip()
        if not t:
            continue
        out.extend(PAPER_TASKS if t == "paper" else [t])
    return list(dict.fromkeys(out))


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(f"lm-eval-harness is not installed; install it with: {LM_EVAL_INSTALL}") from None
    return lm_eval


def run_lm_eval(model: nn.Module, tokenizer, tasks: List[str], batch_size: int = 8, device: str = "cpu",
                limit: Optional[float] = None, num_fewshot: int = 0) -> Dict[str, dict]:
    """Zero-shot lm-eval-harness tasks on an in-memory model; ``{"<task> acc": {value, stderr, ...}}``.

    Reports ``acc`` (not ``acc_norm``), as the EfficientQAT paper does.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    results = {}
    for task in tasks:
        r = (out.get("results") or {}).get(task)
        if r is None:
            raise ValueError(f"lm-eval returned no result for task {task!r}")
        acc = r.get("acc,none", r.get("acc"))
        if acc is None:
            raise ValueError(f"lm-eval task {task!r} has no 'acc' metric (has {sorted(r)})")
        results[f"{task} acc"] = {"value": float(acc), "metric": "acc", "task": task,
                                  "stderr": r.get("acc_stderr,none", r.get("acc_stderr")),
                                  "num_fewshot": num_fewshot, "limit": limit}
    return results


def evaluate_model(model: nn.Module, tokenizer, data: List[str], seq_len: int, n_samples: Optional[int],
                   batch_size: int, runtime: Runtime, tasks: Optional[List[str]] = None,
                   text_column: str = "text", lm_eval_limit: Optional[float] = None,
                   num_fewshot: int = 0, cache: Optional[dict] = None) -> Dict[str, dict]:
    """Perplexity on every data spec (+ lm-eval tasks): ``{column: {"value", "metric", ...}}``.

    ``cache`` (spec -> ids) lets callers evaluate several models on identical token rows.
    """
    results: Dict[str, dict] = {}
    for spec in data:
        key = (spec, seq_len, n_samples)
        ids = (cache or {}).get(key)
        if ids is None:
            ids = load_eval_ids(spec, tokenizer, seq_len=seq_len, n_samples=n_samples, text_column=text_column)
            if cache is not None:
                cache[key] = ids
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(f"{spec}: token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
        t0 = time.time()
        loss = causal_lm_loss(model, ids, batch_size, runtime)
        col = f"{data_label(spec)} ppl@{ids.shape[1]}"
        if col in results:  # two files with the same stem (wiki.txt, wiki.safetensors): use full names
            col = f"{Path(spec).name} ppl@{ids.shape[1]}"
        results[col] = {"value": math.exp(loss), "metric": "ppl", "data": spec, "samples": int(ids.shape[0]),
                        "seq_len": int(ids.shape[1]), "nll": loss, "seconds": round(time.time() - t0, 2)}
    if tasks:
        results.update(run_lm_eval(model, tokenizer, tasks, batch_size=batch_size, device=str(runtime.device),
                                   limit=lm_eval_limit, num_fewshot=num_fewshot))
    return results


def load_tokenizer_for(path: str):
    """The folder's tokenizer (None when it has none: token-id data still works)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - token-id (.safetensors) data needs no tokenizer
        log.info("no tokenizer loaded from %s (%s); only token-id data can be evaluated", path,
                  type(e).__name__)
        return None


def evaluate_folder(path: str, data: List[str], seq_len: int = 2048, n_samples: Optional[int] = None,
                    batch_size: int = 8, runtime: str = "effqat", device: Optional[str] = None,
                    tasks: Optional[List[str]] = None, text_column: str = "text",
                    lm_eval_limit: Optional[float] = None, num_fewshot: int = 0,
                    cache: Optional[dict] = None) -> Dict[str, dict]:
    """Load an fp / EQAT / GPTQ / BitBLAS folder (or hub id for fp) and evaluate it."""
    from .loading import load_for_eval
    from .runtime import resolve_runtime

    if tasks:
        require_lm_eval()  # fail before loading anything
    rt = resolve_runtime(device)
    if runtime == "llama.cpp":
        return _evaluate_in_llama_cpp(path, data, seq_len, n_samples, batch_size, rt, tasks, text_column,
                                      lm_eval_limit, num_fewshot, cache)
    if os.path.isdir(path):
        from .env import third_party_stdout

        with third_party_stdout():  # GPTQModel prints while loading
            model = load_for_eval(path, runtime)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.to(rt.device)
    tokenizer = load_tokenizer_for(path)
    try:
        return evaluate_model(model, tokenizer, data, seq_len, n_samples, batch_size, rt, tasks=tasks,
                              text_column=text_column, lm_eval_limit=lm_eval_limit, num_fewshot=num_fewshot,
                              cache=cache)
    finally:
        del model


def _evaluate_in_llama_cpp(path, data, seq_len, n_samples, batch_size, rt, tasks, text_column,
                           lm_eval_limit, num_fewshot, cache):
    """The same windows scored by llama.cpp's logits (a folder goes through a temporary lossless GGUF)."""
    from .llama_cpp_runtime import LlamaCppLM, gguf_for

    if tasks:
        raise ValueError("--runtime llama.cpp computes perplexity only; run --tasks on another runtime")
    if rt.device.type != "cpu":
        raise ValueError("--runtime llama.cpp runs llama.cpp's CPU build here: use --device cpu")
    tokenizer = load_tokenizer_for(path) if os.path.isdir(path) else None
    with gguf_for(path) as gguf_path:
        model = LlamaCppLM(gguf_path, n_ctx=seq_len)
        try:
            return evaluate_model(model, tokenizer, data, seq_len, n_samples, batch_size, rt,
                                  text_column=text_column, cache=cache)
        finally:
            model.close()
