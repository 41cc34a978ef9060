#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, write the synthetic feature shards, and train a
# small Lumos-I2I model with a real parallel split (TP=2 on 2 CPU processes, or one process per
# GPU when CUDA is present). Extra arguments are passed on as config overrides (key=value).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh

DATA=data/synthetic_i2i
if [ ! -f "$DATA/index.json" ]; then
  python tools/make_synthetic_shards.py --out "$DATA" --num-samples 512 --latent-size 16 \
    --latent-channels 4 --cond-tokens 1 --cond-dim 768 --samples-per-shard 128 --seed 0
fi

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC="$(python -c 'import torch; print(torch.cuda.device_count())')"
  export CUDA_DEVICE_MAX_CONNECTIONS=1
else
  NPROC=2
  export OMP_NUM_THREADS=1  # one thread per rank: the machine has 2 cores
fi
torchrun --standalone --nproc-per-node "$NPROC" -m lumos_mcore.train \
  --config examples/recipes/demo_tiny_i2i.yaml "data.path=$DATA" "$@"
echo "[demo] checkpoints: runs/demo_tiny_i2i/checkpoints   TensorBoard: tensorboard --logdir runs/demo_tiny_i2i/tensorboard"
