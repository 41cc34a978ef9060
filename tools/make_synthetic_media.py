"""Write synthetic raw-media shards: moving shapes as real JPEG images and VP9/H.264 videos.

Example (images + videos of two aspect ratios, both video codecs, tiny encoders for the demo):
    python tools/make_synthetic_media.py --out data/synthetic_media --num-images 256 \
        --num-videos 64 --sizes 64x64 64x96 --frames 20 --codecs vp9 h264 \
        --tiny-encoders data/tiny_encoders
Then train with media.path=data/synthetic_media, media.encoders.vae=data/tiny_encoders/vae, ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    from lumos_mcore.data.media.synthetic import VIDEO_CODECS, write_synthetic_media
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.data.media.synthetic import VIDEO_CODECS, write_synthetic_media


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 64x96") from None
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be even and >= 2")
    return h, w


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory (becomes media.path)")
    p.add_argument("--num-images", type=int, default=0)
    p.add_argument("--num-videos", type=int, default=0)
    p.add_argument("--sizes", type=_size, nargs="+", default=[(64, 64)], help="HxW choices")
    p.add_argument("--frames", type=int, default=20, help="frames per video")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--codecs", nargs="+", default=["vp9", "h264"], choices=sorted(VIDEO_CODECS))
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--camera", action="store_true", help="add random camera poses [3, 4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--tiny-encoders",
        default=None,
        help="also write tiny random VAE / DINO / T5 directories here (demo and tests)",
    )
    args = p.parse_args(argv)
    if args.num_images + args.num_videos < 1:
        p.error("give --num-images and/or --num-videos")
    t0 = time.perf_counter()
    out = write_synthetic_media(
        args.out,
        num_images=args.num_images,
        num_videos=args.num_videos,
        sizes=args.sizes,
        frames=args.frames,
        fps=args.fps,
        codecs=args.codecs,
        num_classes=args.num_classes,
        seed=args.seed,
        camera=args.camera,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
    )
    report = {
        "out": str(out),
        "images": args.num_images,
        "videos": args.num_videos,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.tiny_encoders:
        from lumos_mcore.encoders.tiny import save_tiny_encoders

        report["encoders"] = {
            k: str(v) for k, v in save_tiny_encoders(args.tiny_encoders, seed=args.seed).items()
        }
    print(json.dumps(report))
    return out


if __name__ == "__main__":
    main()
