#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install the CPU requirements.
# Sourced by examples/demo.sh and tools/test.sh; safe to run repeatedly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LUMOS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.lumos-req-stamp"
REQ_HASH="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/requirements-lock.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQ_HASH" ]; then
  echo "[setup] installing requirements (CPU build; GPU extras: requirements-gpu.txt)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$ROOT/requirements-dev.txt" -c "$ROOT/requirements-lock.txt"
  python -m pip install -q --no-deps -e "$ROOT"
  echo "$REQ_HASH" > "$STAMP"
fi
