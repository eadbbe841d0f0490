#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity (CPU only, Release) from the
# llama.cpp that llama-cpp-python vendors, so the command-line tools match the library effqat loads
# (the same src/llama-quant.cpp that effqat_plugin/gguf_presets.py mirrors).
#
#   scripts/build_llama_tools.sh            # into .cache/llama-tools/ (or $EFFQAT_LLAMA_TOOLS)
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 JOBS=2 scripts/build_llama_tools.sh
#
# Idempotent: when bin/ holds the three tools and bin/.stamp names this version, nothing is done.
# The sdist comes from the package registry (pip download) when it is not in $DEST/sdist already.
# No network is needed at build time (LLAMA_OPENSSL=OFF; LLAMA_CURL is deprecated at this version).
#
# CPU flags: AVX2/FMA/F16C (x86-64-v3), not -march=native: on this project's AMX-capable Xeons a native
# build routes Q4_0/Q8_0/K-quant matmuls through ggml's AMX kernels, and llama-perplexity dies with
# SIGSEGV in ggml_backend_amx_mul_mat (F16 files, or --no-repack, run). LLAMA_TOOLS_NATIVE=1 opts in.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${EFFQAT_LLAMA_TOOLS:-$REPO/.cache/llama-tools}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-$(command -v python3)}"
[ -x "$REPO/.venv/bin/python" ] && PY="${PYTHON:-$REPO/.venv/bin/python}"
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
if [ "${LLAMA_TOOLS_NATIVE:-0}" = 1 ]; then
    CPU_FLAGS=(-DGGML_NATIVE=ON); FLAVOR=native
else
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF); FLAVOR=avx2
fi
STAMP="llama-cpp-python==$VERSION cpu-$FLAVOR release"

ok=1
for t in "${TOOLS[@]}"; do [ -x "$DEST/bin/$t" ] || ok=0; done
if [ "$ok" = 1 ] && [ "$(cat "$DEST/bin/.stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "llama.cpp tools up to date in $DEST/bin ($STAMP)"
    exit 0
fi

mkdir -p "$DEST/sdist"
TARBALL="$DEST/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ]; then
    echo "downloading llama-cpp-python==$VERSION sdist"
    "$PY" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$DEST/sdist"
fi
SRC="$DEST/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tar xzf "$TARBALL" -C "$DEST/sdist"
fi

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
BUILD="$DEST/build-$VERSION-$FLAVOR"
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "${CPU_FLAGS[@]}" \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
cmake --build "$BUILD" --target "${TOOLS[@]}" -j "$JOBS"

mkdir -p "$DEST/bin"
for t in "${TOOLS[@]}"; do
    # copy then rename: a tool that is running keeps its old file (cp over it fails: text file busy)
    cp "$BUILD/bin/$t" "$DEST/bin/.$t.new"
    mv -f "$DEST/bin/.$t.new" "$DEST/bin/$t"
done
echo "$STAMP" > "$DEST/bin/.stamp"
echo "built ${TOOLS[*]} into $DEST/bin ($STAMP)"
