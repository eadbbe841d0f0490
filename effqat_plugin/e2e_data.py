"""E2E-QP training data: pretraining-style packed text and instruction (source -> target) examples.

* ``pretrain``: documents are tokenized, concatenated and cut into fixed ``seq_len`` rows (the loss
  is taken on every token). Files: plain text, ``.jsonl`` / ``.parquet`` with a ``text`` field, or
  ``.safetensors`` holding ``input_ids`` - read by :func:`effqat_plugin.data.load_token_file`.
* ``instruction``: records with ``instruction`` / ``input`` / ``output`` (Alpaca), ``prompt`` /
  ``response`` (or ``completion``), or ``conversations`` / ``messages`` (ShareGPT / deita; the last
  assistant turn is the target). Source truncated to ``source_len`` (384) from the left, target to
  ``target_len`` (128) from the right; labels are -100 on the source and on padding, so the loss is
  on target tokens only. Files: ``.jsonl``, ``.json`` (a list), ``.parquet``.
* anything that is not a file is taken as a ``datasets`` name and loaded with
  ``datasets.load_dataset`` (needs a reachable hub or a local cache; otherwise a clear error).

Files are never unpickled.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from .data import CalibrationError, chunk_stream, load_token_file

FORMATS = ("pretrain", "instruction")
DEFAULT_SOURCE_LEN = 384
DEFAULT_TARGET_LEN = 128
IGNORE_INDEX = -100

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class TokenDataset(Dataset):
    """Token rows for E2E-QP: ``input_ids`` ([N, T] tensor or a list of 1-D tensors) and optional
    ``labels`` of the same shapes (None: labels = input_ids, loss on every token)."""

    def __init__(self, input_ids: Union[torch.Tensor, Sequence[torch.Tensor]],
                 labels: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None):
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [N, T], got {tuple(input_ids.shape)}")
            input_ids = input_ids.long()
        if labels is not None and len(labels) != len(input_ids):
            raise ValueError(f"{len(labels)} label rows for {len(input_ids)} input rows")
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "labels": ids if self.labels is None else self.labels[i]}

    def split(self, n_val: int) -> Tuple["TokenDataset", Optional["TokenDataset"]]:
        """Hold out the last ``n_val`` rows."""
        n = len(self)
        n_val = max(0, min(int(n_val), n - 1))
        if n_val == 0:
            return self, None
        lab = self.labels
        return (TokenDataset(self.input_ids[: n - n_val], None if lab is None else lab[: n - n_val]),
                TokenDataset(self.input_ids[n - n_val:], None if lab is None else lab[n - n_val:]))

    def num_tokens(self) -> int:
        if isinstance(self.input_ids, torch.Tensor):
            return int(self.input_ids.numel())
        return sum(int(r.numel()) for r in self.input_ids)

    def num_target_tokens(self) -> int:
        rows = self.input_ids if self.labels is None else self.labels
        if self.labels is None:
            return sum(max(0, len(r) - 1) for r in rows)
        return sum(int((torch.as_tensor(r)[1:] != IGNORE_INDEX).sum()) for r in rows)


def collate(items: List[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples: padding gets ``pad_token_id``, label -100 and attention 0.
    Equal-length rows (packed pretraining data) get no attention mask at all; any other per-row
    tensors (the teacher's logits, ``e2e_qp.TeacherRows``) are stacked, for equal-length rows only."""
    lens = [int(x["input_ids"].numel()) for x in items]
    t = max(lens)
    extra = [k for k in items[0] if k not in ("input_ids", "labels")]   # per-row tensors (teacher logits)
    if all(n == t for n in lens):
        batch = {"input_ids": torch.stack([x["input_ids"].reshape(-1) for x in items]).long(),
                 "labels": torch.stack([x["labels"].reshape(-1) for x in items]).long()}
        batch.update({k: torch.stack([x[k] for x in items]) for k in extra})
        return batch
    if extra:
        raise ValueError(f"rows of different lengths cannot carry {', '.join(extra)}")
    ids = torch.full((len(items), t), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(items), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    for r, (x, n) in enumerate(zip(items, lens)):
        ids[r, :n] = x["input_ids"].reshape(-1)
        labels[r, :n] = x["labels"].reshape(-1)
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# -- pretraining --------------------------------------------------------------------------------
def pack_texts(texts: Iterable[str], tokenizer, seq_len: int, n_samples: Optional[int] = None) -> TokenDataset:
    """Tokenize documents (with the tokenizer's special tokens), concatenate, cut ``[N, seq_len]``."""
    if tokenizer is None:
        raise CalibrationError("text data needs the model's tokenizer")
    pieces = [torch.as_tensor(tokenizer(t, add_special_tokens=True)["input_ids"]).long() for t in texts if t]
    if not pieces:
        raise CalibrationError("no text to train on")
    return TokenDataset(chunk_stream(torch.cat(pieces), seq_len, n_samples))


def pretrain_dataset(path: str, tokenizer, seq_len: int, n_samples: Optional[int] = None) -> TokenDataset:
    return TokenDataset(load_token_file(path, tokenizer, seq_len=seq_len, n_samples=n_samples))


# -- instruction ------------------------------------------------------------------------------------
def _turns(conv) -> List[Tuple[str, str]]:
    out = []
    for t in conv:
        if not isinstance(t, dict):
            raise CalibrationError("conversation turns must be objects with from/value or role/content")
        role = str(t.get("from", t.get("role", ""))).lower()
        text = t.get("value", t.get("content", ""))
        out.append(("assistant" if role in ("gpt", "assistant", "model", "bot") else role, text or ""))
    return out


def instruction_pair(rec: dict) -> Tuple[str, str]:
    """(source prompt, target) of one instruction record (Alpaca, prompt/response or a conversation)."""
    if "instruction" in rec and "output" in rec:
        inp = rec.get("input") or ""
        tpl = ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT
        return tpl.format(instruction=rec["instruction"], input=inp), rec["output"]
    for src, tgt in (("prompt", "response"), ("prompt", "completion"), ("input", "output"),
                     ("question", "answer"), ("source", "target")):
        if src in rec and tgt in rec:
            return rec[src] or "", rec[tgt] or ""
    conv = rec.get("conversations", rec.get("messages"))
    if isinstance(conv, list) and conv:
        turns = _turns(conv)
        last = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=None)
        if last is None:
            raise CalibrationError("conversation has no assistant turn")
        src = "".join(("### Human: " if r in ("human", "user") else
                       "### Assistant: " if r == "assistant" else f"### {r.capitalize()}: ") + t + "\n"
                      for r, t in turns[:last])
        return src + "### Assistant: ", turns[last][1]
    raise CalibrationError("instruction records need instruction/input/output (Alpaca), prompt/response "
                           f"or conversations/messages fields; got {sorted(rec)[:8]}")


def tokenize_instruction(pairs: Iterable[Tuple[str, str]], tokenizer, source_len: int = DEFAULT_SOURCE_LEN,
                         target_len: int = DEFAULT_TARGET_LEN) -> TokenDataset:
    """BOS + source (last ``source_len`` tokens) + target + EOS (first ``target_len`` tokens);
    labels -100 on the source."""
    if tokenizer is None:
        raise CalibrationError("instruction data needs the model's tokenizer")
    if source_len < 1 or target_len < 1:
        raise ValueError("source and target lengths must be >= 1")
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    ids_rows, label_rows = [], []
    for source, target in pairs:
        src = list(tokenizer(source, add_special_tokens=False)["input_ids"])
        tgt = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        if not tgt:
            continue
        if bos is not None:
            src = [bos] + src[-(source_len - 1):] if source_len > 1 else [bos]
        else:
            src = src[-source_len:]
        if eos is not None:
            tgt = tgt + [eos]
        tgt = tgt[:target_len]
        ids_rows.append(torch.tensor(src + tgt, dtype=torch.long))
        label_rows.append(torch.tensor([IGNORE_INDEX] * len(src) + tgt, dtype=torch.long))
    if not ids_rows:
        raise CalibrationError("no instruction example with a non-empty target")
    return TokenDataset(ids_rows, label_rows)


# -- sources ------------------------------------------------------------------------------------------
def read_records(path: str) -> List[dict]:
    """Records of a .jsonl, .json (a list of objects) or .parquet file."""
    if path.endswith(".jsonl"):
        recs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e})") from None
        return recs
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise CalibrationError(f"{path}: expected a JSON list of records")
        return data
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise CalibrationError(f"{path}: instruction data must be .jsonl, .json or .parquet")


def looks_like_path(spec: str) -> bool:
    return (os.sep in spec and os.path.splitext(spec)[1] != "") or spec.startswith((".", "/", "~")) or \
        spec.endswith((".txt", ".jsonl", ".json", ".parquet", ".safetensors"))


def load_hub_dataset(name: str, split: str = "train", config: Optional[str] = None):
    """``datasets.load_dataset(name)`` with a clear error when no hub (and no cache) is reachable."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"{name!r} is not a file and the `datasets` package is not installed") from e
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, offline mode, ...
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ValueError(
            f"--data {name!r} is not a file, and loading it as a `datasets` name failed "
            f"({type(e).__name__}: {str(e)[:200]}){' - offline mode is set' if offline else ''}; "
            "give a local .txt/.jsonl/.json/.parquet/.safetensors file or make the hub reachable") from None


def load_e2e_data(spec: str, tokenizer, fmt: str = "pretrain", seq_len: int = 4096,
                  source_len: int = DEFAULT_SOURCE_LEN, target_len: int = DEFAULT_TARGET_LEN,
                  n_samples: Optional[int] = None, split: str = "train",
                  dataset_config: Optional[str] = None) -> TokenDataset:
    """One training (or evaluation) dataset from a file or a ``datasets`` name."""
    if fmt not in FORMATS:
        raise ValueError(f"data format {fmt!r}: use one of {FORMATS}")
    if os.path.isfile(spec):
        if fmt == "pretrain":
            return pretrain_dataset(spec, tokenizer, seq_len, n_samples)
        recs = read_records(spec)
    elif looks_like_path(spec) or os.path.isdir(spec):
        raise FileNotFoundError(f"data file not found: {spec}")
    else:
        ds = load_hub_dataset(spec, split, dataset_config)
        if fmt == "pretrain":
            if "text" not in ds.column_names:
                raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
            texts = ds["text"] if n_samples is None else ds.select(range(min(len(ds), n_samples * 4)))["text"]
            return pack_texts(texts, tokenizer, seq_len, n_samples)
        recs = ds if n_samples is None else ds.select(range(min(len(ds), n_samples)))
    if n_samples is not None:
        recs = list(recs)[:n_samples]
    return tokenize_instruction((instruction_pair(r) for r in recs), tokenizer, source_len, target_len)


def default_val_samples(n: int, cap: int = 64) -> int:
    """Held-out rows when no eval file is given: 1/16 of the data, at least 1 (if n >= 2), at most ``cap``."""
    if n < 2:
        return 0
    return max(1, min(cap, n // 16))


__all__ = ["TokenDataset", "collate", "pack_texts", "pretrain_dataset", "instruction_pair",
           "tokenize_instruction", "read_records", "load_e2e_data", "load_hub_dataset", "default_val_samples",
           "FORMATS", "IGNORE_INDEX"]
