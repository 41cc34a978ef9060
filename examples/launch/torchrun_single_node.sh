#!/usr/bin/env bash
# Train a recipe on one machine: torchrun with one process per GPU (2 CPU ranks without CUDA).
#
#   examples/launch/torchrun_single_node.sh examples/recipes/lumos_i2i_xl2_256.yaml \
#       data.path=/data/i2i_features train.micro_batch_size=32
#
# Overrides (key=value) go to lumos_mcore.train after the recipe. Re-running the same command
# resumes from the newest complete checkpoint in the recipe's checkpoint folder. SIGUSR1 or
# SIGTERM to torchrun (which forwards it) or to the ranks makes every rank write a checkpoint and
# exit. The console output is also written to <train.output_dir>/logs/torchrun_<date>.log.
#
# Environment: NPROC_PER_NODE (default: all GPUs, or 2 CPU ranks), PYTHON (default: python),
# MASTER_PORT (default: any free port).
set -euo pipefail

if (($# < 1)); then
  echo "usage: $0 RECIPE.yaml [key=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON=${PYTHON:-python}

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$((GPUS > 0 ? GPUS : 2))
fi
if ((GPUS > 0)); then
  # megatron orders TP/SP communication and compute kernels on one CUDA stream queue.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
else
  CORES=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1))}
fi
export PYTHONUNBUFFERED=1
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

# Run folders from the recipe + overrides; fails fast on a bad config.
RESOLVED=$("$PYTHON" tools/launch.py resolve "$RECIPE" "$@")
eval "$RESOLVED"
LOG_DIR="$OUTPUT_DIR/logs"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/torchrun_$(date +%Y%m%d_%H%M%S).log"
echo "[lumos] ${NPROC_PER_NODE} ranks on $(hostname), checkpoints in ${CKPT_DIR}, log ${LOG}"

RDZV=(--standalone)
if [[ -n ${MASTER_PORT:-} ]]; then
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "localhost:${MASTER_PORT}" --rdzv-id "lumos-$$")
fi
set +e
# torchrun of the same interpreter (a bare `torchrun` may be another environment's, or absent);
# TORCHRUN=<executable> replaces it.
if [[ -n ${TORCHRUN:-} ]]; then LAUNCH=("$TORCHRUN"); else LAUNCH=("$PYTHON" -m torch.distributed.run); fi
"${LAUNCH[@]}" --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" "${RDZV[@]}" \
  -m lumos_mcore.train --config "$RECIPE" "$@" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
set -e
exit "$RC"
