#!/usr/bin/env bash
# The GPU proof in one command (works without network):
#   1. installs the wheels placed in wheels/ inside or beside the repository (or $LUMOS_WHEELS),
#      offline (--no-index), e.g. transformer-engine, flash-attn, triton, nvidia-dali;
#   2. reports which optional GPU packages import;
#   3. runs every GPU test (tests/gpu, and DALI's GPU route in tests/data/media/test_dali_gpu.py)
#      plus the kernel / ops tests on CUDA (tests/kernels, tests/ops) in one pytest process;
#   4. runs tools/benchmark_gpu.py, which writes docs/benchmarks/gpu_<date>.md (with the test
#      summary and the GPU name);
#   5. prints, last, every part that was skipped and why (missing package, too few GPUs).
#
# Usage: tools/gpu_proof.sh [--quick] [--tests-only | --bench-only | --check-only] [-- <benchmark args>]
#   --quick       benchmark 4 layers per configuration, 3 timed steps (a smoke run, ~2 min)
#   --check-only  steps 1, 2 and 5: install the wheels and say what would run or be skipped
#   -- --budget-s N   start no benchmark row after N s (the rows the targets need run first)
# Environment: LUMOS_WHEELS (extra wheel folder), PYTHON (interpreter; default .venv/bin/python
# if present, else python3), LUMOS_PROOF_DIR (logs; default runs/gpu_proof_<date>).
# Exit status: 0 when the tests passed and the benchmark ran; skips do not fail the proof;
# 3 when the engine's own requirements (torch, megatron-core, diffusers, ...) do not import.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0
RUN_TESTS=1
RUN_BENCH=1
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --tests-only) RUN_BENCH=0 ;;
    --bench-only) RUN_TESTS=0 ;;
    --check-only) RUN_TESTS=0; RUN_BENCH=0 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) echo "usage: $0 [--quick] [--tests-only | --bench-only | --check-only] [-- <benchmark args>]" >&2; exit 2 ;;
  esac
  shift
done

DATE="$(date +%F)"
LOG_DIR="${LUMOS_PROOF_DIR:-$ROOT/runs/gpu_proof_$DATE}"
mkdir -p "$LOG_DIR"
SKIPS="$LOG_DIR/skipped.txt"
: > "$SKIPS"

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
echo "[proof] python: $PY"
echo "[proof] logs:   $LOG_DIR"

# -- 1. offline wheels ------------------------------------------------------------------------
# First as one resolved install into the interpreter (a cluster venv); if pip cannot resolve the
# set offline (a dependency the image lacks, a read-only venv), every wheel goes in without its
# dependencies under $LUMOS_PROOF_SITE, put first on PYTHONPATH; step 2 then names any module
# still missing. tools/fetch_gpu_wheels.sh fetches the set a CUDA PyTorch image lacks.
for dir in "$ROOT/wheels" "$ROOT/../wheels" "${LUMOS_WHEELS:-}"; do
  [ -n "$dir" ] && [ -d "$dir" ] || continue
  shopt -s nullglob
  wheels=("$dir"/*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || continue
  echo "[proof] installing ${#wheels[@]} wheel(s) from $dir (offline)"
  log="$LOG_DIR/pip_$(basename "$dir").log"
  if ! "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$dir" "${wheels[@]}" >"$log" 2>&1; then
    SITE="${LUMOS_PROOF_SITE:-/tmp/lumos_proof_site}"
    echo "[proof] pip could not install the wheels of $dir as one set (see $log);"
    echo "[proof] installing each without its dependencies into $SITE"
    for whl in "${wheels[@]}"; do
      if "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --no-compile \
          --upgrade --target "$SITE" "$whl" >>"$log" 2>&1; then
        echo "[proof]   installed  $(basename "$whl")"
      else
        echo "[proof]   FAILED     $(basename "$whl") (see $log)"
      fi
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
done

# -- 2. what is there ---------------------------------------------------------------------------
"$PY" - "$SKIPS" <<'EOF'
import importlib, sys
skips = open(sys.argv[1], "a")
# the engine itself: without these nothing below can run
needed = ["torch", "megatron.core", "diffusers", "transformers", "webdataset", "safetensors", "yaml"]
missing = []
for module in needed:
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing.append(f"{module} ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})")
if missing:
    print("[proof] ERROR: the engine's requirements are missing: " + "; ".join(missing))
    print("[proof]   fetch them where PyPI is reachable: tools/fetch_gpu_wheels.sh "
          "--python-version " + ".".join(map(str, sys.version_info[:2])) + ", then copy wheels/ here")
    sys.exit(3)
import megatron.core
print(f"[proof] megatron-core {megatron.core.__version__}, Python {sys.version.split()[0]}")
import torch
print(f"[proof] torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
if not torch.cuda.is_available():
    print("[proof] no CUDA device: every GPU part will be skipped")
    skips.write("everything on GPU: no CUDA device\n")
checks = [  # (modules, any of which will do; pip package; what needs it)
    (["triton"], "triton", "Triton kernels on CUDA, fused-op benchmark rows"),
    (["transformer_engine.pytorch"], "transformer-engine[pytorch]", "TE spec, FP8, TE context parallelism"),
    (["megatron.core.extensions.transformer_engine"], "transformer-engine (megatron TE extension)", "TE spec"),
    (["flash_attn"], "flash-attn", "flash-attn tests and benchmark rows"),
    (["flash_attn_3.flash_attn_interface", "flash_attn_interface"], "flash-attn 3 (hopper build)", "FA3 backend (FA2 used instead)"),
    (["nvidia.dali"], "nvidia-dali-cuda120/130", "DALI GPU decode tests"),
    (["av"], "av (PyAV)", "H.264 test video for the DALI video test"),
]
for modules, package, what in checks:
    errors = []
    for module in modules:
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken build
            errors.append(f"{module}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        if getattr(mod, "HAVE_TE", True) is False:  # megatron's extension imports without TE
            errors.append(f"{module}: imported, but it could not import transformer_engine (HAVE_TE=False)")
            continue
        version = getattr(mod, "__version__", "")
        print(f"[proof]   ok       {module} {version}")
        break
    else:
        print(f"[proof]   MISSING  {'; '.join(errors)}")
        skips.write(f"{what}: missing package {package}\n")
if torch.cuda.device_count() < 2:
    skips.write(f"2-GPU tests (TE context parallelism, DP=2 DDP / distributed optimizer): "
                f"{torch.cuda.device_count()} GPU(s) here\n")
EOF
[ $? = 3 ] && exit 3
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/[proof] nvidia-smi: /'

# -- 3. tests -----------------------------------------------------------------------------------
TEST_RC=0
SUMMARY="$LOG_DIR/test_summary.txt"
if [ "$RUN_TESTS" = 1 ]; then
  TESTS=(tests/gpu tests/data/media/test_dali_gpu.py tests/kernels tests/ops)
  echo "[proof] pytest ${TESTS[*]}"
  # NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1: TE logs the attention backend it picks per call (flash /
  # cuDNN fused / unfused); live INFO logs also carry the project's backend and kernel choices.
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1 "$PY" -m pytest -v -rs -p no:cacheprovider \
      -o log_cli=true --log-cli-level=INFO --junitxml="$LOG_DIR/gpu_tests.xml" \
      "${TESTS[@]}" 2>&1 | tee "$LOG_DIR/gpu_tests.log"
  TEST_RC=${PIPESTATUS[0]}
  grep -E "^(SKIPPED|FAILED|ERROR)" "$LOG_DIR/gpu_tests.log" > "$SUMMARY" || true
  # which attention backends / kernels actually ran (deduplicated, without log prefixes)
  grep -oE "(Running with [A-Za-z]+ backend[^\"]*|attention backend: .*|kernel [a-z0-9_]+: .*)" \
      "$LOG_DIR/gpu_tests.log" | sort | uniq -c | sed 's/^ */backend used (count): /' >> "$SUMMARY" || true
  # the memory models checked on this GPU (estimate vs torch.cuda.max_memory_allocated)
  grep -oE "encoder memory: .*" "$LOG_DIR/gpu_tests.log" | sort -u >> "$SUMMARY" || true
  tail -n 1 "$LOG_DIR/gpu_tests.log" >> "$SUMMARY"
  grep -E "^SKIPPED" "$LOG_DIR/gpu_tests.log" | sed 's/^SKIPPED \[[0-9]*\] /test skipped: /' >> "$SKIPS" || true
fi

# -- 4. benchmark -------------------------------------------------------------------------------
BENCH_RC=0
REPORT="$ROOT/docs/benchmarks/gpu_$DATE.md"
if [ "$RUN_BENCH" = 1 ]; then
  args=(--out "$REPORT" --json "$LOG_DIR/benchmark.json")
  [ -f "$SUMMARY" ] && args+=(--tests-summary "$SUMMARY")
  [ "$QUICK" = 1 ] && args+=(--quick)
  echo "[proof] benchmark: tools/benchmark_gpu.py ${args[*]} ${BENCH_ARGS[*]:-}"
  # ${arr[@]+...}: an empty array is "unbound" under set -u in bash < 4.4
  "$PY" tools/benchmark_gpu.py "${args[@]}" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$LOG_DIR/benchmark.log"
  BENCH_RC=${PIPESTATUS[0]}
  # with LUMOS_PROOF_DIR set elsewhere, the report travels with the logs
  [ -f "$REPORT" ] && [ "$(dirname "$REPORT")" != "$LOG_DIR" ] && cp "$REPORT" "$LOG_DIR/"
  grep -E "^\[benchmark\] SKIPPED: " "$LOG_DIR/benchmark.log" | sed 's/^\[benchmark\] SKIPPED: /benchmark: /' >> "$SKIPS" || true
fi

# -- 5. summary ---------------------------------------------------------------------------------
echo
echo "================================ GPU proof summary ================================"
[ "$RUN_TESTS" = 1 ] && echo "tests:     $(tail -n 1 "$SUMMARY") (exit $TEST_RC; log $LOG_DIR/gpu_tests.log)"
[ "$RUN_BENCH" = 1 ] && echo "benchmark: exit $BENCH_RC; report $REPORT"
if [ -s "$SKIPS" ]; then
  echo "SKIPPED (missing package / hardware):"
  sort -u "$SKIPS" | sed 's/^/  - /'
else
  echo "SKIPPED: nothing"
fi
echo "===================================================================================="
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
