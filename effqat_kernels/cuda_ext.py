"""CUDA C++ dequant extension (``csrc/effqat_dequant.cu`` + ``csrc/effqat_binding.cpp``).

JIT-built with :func:`torch.utils.cpp_extension.load` on first use, for sm_80 and sm_90 (+PTX), into
``$EFFQAT_CUDA_BUILD_DIR`` (default: torch's extension cache). Backend ``cuda``: forward / grad_x =
CUDA dequant into a transient fp16/bf16 weight + cuBLAS GEMM; grad_s / grad_z via the Triton
reduction kernel when Triton is available, else torch. ``EFFQAT_NO_CUDA_EXT=1`` disables the build.
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading

import torch

from . import reference as _ref
from ._util import new_output

log = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "effqat_dequant.cu", CSRC / "effqat_binding.cpp"]
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + ARCH_FLAGS

_lock = threading.Lock()
_ext = None
_failed = None


def build(verbose: bool = False):
    """Build (or load the cached build of) the extension; raises on failure."""
    global _ext, _failed
    with _lock:
        if _ext is not None:
            return _ext
        from torch.utils.cpp_extension import load
        build_dir = os.environ.get("EFFQAT_CUDA_BUILD_DIR")
        if build_dir:
            os.makedirs(build_dir, exist_ok=True)
        old = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # gencodes come from ARCH_FLAGS too
        try:
            _ext = load(name="effqat_dequant_ext", sources=[str(s) for s in SOURCES],
                        extra_cflags=["-O3", "-std=c++20"], extra_cuda_cflags=NVCC_FLAGS,
                        build_directory=build_dir, verbose=verbose)
        except Exception as e:  # noqa: BLE001
            _failed = repr(e)
            raise
        finally:
            if old is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old
        return _ext


def available() -> bool:
    if os.environ.get("EFFQAT_NO_CUDA_EXT", "0") == "1" or not torch.cuda.is_available():
        return False
    if _ext is not None:
        return True
    if _failed is not None:
        return False
    try:
        build()
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("effqat CUDA extension did not build; not using it: %s", e)
        return False


def dequantize(packed, scales, zeros, bits, group_size, in_features, dtype=torch.float16,
               rows=None):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or packed.device.type != "cuda":
        return _ref.dequantize(packed, scales, zeros, bits, group_size, in_features, dtype)
    ext = build()
    out = new_output((scales.shape[0], in_features), dtype, packed.device)
    ext.dequant_into(packed.contiguous(), zeros.detach().to(torch.float32).contiguous(),
                     scales.detach().to(torch.float32).contiguous(), out, int(bits),
                     int(_ref.effective_group(group_size, in_features)))
    return out


def forward(x2d, packed, scales, zeros, bits, group_size, in_features):
    if x2d.shape[0] == 0 or x2d.dtype == torch.float64:
        return _ref.forward(x2d, packed, scales, zeros, bits, group_size, in_features)
    w = dequantize(packed, scales, zeros, bits, group_size, in_features, x2d.dtype)
    return x2d @ w.t()


def grad_input(grad_y2d, packed, scales, zeros, bits, group_size, in_features, x_dtype):
    if grad_y2d.shape[0] == 0 or x_dtype == torch.float64:
        return _ref.grad_input(grad_y2d, packed, scales, zeros, bits, group_size, in_features,
                               x_dtype)
    w = dequantize(packed, scales, zeros, bits, group_size, in_features, x_dtype)
    return grad_y2d.to(x_dtype) @ w


def grad_scales_zeros(x2d, grad_y2d, packed, scales, zeros, bits, group_size, in_features,
                      need_scales=True, need_zeros=False):
    """The extension has no reduction kernel: torch's (the entry point uses Triton's when it runs)."""
    return _ref.grad_scales_zeros(x2d, grad_y2d, packed, scales, zeros, bits, group_size,
                                  in_features, need_scales, need_zeros)


def find_nvcc():
    import shutil
    cand = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cand:
        if c and os.path.exists(c):
            return c
    return None


def compile_objects(out_dir, nvcc=None, check_binding: bool = True) -> dict:
    """Compile-only check without a GPU: nvcc the .cu into an object for sm_80 + sm_90 with torch's
    include paths (``--resource-usage`` makes ptxas name each target), and g++ ``-fsyntax-only`` the
    pybind binding. Returns {"object": path, "archs": [...], "log": str}; raises CalledProcessError."""
    import re
    import subprocess
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    obj = out_dir / "effqat_dequant.o"
    cmd = [nvcc, "-c", str(SOURCES[0]), "-o", str(obj), "--resource-usage", abi] + NVCC_FLAGS + inc
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    if check_binding:
        cxx = os.environ.get("CXX", "c++")
        bcmd = [cxx, "-fsyntax-only", "-std=c++20", abi, str(SOURCES[1]),
                f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=effqat_dequant_ext",
                "-DTORCH_API_INCLUDE_EXTENSION_H"] + inc
        procs.append(subprocess.Popen(bcmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for p in procs:
        out, _ = p.communicate()
        logs.append(out)
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, p.args, output=out)
    archs = sorted(set(re.findall(r"for '(sm_\d+)'", logs[0])))
    return {"object": str(obj), "archs": archs, "log": "\n".join(logs)}
