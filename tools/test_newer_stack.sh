#!/usr/bin/env bash
# Run the CPU suite on the newer stack that GPU clusters run: Python 3.12, the torch of current
# CUDA PyTorch images (2.11) and the newest megatron-core (0.19.2), beside the default
# Python 3.11 / torch 2.13 / megatron-core 0.16.1 stack of tools/test.sh. The engine uses only
# APIs present in both megatron-core releases; this is the command that checks it.
#
# Not part of .ci/run: it downloads a CUDA build of torch (several GB, runs on the CPU here).
# Usage: tools/test_newer_stack.sh [pytest args]     (default: the whole suite)
# Environment: PYTHON312 (a Python 3.12 interpreter; default python3.12), LUMOS_VENV312
# (the venv; default .venv312).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LUMOS_VENV312:-$ROOT/.venv312}"
PY="${PYTHON312:-python3.12}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[newer] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lumos-req-stamp"
REQ_HASH="$(cat requirements.txt "$0" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQ_HASH" ]; then
  echo "[newer] installing torch 2.11 + megatron-core 0.19.2 + the rest of requirements.txt"
  REQ="$(mktemp)"
  grep -v -E "^(torch|megatron-core|triton)==" requirements.txt > "$REQ"
  printf "torch==2.11.0\nmegatron-core==0.19.2\npytest>=8.0\n" >> "$REQ"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  rm -f "$REQ"
  echo "$REQ_HASH" > "$STAMP"
fi
"$VENV/bin/python" - <<'EOF'
import sys, torch, megatron.core, triton
print(f"[newer] Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {megatron.core.__version__}, triton {triton.__version__}")
EOF
# Triton's interpreter before 3.9 cannot run the kernels' chunked backward loops (a loop bound
# from tl.minimum is a 1-element array there); compiled on CUDA they run with any Triton >= 3.0.
TRITON_OLD="$("$VENV/bin/python" -c 'import triton; print(tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9))')"
DESELECT=()
if [ "$TRITON_OLD" = "True" ]; then
  echo "[newer] Triton < 3.9: the Triton interpreter tests are left to tools/test.sh"
  DESELECT=(--deselect tests/kernels/test_norm_modulate.py::test_forward_backward_match_float64
            --deselect tests/kernels/test_gated_residual.py::test_forward_backward_match_float64
            --deselect tests/kernels/test_gated_residual.py::test_residual_grad_is_passed_through
            --deselect tests/ops/test_dispatch.py::test_autoselect_single_process_picks_the_faster)
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider ${DESELECT[@]+"${DESELECT[@]}"} "${@:-tests}"
