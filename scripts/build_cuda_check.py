#!/usr/bin/env python
"""Compile-only check of the CUDA dequant extension without a GPU: nvcc -> object for sm_80 and
sm_90 with torch's include paths, plus a C++ syntax check of the pybind binding.

Usage: python scripts/build_cuda_check.py [out_dir]
"""
import sys
import tempfile

from effqat_plugin.kernels import cuda_ext


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="effqat_cuda_")
    if cuda_ext.find_nvcc() is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    res = cuda_ext.compile_objects(out)
    print(f"built {res['object']} for {', '.join(res['archs'])}")
    return 0 if res["archs"] == ["sm_80", "sm_90"] else 1


if __name__ == "__main__":
    sys.exit(main())
