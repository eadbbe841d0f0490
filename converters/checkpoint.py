"""Safetensors folders: lazy shard-by-shard reading, size-capped shard writing, atomic output.

Nothing here ever unpickles: only ``.safetensors`` files are opened; folders whose weights are
``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` are refused. Every file safetensors cannot read (truncated,
corrupt header, index naming a missing shard) becomes one ValueError / FileNotFoundError naming it.
Conversions read through private mappings and write unchanged tensors with ``copy_file_range``
(see ``SafetensorsFolder.get``), so bytes that do not change never pass through Python.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
import shutil
import tempfile
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing as _closing, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open

log = logging.getLogger("effqat.converters")

ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
             "I64": torch.int64, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
WRITE_CHUNK = 64 << 20
SINGLE_NAME = "model.safetensors"
PICKLE_WEIGHT_RE = re.compile(r"(pytorch_model.*\.bin|.*\.(pt|pth|ckpt)|model.*\.bin|adapter_model\.bin)$")
# Files never copied verbatim into a converted folder (weights, index, our own config).
# Never copied from SRC: configs we rewrite, and another folder's evaluation results and model card.
NOT_CARRIED = {"quantize_config.json", INDEX_NAME, "effqat_eval.json", "quality_table.json", "quality.png",
               "block_ap_loss.png", "README.md"}


def parse_size(size) -> int:
    """'4GB' / '500MB' / '2GiB' / int bytes -> bytes (decimal units as in HF, binary with 'i')."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 4GB, 500MB, 2GiB")
    num, unit, binary = m.groups()
    base = 1024 if binary else 1000
    mult = {"": 1, "K": base, "M": base**2, "G": base**3, "T": base**4}[unit]
    value = int(float(num) * mult)
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def safetensors_error(path: Path, err: Exception) -> ValueError:
    """One clear line for a file safetensors cannot read (truncated, corrupt header, not safetensors)."""
    msg = str(err).replace("Error while deserializing header: ", "")
    return ValueError(f"{path}: corrupt or truncated safetensors file ({msg})")


@contextmanager
def open_safetensors(path: Path):
    """``safe_open`` whose failures (``SafetensorError``, I/O errors) become one ValueError naming the file."""
    try:
        f = safe_open(path, framework="pt")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except Exception as e:  # safetensors_rust.SafetensorError is a bare Exception subclass
        raise safetensors_error(path, e) from None
    with f:
        yield f


def check_safetensors_folder(path) -> "SafetensorsFolder":
    """Read every shard header (no tensor data) of a model folder and check index / shards agree.

    For folders loaded by other libraries (transformers' ``from_pretrained`` of an fp model, say),
    whose own errors are tracebacks: truncated or corrupt shards, an index naming a missing shard or
    tensors, duplicate tensors all become one ValueError / FileNotFoundError naming the file.
    """
    return SafetensorsFolder(path)


class SafetensorsFolder:
    """Key -> shard map of a folder; tensors are read lazily, one shard kept open at a time."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist")
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is not a folder")
        files = sorted(p.name for p in self.path.iterdir() if p.is_file())
        st = [f for f in files if f.endswith(".safetensors")]
        pickles = [f for f in files if PICKLE_WEIGHT_RE.fullmatch(f)]
        if not st:
            if pickles:
                raise ValueError(
                    f"{self.path} holds only pickled weights ({', '.join(pickles[:3])}); effqat never "
                    "unpickles files. Re-save the model with safetensors (save_pretrained(..., "
                    "safe_serialization=True)) in an environment you trust.")
            raise FileNotFoundError(f"no .safetensors weights in {self.path}")
        if pickles:
            log.warning("ignoring pickled files %s in %s (safetensors weights are used)", pickles, self.path)
        self.key_to_file: dict[str, str] = {}
        if INDEX_NAME in files:
            with open(self.path / INDEX_NAME, encoding="utf-8") as f:
                try:
                    index = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{self.path / INDEX_NAME} is not valid JSON: {e}") from None
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError(f"{self.path / INDEX_NAME} has no valid weight_map")
            missing = sorted({v for v in wm.values() if v not in files})
            if missing:
                raise FileNotFoundError(
                    f"{self.path / INDEX_NAME} names missing shard file(s): {', '.join(missing[:5])}")
            self.key_to_file = dict(wm)
            self.shards = list(dict.fromkeys(wm.values()))
            extra = [f for f in st if f not in self.shards]
            if extra:
                raise ValueError(
                    f"{self.path} mixes weight sets: {', '.join(extra)} are not in {INDEX_NAME}; "
                    "keep one checkpoint per folder")
        else:
            self.shards = st
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        seen: dict[str, str] = {}
        for shard in self.shards:
            with open_safetensors(self.path / shard) as f:
                for k in f.keys():
                    if k in seen and seen[k] != shard:
                        raise ValueError(
                            f"tensor {k} appears in both {seen[k]} and {shard}: mixed checkpoints in one folder")
                    if self.key_to_file and self.key_to_file.get(k) != shard:
                        raise ValueError(f"tensor {k} found in {shard} but the index maps it elsewhere")
                    seen[k] = shard
                    sl = f.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = sl.get_dtype()
        if self.key_to_file:
            absent = [k for k in self.key_to_file if k not in seen]
            if absent:
                raise ValueError(f"{self.path / INDEX_NAME} lists tensors missing from the shards: {absent[:5]}")
        self.key_to_file = seen
        self.keys = list(seen)
        self._open_name = None
        self._open = None
        self._header = None
        self.mmap_reads = False   # convert() turns this on: see get()
        self._maps: dict = {}     # shard -> (file, mmap, uint8 tensor over it, header, data base)

    def shard_keys(self, shard: str) -> list[str]:
        return [k for k in self.keys if self.key_to_file[k] == shard]

    def _mapped(self, shard: str):
        m = self._maps.get(shard)
        if m is None:
            path = self.path / shard
            f = open(path, "rb")
            try:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                size = os.fstat(f.fileno()).st_size
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:   # touching a page past EOF would be SIGBUS, not an error
                    raise ValueError(f"data ends at {8 + n + end}, file has {size} bytes")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (struct.error, ValueError, UnicodeDecodeError, OSError) as e:
                f.close()
                raise safetensors_error(path, e) from None
            m = (f, mm, torch.frombuffer(mm, dtype=torch.uint8), header, 8 + n)
            self._maps[shard] = m
        return m

    def _get_mapped(self, key: str, shard: str) -> torch.Tensor | None:
        f, mm, buf, header, base = self._mapped(shard)
        info = header[key]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{key}: unsupported safetensors dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if (base + start) % torch.empty((), dtype=dtype).element_size():
            return None   # unaligned data: the plain read path copies it
        return buf[base + start: base + end].view(dtype).reshape(info["shape"])

    def source_range(self, t: torch.Tensor):
        """(fd, offset) when ``t`` is an untouched view of a mapped shard (write it by copy_file_range)."""
        if not self._maps or not t.is_contiguous():
            return None
        p, nb = t.data_ptr(), t.numel() * t.element_size()
        for f, mm, buf, header, base in self._maps.values():
            p0 = buf.data_ptr()
            if p0 <= p and p + nb <= p0 + buf.numel():
                return f.fileno(), p - p0
        return None

    def drop_pages(self, keys) -> None:
        """Give back the mapped pages of these tensors once they are consumed (``MADV_DONTNEED``).

        Reading a mapping keeps its pages resident (and counted in RSS) until the mapping goes; a
        conversion touches every qweight it repacks, so without this peak RSS would grow to a whole
        shard on top of the output being collected. Views still held (to be copied file-to-file
        later) stay valid: a dropped page of a private, unmodified mapping is re-read from the file.
        """
        if not self._maps or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            shard = self.key_to_file.get(key)
            m = self._maps.get(shard)
            if m is None:
                continue
            f, mm, buf, header, base = m
            start, end = header[key]["data_offsets"]
            lo = -(-(base + start) // page) * page
            hi = (base + end) // page * page
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_maps(self):
        """Drop the shard mappings (tensors still viewing them keep their pages alive until freed)."""
        for f, mm, buf, header, base in self._maps.values():
            f.close()
        self._maps = {}

    def get(self, key: str) -> torch.Tensor | None:
        """Read one tensor.

        Plain file reads by default (only tensors in flight count in RSS). With ``mmap_reads`` the
        tensor is a zero-copy view of a private mapping of the shard: pages are read only if touched,
        and :func:`write_safetensors` copies untouched views file-to-file in the kernel
        (``copy_file_range``), so a conversion that keeps qweight bytes never moves them through
        Python at all.
        """
        shard = self.key_to_file.get(key)
        if shard is None:
            return None
        if self.mmap_reads:
            t = self._get_mapped(key, shard)
            if t is not None:
                return t
        if self._open_name != shard:
            self.close()
            f = open(self.path / shard, "rb")
            try:  # checked by safe_open in __init__; the file may have changed since
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                f.close()
                raise safetensors_error(self.path / shard, e) from None
            self._open, self._open_name, self._header, self._base = f, shard, header, 8 + n
        info = self._header[key]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{key}: unsupported safetensors dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self._open.seek(self._base + start)
        got = self._open.readinto(memoryview(buf.numpy()))
        if got != end - start:
            raise ValueError(f"{self.path / shard}: truncated safetensors file ({key} is cut short)")
        return buf.view(dtype).reshape(info["shape"])

    def close(self):
        if self._open is not None:
            self._open.close()
        self._open = None
        self._open_name = None

    def total_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.shards)

    def largest_shard_bytes(self) -> int:
        return max((self.path / s).stat().st_size for s in self.shards)


class DerivedTensor:
    """A tensor computed from ``base`` only while it is written (``write_safetensors``).

    A conversion that changes a qweight's bytes (GPTQ v1's sign flip, BitBLAS's transpose and field
    order) would otherwise read the mapped source through page faults, fill a fresh array (zero-fill
    faults again) and hold every such array of a shard until the shard is written. Here the writer
    reads the base's bytes into a reused buffer (``pread`` from the source file when the base views a
    shard), ``fn(base_array, out_array)`` fills a second reused buffer, and that is written: two
    passes over warm memory per tensor, and only one tensor's worth in flight.
    """

    def __init__(self, base: torch.Tensor, shape, dtype: torch.dtype, fn):
        self.base, self.shape, self.dtype, self.fn = base, torch.Size(shape), dtype, fn

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def contiguous(self) -> "DerivedTensor":
        return self

    def to(self, dtype: torch.dtype):
        return self if dtype == self.dtype else self.materialize().to(dtype)

    def materialize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.fn(self.base.contiguous().numpy(), out.numpy())
        return out

    def produce(self, source, scratch: "_Scratch", slot: int = 1) -> int:
        """Compute the output bytes into ``scratch``'s buffer ``slot`` (valid until that slot is used
        again; slot 0 holds the input bytes meanwhile); returns their length."""
        base = self.base
        nb = base.numel() * base.element_size()
        a = scratch.buffer(0, nb)
        rng = source(base) if source is not None else None
        if rng is None or not _pread_into(rng[0], a, rng[1]):
            a[:] = base.contiguous().view(-1).view(torch.uint8).numpy()
        np_in = a.view(_np_dtype(base.dtype)).reshape(tuple(base.shape))
        nb_out = self.numel() * self.element_size()
        b = scratch.buffer(slot, nb_out)
        self.fn(np_in, b.view(_np_dtype(self.dtype)).reshape(tuple(self.shape)))
        return nb_out


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def _pread_into(fd: int, buf, offset: int) -> bool:
    """Fill ``buf`` (a uint8 numpy array) from ``fd`` at ``offset``; False if the file is short."""
    mv, done = memoryview(buf), 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True


class _Scratch:
    """Reused buffers for :class:`DerivedTensor`, grown, never shrunk, while a file is written.

    Slot 0 (the input bytes) is plain memory. Output slots are shared mappings of a ``memfd`` where
    the OS has one, and :meth:`append_to` hands them to the file with ``sendfile``: on this project's
    machine (Linux 6.18, ext4) ``write()`` from process memory ran at 0.6-3 GB/s, varying 5x between
    identical runs, while the same bytes staged in a memfd and sent in the kernel ran at a steady
    2+ GB/s (7B-shaped 2 GB shard, pread + XOR + store: median 3.16 s vs 1.03 s; copy_file_range of
    the unchanged file 0.58 s). Elsewhere the output slots are plain memory and ``write()`` is used.
    """

    def __init__(self):
        self._bufs: dict = {}
        self._memfds: dict = {}   # slot -> (fd, mmap) when staged in a memfd
        self._staged = hasattr(os, "memfd_create") and hasattr(os, "sendfile")

    def buffer(self, slot: int, nbytes: int) -> np.ndarray:
        buf = self._bufs.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._bufs[slot] = self._allocate(slot, nbytes)
        return buf[:nbytes]

    def _allocate(self, slot: int, nbytes: int) -> np.ndarray:
        if slot == 0 or not self._staged:
            return np.empty(nbytes, dtype=np.uint8)
        self._release(slot)
        size = max(nbytes, 1)
        fd = os.memfd_create(f"effqat-stage-{slot}", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            self._staged = False
            return np.empty(nbytes, dtype=np.uint8)
        self._memfds[slot] = (fd, m)
        return np.frombuffer(m, dtype=np.uint8)

    def append_to(self, f, slot: int, nbytes: int) -> None:
        """Append the first ``nbytes`` of output slot ``slot`` to ``f`` (run by the writer thread)."""
        staged = self._memfds.get(slot)
        if staged is not None:
            done = 0
            while done < nbytes:
                n = os.sendfile(f.fileno(), staged[0], done, nbytes - done)
                if n <= 0:
                    raise OSError(f"sendfile stopped after {done} of {nbytes} bytes")
                done += n
            return
        _write_all(f, memoryview(self._bufs[slot])[:nbytes])

    def _release(self, slot: int) -> None:
        self._bufs.pop(slot, None)   # the mapping closes when its last array view is gone
        staged = self._memfds.pop(slot, None)
        if staged is not None:
            os.close(staged[0])

    def close(self) -> None:
        for slot in list(self._memfds):
            self._release(slot)
        self._bufs.clear()


class ShardWriter:
    """Collects tensors and flushes a shard whenever the next tensor would pass ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict | None = None, source=None):
        self.folder = Path(folder)
        self.source = source   # tensor -> (fd, offset) | None: bytes to copy from a source file
        self.max_bytes = max_bytes
        self.metadata = metadata or {"format": "pt"}
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []
        self.total = 0
        self.names: set[str] = set()

    def add(self, name: str, t: torch.Tensor):
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        t = t.contiguous()
        nb = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + nb > self.max_bytes:
            self.flush()
        self.buf[name] = t
        self.buf_bytes += nb
        self.total += nb

    def flush(self):
        if not self.buf:
            return
        tmp_name = f"part-{len(self.parts):05d}.safetensors"
        write_safetensors(self.folder / tmp_name, self.buf, self.metadata, self.source)
        self.parts.append((tmp_name, list(self.buf)))
        self.buf = {}
        self.buf_bytes = 0

    def finish(self) -> list[str]:
        self.flush()
        if len(self.parts) == 1:
            os.replace(self.folder / self.parts[0][0], self.folder / SINGLE_NAME)
            return [SINGLE_NAME]
        n = len(self.parts)
        weight_map = {}
        names = []
        for i, (tmp, keys) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            for k in keys:
                weight_map[k] = final
        with open(self.folder / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return names


def safetensors_header(entries, metadata: dict | None = None) -> bytes:
    """The length prefix and JSON header of a .safetensors file whose tensors, ``(name, dtype, shape,
    nbytes)`` in ``entries``, follow back to back (padded to 8 bytes, as the safetensors library writes)."""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, nb in entries:
        header[name] = {"dtype": ST_NAMES[dtype], "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None, source=None):
    """Write a .safetensors file tensor by tensor (no whole-file bytes copy in memory).

    ``source(t)`` may return ``(fd, offset)`` for a tensor whose bytes already sit in a source file;
    they are then copied file-to-file by the kernel (``os.copy_file_range``) instead of through a
    Python buffer. :class:`DerivedTensor` entries are computed here, one at a time, while the previous
    one is being written (:class:`_OrderedAppender`).
    """
    for k, t in tensors.items():
        if t.dtype not in ST_NAMES:
            raise ValueError(f"{k}: dtype {t.dtype} cannot be stored")
    hb = safetensors_header(((k, t.dtype, list(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()),
                            metadata)
    scratch = _Scratch()
    with open(path, "wb", buffering=0) as f, _closing(scratch):
        f.write(hb)
        with _OrderedAppender(f) as out:
            n_derived = 0
            for t in tensors.values():
                if not t.numel():
                    continue
                if isinstance(t, DerivedTensor):
                    slot = 1 + n_derived % 2          # the output buffer the write before last used
                    out.wait_for(slot)
                    nbytes = t.produce(source, scratch, slot)
                    out.append_staged(scratch, slot, nbytes)
                    n_derived += 1
                else:
                    out.append_tensor(t, source(t) if source is not None else None)


class _OrderedAppender:
    """Appends to an open file on one background thread, in submission order.

    ``sendfile`` / ``write`` / ``copy_file_range`` release the GIL, and so do the numpy passes and
    ``pread`` that compute a :class:`DerivedTensor`, so the next tensor is computed while this one is
    written: a conversion costs about max(compute, write) rather than their sum. A buffer is reused
    only after its write finished (``wait_for``); an error in the writer thread is raised in the
    caller at the next submission or at exit, and the file is never closed under a running write.
    """

    def __init__(self, f):
        self.f = f
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="effqat-write")
        self.pending: deque = deque()
        self.by_slot: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)   # never close the file under a running write
        return False

    def _submit(self, fn, *args):
        fut = self.pool.submit(fn, *args)
        self.pending.append(fut)
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()   # surface errors early; keep the deque short
        return fut

    def wait_for(self, slot: int):
        fut = self.by_slot.pop(slot, None)
        if fut is not None:
            fut.result()

    def append_staged(self, scratch: _Scratch, slot: int, nbytes: int):
        self.by_slot[slot] = self._submit(scratch.append_to, self.f, slot, nbytes)

    def append_tensor(self, t: torch.Tensor, rng):
        self._submit(_append_tensor, self.f, t, rng)


def _append_tensor(f, t: torch.Tensor, rng):
    """Append ``t``'s bytes: copied file-to-file when ``rng`` = (fd, offset) says where they are."""
    if rng is not None and _copy_range(rng[0], f.fileno(), rng[1], t.numel() * t.element_size()):
        return
    mv = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
    for i in range(0, len(mv), WRITE_CHUNK):   # bounded syscalls: steadier under
        _write_all(f, mv[i:i + WRITE_CHUNK])    # dirty-page throttling than one huge write


def _write_all(f, mv):
    while len(mv):
        n = f.write(mv)
        mv = mv[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int) -> bool:
    """Append ``nbytes`` of ``src_fd`` at ``offset`` to ``dst_fd``; False if the kernel can't (then
    nothing was written and the caller writes the bytes itself)."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
            if n <= 0:
                break
            done += n
    except OSError:
        pass
    if done == nbytes:
        return True
    if done:   # partial copy: finish with a plain read + write of the rest
        with os.fdopen(os.dup(src_fd), "rb") as s:
            s.seek(offset + done)
            rest = s.read(nbytes - done)
        if len(rest) != nbytes - done:
            raise ValueError("source file shrank while converting")
        os.write(dst_fd, rest)
        return True
    return False


def check_destination(src, dst, overwrite: bool) -> Path:
    dst = Path(dst)
    if src is not None and dst.resolve() == Path(src).resolve():
        raise ValueError("destination must differ from the source folder")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    return dst


@contextmanager
def atomic_folder(dst, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dst``, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise FileExistsError(f"{dst} appeared while converting; not replacing it")
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dst, overwrite: bool) -> Iterator[Path]:
    """:func:`atomic_folder` for a single-file output (GGUF): a temporary sibling path that
    replaces ``dst`` on success and is removed on any error."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} appeared while converting; not replacing it")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def carried_files(src_or_files) -> list[Path]:
    """Non-weight files to copy unchanged: config, generation config, tokenizer, README, ..."""
    if src_or_files is None:
        return []
    if isinstance(src_or_files, (str, os.PathLike)) and Path(src_or_files).is_dir():
        out = []
        for p in sorted(Path(src_or_files).iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name in NOT_CARRIED or p.name.endswith(".safetensors") or PICKLE_WEIGHT_RE.fullmatch(p.name):
                continue
            out.append(p)
        return out
    if isinstance(src_or_files, (str, os.PathLike)):
        src_or_files = [src_or_files]
    out = []
    for p in src_or_files:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        out.append(p)
    return out


def copy_files(files: Iterable[Path], dst: Path, hf_quant_cfg: dict | None):
    """Copy carried files; ``config.json`` gets ``quantization_config = hf_quant_cfg`` (or loses a
    stale one when the target format has none, e.g. EQAT, which transformers cannot load)."""
    for p in files:
        target = dst / p.name
        if p.name == "config.json":
            with open(p, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p} is not valid JSON: {e}") from None
            if hf_quant_cfg is not None or "quantization_config" in cfg:
                if hf_quant_cfg is None:
                    cfg.pop("quantization_config", None)
                else:
                    cfg["quantization_config"] = hf_quant_cfg
                with open(target, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=2)
                continue
        shutil.copy2(p, target)


def write_json(path: Path, obj: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
