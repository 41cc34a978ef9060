"""Write a synthetic precomputed-feature dataset (webdataset shards + index.json).

Example (I2I-like, DINO CLS condition):
    python tools/make_synthetic_shards.py --out /tmp/synth --num-samples 512 --latent-size 16 \
        --latent-channels 4 --cond-tokens 1 --cond-dim 768 --seed 0 --samples-per-shard 128
Then train with data.path=/tmp/synth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from lumos_mcore.data.synthetic import write_synthetic_feature_shards
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.data.synthetic import write_synthetic_feature_shards


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory (becomes data.path)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--latent-size", type=int, default=16, help="latent height = width")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument(
        "--frames", type=int, default=None, help="video latents [C, T, H, W] with T frames"
    )
    p.add_argument(
        "--cond-tokens", type=int, default=1, help="Lc: 1 = DINO CLS, 256 = DINO patches"
    )
    p.add_argument("--cond-dim", type=int, default=768, help="Dc: 768 = DINO ViT-B, 4096 = T5-XXL")
    p.add_argument(
        "--cond-padding",
        action="store_true",
        help="variable-length conditions + cond_mask (T5-like)",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="mixed latent sizes for packing, e.g. 1x8x8,1x8x12,4x8x8 (frames x H x W each); "
        "overrides --latent-size/--frames",
    )
    p.add_argument("--num-classes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--storage-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = write_synthetic_feature_shards(
        args.out,
        num_samples=args.num_samples,
        latent_channels=args.latent_channels,
        latent_size=args.latent_size,
        frames=args.frames,
        cond_tokens=args.cond_tokens,
        cond_dim=args.cond_dim,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        num_classes=args.num_classes,
        pad_cond=args.cond_padding,
        storage_dtype=args.storage_dtype,
        overwrite=args.overwrite,
        shapes=[tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else None,
    )
    print(f"wrote {args.num_samples} samples to {out} in {time.perf_counter() - t0:.2f}s")
    return out


if __name__ == "__main__":
    main()
