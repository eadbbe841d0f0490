#!/usr/bin/env bash
# GPU checks for effqat kernels: run on a CUDA machine from the repository root.
#   1. builds the CUDA extension (JIT, sm_80/sm_90) and runs the kernel tests on the device
#      (triton + cuda backends vs the reference, poisoned outputs, memory check);
#   2. runs the Triton interpreter tests too (they must still pass);
#   3. benchmarks (scripts/bench_kernels.py) incl. the E2E-QP step comparison.
# Usage: scripts/gpu_checks.sh [extra bench args...]   (env OUT=dir for logs/JSON; default ./gpu_checks_out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_checks_out}"
mkdir -p "$OUT"
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_checks.sh: no CUDA device visible")
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "cuda", torch.version.cuda)
from effqat_plugin.kernels import cuda_ext, active_backend
cuda_ext.build(verbose=True)
print("auto backend on cuda:", active_backend("cuda"))
PY
python -m pytest -q tests/test_kernels_cuda.py tests/test_kernels_reference.py tests/test_kernels_triton.py \
    2>&1 | tee "$OUT/pytest_kernels.log"
python scripts/bench_kernels.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
python scripts/bench_kernels.py --e2e --batches 1 --no-gptq --shapes 4096x4096,11008x4096 \
    --json "$OUT/bench_e2e.json" 2>&1 | tee "$OUT/bench_e2e.log"
