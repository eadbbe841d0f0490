#!/usr/bin/env bash
# Bring effqat onto a GPU machine that cannot reach the package registries (the lent H100/H200 here).
#
#   bash scripts/gpu_setup.sh download   # on a machine with registry access: wheels into .gpu_wheels/
#   bash scripts/gpu_setup.sh install    # on the GPU machine (carry .gpu_wheels/): pip install --no-deps
#
# Why --no-deps: the GPU image already has torch (2.11, cu130), triton, accelerate, safetensors, numpy,
# pyarrow...; letting pip resolve would try to fetch torch>=2.14.1 (gptqmodel's and our pin) and fail
# offline. We bring only what the image lacks (gptqmodel and its small pure-Python dependencies, the
# transformers / huggingface_hub versions effqat is tested with), at the versions CI uses, and install
# effqat itself in editable mode from the carried tree. What breaks on the older torch is what the
# GPU issue wants reported, so the install does not hide it: `install` ends by importing everything.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
GPU_PY=${GPU_PY:-3.12}   # the GPU image's python3 (3.12.3 when last seen)
PURE=(gptqmodel==7.7.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14)
BINARY=(dill==0.4.1 datasets==5.2.0 multiprocess==0.70.19 transformers==5.24.0 huggingface_hub==2.4.0
        torchao==0.18.0 compressed-tensors==0.20.0 loguru==0.7.3)   # the last two: the compressed-tensors
        # format (imported on first use; it also needs pydantic 2, not checked on the GPU image)
COMPILED_SDIST=pypcre==0.6.4   # C extension, sdist only: built here for the GPU image's Python

case "${1:-}" in
  download)
    mkdir -p "$WHEELS"
    PIP=(.venv/bin/python -m pip)
    [ -x .venv/bin/python ] || PIP=(python3 -m pip)
    for p in "${BINARY[@]}"; do
      "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$WHEELS" "$p"
    done
    for p in "${PURE[@]}"; do  # published as sdists; all pure Python, so one wheel serves any 3.x
      "${PIP[@]}" wheel -q --no-deps -w "$WHEELS" "$p"
    done
    PY312=$(command -v "python$GPU_PY" || true)
    if [ -z "$PY312" ]; then
      echo "gpu_setup: python$GPU_PY not found; cannot build $COMPILED_SDIST for the GPU image" >&2; exit 2
    fi
    "$PY312" -m pip wheel -q --no-deps -w "$WHEELS" "$COMPILED_SDIST"
    du -sh "$WHEELS"; ls "$WHEELS"
    ;;
  install)
    [ -d "$WHEELS" ] || { echo "gpu_setup: $WHEELS missing; run 'download' first and carry it" >&2; exit 2; }
    python3 -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
    export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4}
    python3 - <<'EOF'
import torch, transformers, gptqmodel, effqat_plugin
from effqat_plugin import EQATConfig  # registers the method with GPTQModel
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "gptqmodel", gptqmodel.__version__, "effqat", effqat_plugin.__version__)
EOF
    ;;
  *)
    echo "usage: bash scripts/gpu_setup.sh download|install" >&2; exit 2 ;;
esac
