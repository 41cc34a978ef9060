#!/usr/bin/env bash
# Set up .venv and run the lint + test suite (CPU). On a CUDA machine, tests/gpu runs too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh
echo "[test] ruff"
ruff format --check lumos_mcore kernels tools tests examples
ruff check lumos_mcore kernels tools tests examples
echo "[test] pytest"
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
