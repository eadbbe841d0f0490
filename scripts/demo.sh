#!/usr/bin/env bash
# Set up, then quantize the bundled stories260k model to w2g64 with EfficientQAT, load the result in
# GPTQModel and compare perplexities. No downloads: model and data are local / generated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/demo}
rm -rf "$OUT"; mkdir -p "$OUT"
.venv/bin/python scripts/make_eval_data.py effqat_plugin/assets/stories260k "$OUT/eval.safetensors" --n-samples 32 --seed 1
.venv/bin/effqat quantize effqat_plugin/assets/stories260k "$OUT/stories260k-w2g64" --bits 2 --group-size 64
.venv/bin/effqat eval effqat_plugin/assets/stories260k --data "$OUT/eval.safetensors"
.venv/bin/effqat eval "$OUT/stories260k-w2g64" --data "$OUT/eval.safetensors"
.venv/bin/effqat eval "$OUT/stories260k-w2g64" --data "$OUT/eval.safetensors" --runtime gptqmodel
