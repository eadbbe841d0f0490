#!/usr/bin/env bash
# Run the CPU test suite (sets the project up first when .venv is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
