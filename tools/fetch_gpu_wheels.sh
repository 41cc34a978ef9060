#!/usr/bin/env bash
# Download, where PyPI is reachable, the wheels that a CUDA PyTorch machine without network
# needs to run tools/gpu_proof.sh, into wheels/ (which gpu_proof.sh installs offline).
#
# A CUDA PyTorch image usually brings torch, triton, numpy, transformers, safetensors, pillow,
# pyyaml, psutil, tensorboard and matplotlib; what the engine adds on top is megatron-core,
# diffusers and webdataset (with the two small dependencies those images lack). The wheels are
# fetched for the *target* interpreter (--python-version, default 3.12), without dependencies,
# so the set is exactly the one listed; gpu_proof.sh reports any module still missing.
#
# Usage: tools/fetch_gpu_wheels.sh [--python-version X.Y] [--dest DIR] [--max-mib N] [PKG==VER ...]
#   PKG==VER      extra packages (e.g. av==16.0.1 for the DALI video test's H.264 file)
#   --max-mib N   refuse a set larger than N MiB (default 60: what one copy to a lent machine
#                 may carry); TransformerEngine (a ~270 MiB core wheel plus a torch extension
#                 that is only published as source) and flash-attn (source only) do not fit and
#                 must come from the machine's own image or an NGC container.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER=3.12
DEST="$ROOT/wheels"
MAX_MIB=60
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    --max-mib) MAX_MIB="$2"; shift ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

# megatron-core: the newest release for the target Python (0.16.1 is the newest for 3.11);
# the engine uses only APIs present from 0.16 to 0.19.
if [ "$PYVER" = "3.11" ]; then MCORE=megatron-core==0.16.1; else MCORE=megatron-core==0.19.2; fi
PACKAGES=("$MCORE" diffusers==0.42.1 importlib-metadata==10.2.0 webdataset==1.0.2
          braceexpand==0.1.7 ${EXTRA[@]+"${EXTRA[@]}"})

PLATFORMS=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$DEST"
echo "[wheels] Python $PYVER, into $DEST: ${PACKAGES[*]}"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"

# one version per package: two make the offline install fail as a whole
dupes="$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' \
         | sort | uniq -d)"
if [ -n "$dupes" ]; then
  echo "[wheels] ERROR: several versions of: $dupes -- remove the old ones from $DEST" >&2
  exit 1
fi
total_kib="$(du -sk "$DEST" | cut -f1)"
ls -1s --block-size=K "$DEST"/*.whl | sed 's/^/[wheels]   /'
echo "[wheels] $((total_kib / 1024)) MiB in $DEST"
if [ "$((total_kib / 1024))" -gt "$MAX_MIB" ]; then
  echo "[wheels] ERROR: more than --max-mib $MAX_MIB MiB" >&2
  exit 1
fi
