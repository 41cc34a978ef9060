#!/usr/bin/env bash
# The GPU proof in one command (works without network):
#   1. installs the wheels placed in wheels/ inside or beside the repository (or $LUMOS_WHEELS),
#      offline (--no-index), e.g. transformer-engine, flash-attn, triton, nvidia-dali;
#   2. reports which optional GPU packages import;
#   3. runs every GPU test (tests/gpu, and DALI's GPU route in tests/data/media/test_dali_gpu.py)
#      plus the kernel / ops tests on CUDA (tests/kernels, tests/ops) in one pytest process;
#   4. runs tools/benchmark_gpu.py, which writes docs/benchmarks/gpu_<date>.md (with the test
#      summary and the GPU name), rewritten after every row;
#   5. prints, last, every part that was skipped and why (missing package, too few GPUs).
#
# Usage: tools/gpu_proof.sh [--quick] [--tests-only | --bench-only | --check-only]
#                           [--deadline-s N] [-- <benchmark args>]
#   --quick         benchmark 4 layers per configuration, 3 timed steps (a smoke run)
#   --check-only    steps 1, 2 and 5: install the wheels, say what would run or be skipped, and
#                   how --deadline-s would split the time
#   --deadline-s N  finish within N s of the start (default 540; 0 = no limit): pytest runs
#                   under `timeout` with $LUMOS_PROOF_TEST_SHARE % (default 40) of the seconds
#                   left after steps 1-2 (all of them with --tests-only), then the benchmark
#                   gets what is left less 20 s as --budget-s (unless given after --)
#   -- --budget-s N start no benchmark row that would end after N s (target rows run first)
#   -h, --help      this text
# Environment: LUMOS_WHEELS (extra wheel folder), PYTHON (interpreter; default .venv/bin/python
# if present, else python3), LUMOS_PROOF_DIR (logs; default runs/gpu_proof_<date>),
# LUMOS_PROOF_REPORT (the report; default docs/benchmarks/gpu_<date>.md),
# LUMOS_PROOF_TEST_SHARE (percent of the deadline's seconds for pytest).
# Exit status: 0 when the tests passed and the benchmark ran; skips do not fail the proof;
# 2 for a usage error; 3 when the engine's own requirements (torch, megatron-core, diffusers,
# ...) do not import.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() {  # the header above, without the shebang and the comment marks
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

QUICK=0
RUN_TESTS=1
RUN_BENCH=1
CHECK_ONLY=0
DEADLINE=540
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --tests-only) RUN_BENCH=0 ;;
    --bench-only) RUN_TESTS=0 ;;
    --check-only) RUN_TESTS=0; RUN_BENCH=0; CHECK_ONLY=1 ;;
    --deadline-s|--deadline-s=*)
      if [ "$1" = --deadline-s ]; then
        [ $# -ge 2 ] || { echo "$0: --deadline-s needs a number of seconds" >&2; exit 2; }
        shift; DEADLINE="$1"
      else
        DEADLINE="${1#--deadline-s=}"
      fi
      case "$DEADLINE" in
        ''|*[!0-9]*) echo "$0: --deadline-s $DEADLINE: give whole seconds (0 = no limit)" >&2; exit 2 ;;
      esac
      DEADLINE=$((10#$DEADLINE)) ;;
    -h|--help) usage; exit 0 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) echo "$0: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
TEST_SHARE="${LUMOS_PROOF_TEST_SHARE:-40}"
case "$TEST_SHARE" in
  ''|*[!0-9]*) echo "$0: LUMOS_PROOF_TEST_SHARE=$TEST_SHARE: give a percentage" >&2; exit 2 ;;
esac
MARGIN_S=20  # after the benchmark's budget: its last report write, teardown, the summary
HAVE_TIMEOUT=0
command -v timeout >/dev/null && HAVE_TIMEOUT=1

DATE="$(date +%F)"
LOG_DIR="${LUMOS_PROOF_DIR:-$ROOT/runs/gpu_proof_$DATE}"
mkdir -p "$LOG_DIR"
SKIPS="$LOG_DIR/skipped.txt"
: > "$SKIPS"
# only a report newer than this is this run's (a failed benchmark leaves an earlier one alone)
START_MARK="$LOG_DIR/.proof_start"
touch "$START_MARK"

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
n=0
for dir in "$ROOT/wheels" "$ROOT/../wheels" "${LUMOS_WHEELS:-}"; do
  n=$((n + 1))  # numbered logs: wheels/ and ../wheels share a basename
  [ -n "$dir" ] && [ -d "$dir" ] || continue
  shopt -s nullglob
  wheels=("$dir"/*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || continue
  echo "[proof] installing ${#wheels[@]} wheel(s) from $dir (offline)"
  log="$LOG_DIR/pip_${n}_$(basename "$dir").log"
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

# -- time plan ------------------------------------------------------------------------------
# pytest gets a share of the seconds left, the benchmark what pytest leaves (less MARGIN_S).
TEST_LIMIT=0
if [ "$DEADLINE" -gt 0 ]; then
  left=$((DEADLINE - SECONDS))
  if [ "$RUN_BENCH" = 1 ] || [ "$CHECK_ONLY" = 1 ]; then
    TEST_LIMIT=$((left * TEST_SHARE / 100))
  else
    TEST_LIMIT=$((left - MARGIN_S))
  fi
  bench_min=$((left - MARGIN_S))
  [ "$RUN_TESTS" = 1 ] || [ "$CHECK_ONLY" = 1 ] && bench_min=$((left - TEST_LIMIT - MARGIN_S))
  echo "[proof] deadline ${DEADLINE} s, ${left} s left: pytest <= ${TEST_LIMIT} s," \
       "benchmark --budget-s >= ${bench_min} s (what pytest leaves, less ${MARGIN_S} s)"
  [ "$HAVE_TIMEOUT" = 1 ] || echo "[proof] WARNING: no timeout command: pytest is not cut at its share"
fi

# -- 3. tests -----------------------------------------------------------------------------------
TEST_RC=0
SUMMARY="$LOG_DIR/test_summary.txt"
if [ "$RUN_TESTS" = 1 ]; then
  TESTS=(tests/gpu tests/data/media/test_dali_gpu.py tests/kernels tests/ops)
  echo "[proof] pytest ${TESTS[*]}"
  LIMIT=()
  if [ "$DEADLINE" -gt 0 ] && [ "$HAVE_TIMEOUT" = 1 ]; then
    [ "$TEST_LIMIT" -gt 0 ] || TEST_LIMIT=1
    # SIGINT first: pytest stops, prints its summary and writes the junit XML; KILL 15 s later
    LIMIT=(timeout -s INT -k 15 "$TEST_LIMIT")
  fi
  # NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1: TE logs the attention backend it picks per call (flash /
  # cuDNN fused / unfused); live INFO logs also carry the project's backend and kernel choices.
  # -rfEs: FAILED, ERROR and SKIPPED lines in the short summary.
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1 ${LIMIT[@]+"${LIMIT[@]}"} "$PY" -m pytest -v -rfEs \
      -p no:cacheprovider -o log_cli=true --log-cli-level=INFO \
      --junitxml="$LOG_DIR/gpu_tests.xml" "${TESTS[@]}" 2>&1 | tee "$LOG_DIR/gpu_tests.log"
  TEST_RC=${PIPESTATUS[0]}
  grep -E "^(SKIPPED|FAILED|ERROR)" "$LOG_DIR/gpu_tests.log" > "$SUMMARY" || true
  if [ "$TEST_RC" = 124 ] || [ "$TEST_RC" = 137 ]; then
    echo "pytest stopped at its share of --deadline-s ${DEADLINE}: ${TEST_LIMIT} s (exit $TEST_RC)" >> "$SUMMARY"
  fi
  # which attention backends / kernels actually ran (deduplicated, without log prefixes)
  grep -oE "(Running with [A-Za-z]+ backend[^\"]*|attention backend( for head dim [0-9]+)?: .*|fails a forward \+ backward at head dim [0-9]+.*|kernel [a-z0-9_]+: .*)" \
      "$LOG_DIR/gpu_tests.log" | sort | uniq -c | sed 's/^ */backend used (count): /' >> "$SUMMARY" || true
  # the memory models checked on this GPU (estimate vs torch.cuda.max_memory_allocated)
  grep -oE "encoder memory: .*" "$LOG_DIR/gpu_tests.log" | sort -u >> "$SUMMARY" || true
  tail -n 1 "$LOG_DIR/gpu_tests.log" >> "$SUMMARY"
  grep -E "^SKIPPED" "$LOG_DIR/gpu_tests.log" | sed 's/^SKIPPED \[[0-9]*\] /test skipped: /' >> "$SKIPS" || true
fi

# -- 4. benchmark -------------------------------------------------------------------------------
BENCH_RC=0
REPORT="${LUMOS_PROOF_REPORT:-$ROOT/docs/benchmarks/gpu_$DATE.md}"
FRESH=0
if [ "$RUN_BENCH" = 1 ]; then
  args=(--out "$REPORT" --json "$LOG_DIR/benchmark.json")
  [ -f "$SUMMARY" ] && args+=(--tests-summary "$SUMMARY")
  [ "$QUICK" = 1 ] && args+=(--quick)
  LIMIT=()
  if [ "$DEADLINE" -gt 0 ]; then
    left=$((DEADLINE - SECONDS))
    user_budget=0
    for a in ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}; do
      case "$a" in --budget-s|--budget-s=*) user_budget=1 ;; esac
    done
    budget=$((left - MARGIN_S))
    [ "$budget" -gt 0 ] || budget=1
    [ "$user_budget" = 1 ] || args+=(--budget-s "$budget")
    # the backstop: SIGTERM makes the benchmark write its partial report and exit
    limit=$((left - 5))
    [ "$limit" -gt 0 ] || limit=1
    [ "$HAVE_TIMEOUT" = 1 ] && LIMIT=(timeout -s TERM -k 15 "$limit")
  fi
  echo "[proof] benchmark: tools/benchmark_gpu.py ${args[*]} ${BENCH_ARGS[*]:-}"
  # ${arr[@]+...}: an empty array is "unbound" under set -u in bash < 4.4
  ${LIMIT[@]+"${LIMIT[@]}"} "$PY" tools/benchmark_gpu.py "${args[@]}" \
      ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$LOG_DIR/benchmark.log"
  BENCH_RC=${PIPESTATUS[0]}
  [ -f "$REPORT" ] && [ "$REPORT" -nt "$START_MARK" ] && FRESH=1
  # with LUMOS_PROOF_DIR set elsewhere, the report travels with the logs
  [ "$FRESH" = 1 ] && [ "$(dirname "$REPORT")" != "$LOG_DIR" ] && cp "$REPORT" "$LOG_DIR/"
  grep -E "^\[benchmark\] SKIPPED: " "$LOG_DIR/benchmark.log" | sed 's/^\[benchmark\] SKIPPED: /benchmark: /' >> "$SKIPS" || true
fi

# -- 5. summary ---------------------------------------------------------------------------------
echo
echo "================================ GPU proof summary ================================"
[ "$RUN_TESTS" = 1 ] && echo "tests:     $(tail -n 1 "$SUMMARY") (exit $TEST_RC; log $LOG_DIR/gpu_tests.log)"
if [ "$RUN_BENCH" = 1 ]; then
  if [ "$FRESH" = 1 ]; then
    echo "benchmark: exit $BENCH_RC; report $REPORT"
  elif [ -f "$REPORT" ]; then
    echo "benchmark: exit $BENCH_RC; wrote no report ($REPORT is from an earlier run; log $LOG_DIR/benchmark.log)"
  else
    echo "benchmark: exit $BENCH_RC; wrote no report (log $LOG_DIR/benchmark.log)"
  fi
fi
if [ -s "$SKIPS" ]; then
  echo "SKIPPED (missing package / hardware / time budget):"
  sort -u "$SKIPS" | sed 's/^/  - /'
else
  echo "SKIPPED: nothing"
fi
if [ "$DEADLINE" -gt 0 ]; then
  echo "elapsed:   ${SECONDS} s (deadline ${DEADLINE} s)"
else
  echo "elapsed:   ${SECONDS} s"
fi
echo "===================================================================================="
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
