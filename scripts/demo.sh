#!/usr/bin/env bash
# Set up, then quantize the bundled stories260k model to w2g64 with EfficientQAT and compare fp32 with the
# checkpoint on effqat's kernels and loaded through GPTQModel, in one table at the end.
# No downloads: model and data are local / generated. VERBOSE=1 also shows GPTQModel's own logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/demo}
V=${VERBOSE:+--verbose}
rm -rf "$OUT"; mkdir -p "$OUT"
.venv/bin/python scripts/make_eval_data.py effqat_plugin/assets/stories260k "$OUT/eval.safetensors" --n-samples 32 --seed 1 $V
.venv/bin/effqat quantize effqat_plugin/assets/stories260k "$OUT/stories260k-w2g64" --bits 2 --group-size 64 --quiet $V
echo
.venv/bin/effqat eval effqat_plugin/assets/stories260k "$OUT/stories260k-w2g64" --data "$OUT/eval.safetensors" \
    --name fp32 --name "w2g64" --runtime effqat,gptqmodel --out "$OUT/eval" --table-only $V
