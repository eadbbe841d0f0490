"""Self-generated samples as a file: what `effqat sample` writes and `quantize --self-generated-from` reads.

Sampling is the one step of the default recipe that needs the whole fp model, and it does not depend
on the bit width, so it is worth doing once (or on a fast inference server) and reusing. The file is
a safetensors file (never a pickle) with one integer tensor ``input_ids`` ``[N, T]`` and string
metadata (model, vocabulary size, seed, dtype, sampler): enough to check the file against the model
it is used with, and its sha256 identifies it in ``meta.eqat``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from .data import CalibrationError

FORMAT = "effqat-self-generated/1"
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass
class SampleFile:
    """Token ids ``[N, T]`` (int64), the file's metadata (strings) and its sha256."""
    input_ids: torch.Tensor
    metadata: dict = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    def record(self) -> dict:
        """What meta.eqat records about the file (identity, not the tokens)."""
        out = {"file": os.path.basename(self.path), "sha256": self.sha256,
               "shape": [int(s) for s in self.input_ids.shape]}
        for key in ("model", "seed", "dtype", "sampler"):
            if key in self.metadata:
                out[key] = self.metadata[key]
        return out


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sample_file(path: str, input_ids: torch.Tensor, metadata: dict, overwrite: bool = False) -> str:
    """Write ``input_ids`` with ``metadata`` to ``path`` atomically (a temporary file next to it,
    then a rename), so an interrupted run never leaves a half file that a later run would trust;
    refuses an existing ``path`` unless ``overwrite``. Returns the file's sha256."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder of the output file not found: {folder}")
    meta = {"format": FORMAT, **{str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".effqat-sample-", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
    try:
        save_file({"input_ids": input_ids.long().contiguous()}, tmp, metadata=meta)
        digest = sha256_of(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return digest


def read_sample_file(path: str) -> SampleFile:
    """The samples in ``path``; one-line errors (FileNotFoundError / CalibrationError) for a missing,
    pickled, unreadable or malformed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--self-generated-from: file not found: {path}")
    if not path.endswith(".safetensors"):
        raise CalibrationError(f"--self-generated-from {path}: expected a .safetensors file (as `effqat sample` "
                               "writes: int tensor 'input_ids' [N, T]); other formats, pickles above all, are not read")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            if "input_ids" not in keys:
                raise CalibrationError(f"--self-generated-from {path}: needs an integer tensor 'input_ids' "
                                       f"[N, T]; has {sorted(keys)}")
            ids = f.get_tensor("input_ids")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, CalibrationError):
            raise
        raise CalibrationError(f"--self-generated-from {path}: not a readable safetensors file "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if ids.dtype not in INT_DTYPES or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CalibrationError(f"--self-generated-from {path}: 'input_ids' must be integer token ids [N, T] with "
                               f"N >= 1 and T >= 2, got {ids.dtype} {tuple(ids.shape)}")
    return SampleFile(input_ids=ids.long(), metadata=metadata, sha256=sha256_of(path), path=path)


def check_against(sample: SampleFile, vocab_size: int, seq_len: int, n: Optional[int] = None) -> torch.Tensor:
    """``sample``'s ids, checked against the model's vocabulary and the run's ``--seq-len`` (the
    samples join the calibration's batches, so their length must be the same); the first ``n`` rows
    when ``n`` is given."""
    ids, path = sample.input_ids, sample.path
    if ids.shape[1] != seq_len:
        raise CalibrationError(f"--self-generated-from {path}: sequences of {ids.shape[1]} tokens, but --seq-len "
                               f"is {seq_len}; sample with `effqat sample ... --seq-len {seq_len}`")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise CalibrationError(f"--self-generated-from {path}: token ids in [{lo}, {hi}] but the model's vocabulary "
                               f"has {vocab_size} entries (ids 0..{vocab_size - 1}); samples of another model?")
    if n is not None:
        if n > ids.shape[0]:
            raise CalibrationError(f"--self-generated-from {path}: holds {ids.shape[0]} samples, {n} asked for")
        ids = ids[:n]
    return ids
