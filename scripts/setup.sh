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
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import effqat_plugin, effqat_plugin.converters, effqat_plugin.kernels; print('effqat', effqat_plugin.__version__, 'installed')"
