"""llama.cpp's own quantizer, called in-process: the starting point of a K-grid run.

Why a ctypes binding: a K-grid run starts each super-block from llama.cpp's own fit of it, so that an
untrained run *is* ``llama-quantize`` and training starts from the peer's answer. The fit must be
llama.cpp's exact code (its search per block, with or without an importance matrix), not a Python
re-implementation of it. llama-cpp-python already ships that code in its bundled ``libggml-base``
(built from the pinned sdist's vendored llama.cpp), and exports::

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start,
                               int64_t nrows, int64_t n_per_row, const float * imatrix);

(from ``libggml-base.so``, not ``libggml.so``). llama-cpp-python binds libllama's API, whose only
quantizer (``llama_model_quantize``) goes GGUF file to GGUF file; its internal ``_ggml`` module loads
libggml but binds no function. A K-grid run needs llama.cpp's fit of one in-memory tensor at a time
(streamed, with its own importance matrix), so the symbol is bound here through ctypes, once, lazily.
Nothing else in effqat needs it; without llama-cpp-python the K grids still train and export, only
this initialization is unavailable (:func:`available` says so; the tests skip).

:func:`quantize_chunk` returns llama.cpp's bytes; :func:`llama_cpp_fit` decodes them
(``effqat_plugin.converters.gguf_kblocks.decode``) into the fields of a K grid; :func:`dequantize`
is ggml's own C decoder of the same blocks (exported beside it), a second oracle for the tests.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .quantizer import KGRIDS, KGridParams

# ggml's enum ggml_type (ggml.h); the same numbers as gguf.GGMLQuantizationType. The K types are the
# grids a run trains; the 32-wide types are llama.cpp's fallbacks for rows a K type cannot hold and its
# choices for some tensors of a preset (``gguf_presets``); they go through this quantizer as they are.
K_TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
BLOCK32_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "IQ4_NL": 20}
GGML_TYPE = {**K_TYPES, **BLOCK32_TYPES}
SYMBOL = "ggml_quantize_chunk"
DEQUANTIZE_SYMBOL = {t: f"dequantize_row_q{t[1]}_K" for t in K_TYPES}   # Q2_K -> dequantize_row_q2_K
LIBRARY = "libggml-base.so"

_lib = None


def library_path() -> Path | None:
    """llama-cpp-python's bundled libggml-base (found without importing llama_cpp), or None."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "lib" / LIBRARY
        if p.exists():
            return p
    return None


def available() -> bool:
    return library_path() is not None


def _load():
    global _lib
    if _lib is None:
        path = library_path()
        if path is None:
            raise NotImplementedError("llama.cpp's quantizer needs llama-cpp-python (bash scripts/setup.sh "
                                      f"installs it): no llama_cpp/lib/{LIBRARY} found")
        lib = ctypes.CDLL(str(path))
        fn = getattr(lib, SYMBOL)
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        rs = lib.ggml_row_size
        rs.restype = ctypes.c_size_t
        rs.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        for qtype in K_TYPES:
            deq = getattr(lib, DEQUANTIZE_SYMBOL[qtype])
            deq.restype = None
            deq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        _lib = lib
    return _lib


def quantize_chunk(w, qtype: str, imatrix=None) -> np.ndarray:
    """llama.cpp's quantization of a float32 ``[rows, n_per_row]`` matrix (rows along in_features)
    as ``qtype``, with an optional importance matrix ``[n_per_row]`` (llama-imatrix's per-column
    weights): uint8 ``[rows, row bytes]``, the bytes ``llama-quantize`` writes for that tensor.
    ``qtype``: a K type or one of the 32-wide types (``BLOCK32_TYPES``)."""
    if qtype not in GGML_TYPE:
        raise ValueError(f"unknown block type {qtype!r}; one of {', '.join(GGML_TYPE)}")
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().float().numpy()
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a [rows, n_per_row] matrix, got shape {list(w.shape)}")
    rows, n = w.shape
    block = 256 if qtype in K_TYPES else 32
    if n <= 0 or n % block:   # ggml would abort the process on a ragged row; refuse here
        raise ValueError(f"{qtype} needs rows that are a multiple of {block} long (in_features), got {n}")
    imp = None
    if imatrix is not None:
        if isinstance(imatrix, torch.Tensor):
            imatrix = imatrix.detach().cpu().float().numpy()
        imp = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imp.shape[0] != n:
            raise ValueError(f"the importance matrix has {imp.shape[0]} entries for rows of {n}")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("the importance matrix must be finite and non-negative")
    lib = _load()
    t = GGML_TYPE[qtype]
    lib.ggml_quantize_init(t)   # IQ4_NL's tables (a no-op for the other types, and after the first call)
    row_bytes = lib.ggml_row_size(t, n)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    if rows:
        written = lib.ggml_quantize_chunk(t, w.ctypes.data, dst.ctypes.data, 0, rows, n,
                                          None if imp is None else imp.ctypes.data)
        if written != rows * row_bytes:
            raise RuntimeError(f"{SYMBOL} wrote {written} bytes, expected {rows * row_bytes}")
    return dst


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """ggml's own C dequantizer (``dequantize_row_q*_K``, the one llama.cpp's CPU backend uses to
    widen these blocks) of uint8 ``[rows, row bytes]``: float32 ``[rows, row bytes / size * 256]``."""
    if qtype not in K_TYPES:
        raise ValueError(f"ggml's C dequantizer is bound for the K types only ({', '.join(K_TYPES)}), "
                         f"not {qtype!r}; gguf.quants.dequantize decodes every type")
    lib = _load()
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    size = lib.ggml_row_size(GGML_TYPE[qtype], 256)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{qtype}: expected uint8 [rows, n * {size}] bytes, got {list(raw.shape)}")
    out = np.empty((raw.shape[0], raw.shape[1] // size * 256), dtype=np.float32)
    if out.size:
        getattr(lib, DEQUANTIZE_SYMBOL[qtype])(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def llama_cpp_fit(w, qtype: str, imatrix=None) -> KGridParams:
    """llama.cpp's fit of ``w`` on ``qtype``'s grid, as the fields a K-grid run starts from."""
    from effqat_plugin.converters.gguf_kblocks import decode

    if qtype not in KGRIDS:
        raise ValueError(f"{qtype} is not a K type; llama_cpp_fit gives the fields of {', '.join(KGRIDS)}")
    return decode(quantize_chunk(w, qtype, imatrix), qtype)
