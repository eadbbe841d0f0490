#!/usr/bin/env bash
# Run the CPU test suite (sets the project up first when .venv is missing), with fresh, empty caches
# for this run only (scripts/hermetic_caches.sh). Extra arguments go to pytest.
#   EFFQAT_TEST_ORDER=random bash scripts/test.sh    shuffled order (pytest-randomly; prints its seed)
#   EFFQAT_TEST_ORDER=1234 bash scripts/test.sh      the shuffled order of seed 1234 again
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# shellcheck source=scripts/hermetic_caches.sh
source scripts/hermetic_caches.sh
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}
ORDER=${EFFQAT_TEST_ORDER:-default}
if [ "$ORDER" = default ]; then
  ORDER_ARGS=(-p no:randomly)
else
  .venv/bin/python -c "import pytest_randomly" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[test-order]"
  SEED=$([ "$ORDER" = random ] && echo $((RANDOM * 32768 + RANDOM)) || echo "$ORDER")
  echo "test order: shuffled, seed $SEED (EFFQAT_TEST_ORDER=$SEED bash scripts/test.sh repeats it)"
  ORDER_ARGS=(-p randomly "--randomly-seed=$SEED")
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${ORDER_ARGS[@]}" tests "$@"
