"""Calibration / evaluation token data: one `[N, T]` LongTensor, whatever the user handed us.

Block-AP trains on fixed-length sequences (every layer sees the same batches), so every accepted
input (GPTQModel-style lists of dicts, lists of strings, token tensors, files) is normalised here to
``[N, T]`` token ids. Files are never unpickled: text, jsonl, parquet or safetensors only.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Union

import torch

Calibration = Union[torch.Tensor, Sequence[dict], Sequence[str], Sequence[Sequence[int]]]


class CalibrationError(ValueError):
    pass


def chunk_stream(ids: torch.Tensor, seq_len: int, n_samples: Optional[int] = None) -> torch.Tensor:
    """Cut one long token stream into ``[N, seq_len]`` rows (the tail that does not fill a row is dropped)."""
    ids = ids.reshape(-1).long()
    n = ids.numel() // seq_len
    if n == 0:
        raise CalibrationError(
            f"only {ids.numel()} tokens of data, fewer than one sequence of {seq_len}; "
            "give more data or a smaller sequence length")
    if n_samples is not None:
        n = min(n, n_samples)
    return ids[: n * seq_len].view(n, seq_len).clone()


def _rows_to_tensor(rows: List[torch.Tensor], seq_len: Optional[int], n_samples: Optional[int]) -> torch.Tensor:
    if not rows:
        raise CalibrationError("calibration data is empty")
    lengths = {int(r.numel()) for r in rows}
    if len(lengths) == 1 and (seq_len is None or seq_len == next(iter(lengths))):
        out = torch.stack([r.reshape(-1).long() for r in rows])
        return out[:n_samples] if n_samples else out
    # ragged rows: concatenate into one stream and cut equal rows, as calibration concat does
    stream = torch.cat([r.reshape(-1).long() for r in rows])
    if seq_len is None:
        seq_len = min(lengths)
    return chunk_stream(stream, seq_len, n_samples)


def normalize_calibration(calibration: Calibration, tokenizer=None, seq_len: Optional[int] = None,
                          n_samples: Optional[int] = None) -> torch.Tensor:
    """Accept what GPTQModel users pass and return ``[N, T]`` int64 token ids."""
    if calibration is None:
        raise CalibrationError("no calibration data given")
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise CalibrationError(f"calibration tensor must hold integer token ids, got {calibration.dtype}")
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise CalibrationError(f"calibration tensor must be [N, T] token ids, got {tuple(calibration.shape)}")
        out = calibration.long()
        if seq_len is not None and seq_len != out.shape[1]:
            out = chunk_stream(out, seq_len)
        return out[:n_samples] if n_samples else out
    items = list(calibration)
    if not items:
        raise CalibrationError("calibration data is empty")
    rows: List[torch.Tensor] = []
    if all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise CalibrationError("text calibration needs the model's tokenizer")
        for text in items:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids):
                rows.append(torch.as_tensor(ids))
        if not rows:
            raise CalibrationError("calibration texts tokenized to nothing")
        return chunk_stream(torch.cat(rows), seq_len or min(len(r) for r in rows), n_samples)
    for x in items:
        if isinstance(x, dict):
            if "input_ids" not in x:
                raise CalibrationError("calibration dicts need an 'input_ids' entry")
            ids = torch.as_tensor(x["input_ids"])
            mask = x.get("attention_mask")
            if mask is not None:
                ids = ids.reshape(-1)[torch.as_tensor(mask).reshape(-1).bool()]
        elif isinstance(x, (list, tuple, torch.Tensor)):
            ids = torch.as_tensor(x)
        else:
            raise CalibrationError(f"unsupported calibration item of type {type(x).__name__}")
        if ids.numel():
            rows.append(ids.reshape(-1))
    return _rows_to_tensor(rows, seq_len, n_samples)


def _texts_from_file(path: str) -> List[str]:
    if path.endswith(".jsonl"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or "text" not in rec:
                    raise CalibrationError(f"{path}:{lineno}: each line needs a \"text\" field")
                texts.append(rec["text"])
        return texts
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text"])
        return [t for t in table.column("text").to_pylist() if t]
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def load_token_file(path: str, tokenizer=None, seq_len: Optional[int] = None,
                    n_samples: Optional[int] = None) -> torch.Tensor:
    """``[N, T]`` token ids from a .safetensors (``input_ids``), .jsonl ("text"), .parquet or text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle")):
        raise CalibrationError(f"{path}: pickle-based files are not read (unsafe); use .safetensors")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from None
        if "input_ids" not in tensors:
            raise CalibrationError(f"{path}: needs an int64 tensor named 'input_ids' [N, T]; has {sorted(tensors)}")
        return normalize_calibration(tensors["input_ids"], seq_len=seq_len, n_samples=n_samples)
    texts = _texts_from_file(path)
    if tokenizer is None:
        raise CalibrationError(f"{path}: text data needs the model's tokenizer")
    stream = torch.cat([torch.as_tensor(tokenizer(t, add_special_tokens=True)["input_ids"]).long()
                        for t in texts if t])
    return chunk_stream(stream, seq_len or 2048, n_samples)


def save_token_file(path: str, input_ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"input_ids": input_ids.long().contiguous()}, path)


def _cache_keyword(model) -> str:
    """The name a model's forward takes its KV cache under (and returns it as): ``cache`` in
    transformers >= 5.24, where ``past_key_values`` is deprecated (removed in 5.40), else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()   # the KV cache would otherwise hold every step's graph: GBs within seconds
def sample_from_model(model, n_samples: int, seq_len: int, seed: int = 0, bos_token_id: int = 1,
                      temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """Sequences the model writes itself, from BOS at temperature 1: the data-free calibration default.

    Self-generated text follows the model's own distribution, which is what Block-AP's output
    matching needs; it is the documented fallback when no calibration file is given.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    cache_kw = _cache_keyword(model)
    out = []
    for start in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - start)
        ids = torch.full((b, 1), bos_token_id, dtype=torch.long, device=device)
        past = None
        step_in = ids
        for _ in range(seq_len - 1):
            res = model(input_ids=step_in, use_cache=True, **{cache_kw: past})
            past = getattr(res, cache_kw)
            probs = torch.softmax(res.logits[:, -1, :].float() / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            ids = torch.cat([ids, nxt], dim=1)
            step_in = nxt
        out.append(ids.cpu())
    return torch.cat(out)
