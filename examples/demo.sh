#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, write synthetic raw media (JPEG shards of moving
# shapes) and tiny frozen encoders, then train a small Lumos-I2I model from the raw images —
# DALI decodes them (CPU here, GPU on clusters), the frozen VAE + DINO encode them online — with
# a real parallel split (TP=2 on 2 CPU processes or 2 GPUs; TP=1 on a single GPU).
# Extra arguments are passed on as config overrides (key=value).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh

DATA=data/synthetic_media
if [ ! -f "$DATA/index.json" ] || [ ! -d data/tiny_encoders/vae ]; then
  python tools/make_synthetic_media.py --out "$DATA" --num-images 256 --num-videos 0 \
    --sizes 128x128 --seed 0 --tiny-encoders data/tiny_encoders --overwrite
fi

# The recipe is TP=2 with a global batch of 16: two ranks (two GPUs, or two CPU processes); one
# GPU runs it at TP=1.
LAYOUT=()
NPROC=2
GPUS="$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if ((GPUS > 0)); then
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  if ((GPUS == 1)); then
    NPROC=1
    LAYOUT=(parallel.tp=1)
  fi
else
  export OMP_NUM_THREADS=1  # one thread per rank: the machine has 2 cores
fi
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m lumos_mcore.train \
  --config examples/recipes/demo_tiny_media_i2i.yaml "media.path=$DATA" "${LAYOUT[@]}" "$@"
echo "[demo] checkpoints: runs/demo_tiny_media_i2i/checkpoints   TensorBoard: tensorboard --logdir runs/demo_tiny_media_i2i/tensorboard"
