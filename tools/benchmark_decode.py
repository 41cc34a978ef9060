"""Decode throughput of DALI vs PyAV on the same media shards, side by side, plus data stall.

For each decoder the same samples (same buckets, crops and frames) are decoded, resized and
normalised in micro-batches; frames/s counts output frames (an image is one frame). Only
samples both decoders can take are timed (``--codec`` filters further: e.g. vp9, the codec
DALI's CPU decoder and PyAV share). Passes alternate between the decoders and the median and
best pass are reported, so a busy machine disturbs both alike.

The data-stall part runs a short training-like loop per decoder: prefetch threads decode while
the consumer runs ``--step-ms`` of matrix multiplies per step in place of the training step
(``--encode`` adds online encoding with tiny frozen encoders); stall fraction = time blocked
waiting for the next micro-batch / wall time. Results go to stdout and ``--json``.

Without ``--data`` a synthetic VP9 set is generated first:
    python tools/benchmark_decode.py --synthetic-videos 48 --size 128x128 --frames 20 \
        --bucket 128 128 --num-frames 8 --stride 2 --json runs/benchmark_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:
    from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.data.media.dali_decode import dali_available
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.media.decode import MediaDecoder
from lumos_mcore.data.media.stall import StallTimer
from lumos_mcore.data.media.synthetic import write_synthetic_media


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _config(args: argparse.Namespace, decoder: str, **kw: Any) -> MediaDataConfig:
    return MediaDataConfig(
        path=args.data,
        modality=args.modality,
        buckets=[list(args.bucket)],
        num_frames=[args.num_frames],
        frame_stride=args.stride,
        decoder=decoder,
        dali_threads=args.dali_threads,
        max_bad_fraction=1.0,
        **kw,
    )


class _Bench:
    """One decoder over the selected samples; ``run_pass`` times one pass in micro-batches."""

    def __init__(self, args: argparse.Namespace, decoder: str, indices: list[int]) -> None:
        self.name = decoder
        self.dec = MediaDecoder(
            backend=decoder, dali_device=args.dali_device, dali_threads=args.dali_threads
        )
        ds = MediaDataset(_config(args, decoder, num_workers=0), decoder=self.dec)
        self.reqs = [ds.plan(i)["request"] for i in indices]
        self.batch = args.batch
        for out in self.dec.decode(self.reqs[: self.batch]):  # warm-up: pipelines, codecs
            if not isinstance(out, torch.Tensor):
                raise RuntimeError(f"{decoder}: warm-up sample failed: {out}")
        self.dec.routes.clear()
        self.seconds: list[float] = []

    def run_pass(self) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(self.reqs), self.batch):
            outs = self.dec.decode(self.reqs[i : i + self.batch])
            bad = [o for o in outs if not isinstance(o, torch.Tensor)]
            if bad:
                raise RuntimeError(f"{self.name}: {bad[0]}")
        self.seconds.append(time.perf_counter() - t0)

    def result(self) -> dict[str, Any]:
        frames = sum(r.count for r in self.reqs)
        per_pass = sorted(self.seconds)
        median = per_pass[len(per_pass) // 2]
        return {
            "decoder": self.name,
            "samples_per_pass": len(self.reqs),
            "frames_per_pass": frames,
            "passes": len(per_pass),
            "seconds_per_pass": [round(t, 3) for t in self.seconds],
            "frames_per_s": round(frames / median, 1),  # median pass
            "frames_per_s_best": round(frames / per_pass[0], 1),  # least disturbed pass
            "samples_per_s": round(len(self.reqs) / median, 2),
            "routes": {"/".join(k): v for k, v in self.dec.routes.items()},
        }


def throughput(args: argparse.Namespace, decoders: list[str], indices: list[int]) -> list[dict]:
    """Decode the same samples with each decoder; passes alternate between decoders so load
    from other processes affects both alike."""
    benches = [_Bench(args, d, indices) for d in decoders]
    for _ in range(args.repeats):
        for b in benches:
            b.run_pass()
    return [b.result() for b in benches]


def _busy(ms: float) -> None:
    """Stand-in for the model's forward/backward: ``ms`` of matrix multiplies."""
    a = torch.randn(256, 256)
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        a = torch.tanh(a @ a * 0.01)


def stall(
    args: argparse.Namespace, decoder: str, encoders: EncodersConfig | None
) -> dict[str, Any]:
    """Training-like loop: prefetching iterator -> (online encoding) -> fixed compute per step.

    Only the time blocked waiting for decoded micro-batches counts as stall; online encoding
    (``--encode``, tiny encoders) is compute on the training device and is reported apart.
    """
    from lumos_mcore.encoders.frozen import FrozenEncoders

    kw = {"encoders": encoders} if encoders is not None else {}
    cfg = _config(args, decoder, num_workers=args.workers, prefetch=2, seed=args.seed, **kw)
    ds = MediaDataset(cfg)
    enc = FrozenEncoders(encoders) if encoders is not None else None
    it = ds.iterator(
        global_batch_size=args.batch, micro_batch_size=args.batch, dp_rank=0, dp_size=1
    )
    timed = StallTimer(it)
    next(timed)  # warm-up
    timed.window()
    encode_s = 0.0
    for _ in range(args.stall_steps):
        raw = next(timed)
        if enc is not None:
            t0 = time.perf_counter()
            enc.encode(raw)
            encode_s += time.perf_counter() - t0
        _busy(args.step_ms)
    w = timed.window()
    it.close()
    return {
        "decoder": decoder,
        "steps": args.stall_steps,
        "step_compute_ms": args.step_ms,
        "encode_ms_per_step": round(encode_s / args.stall_steps * 1e3, 1),
        "stall_fraction": round(w["data/stall_fraction"], 3),
        "wait_s": round(w["data/wait_s"], 3),
        "workers": args.workers,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=None, help="media shards (default: generate synthetic)")
    p.add_argument("--modality", choices=("video", "image"), default="video")
    p.add_argument("--codec", default="vp9", help="only time samples of this codec ('' = all)")
    p.add_argument("--synthetic-videos", type=int, default=48)
    p.add_argument("--synthetic-images", type=int, default=0)
    p.add_argument("--size", type=_size, default=(128, 128), help="synthetic HxW")
    p.add_argument("--frames", type=int, default=20, help="synthetic frames per video")
    p.add_argument("--bucket", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per decoder")
    p.add_argument("--dali-threads", type=int, default=2)
    p.add_argument("--dali-device", choices=("auto", "cpu", "gpu"), default="cpu")
    p.add_argument("--stall-steps", type=int, default=0, help="0 skips the stall measurement")
    p.add_argument("--step-ms", type=float, default=50.0, help="compute per step in the loop")
    p.add_argument("--workers", type=int, default=1, help="prefetch threads in the loop")
    p.add_argument("--encode", action="store_true", help="encode online (tiny encoders) per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="lumos-bench-")
        args.data = os.path.join(tmp.name, "media")
        write_synthetic_media(
            args.data,
            num_images=args.synthetic_images,
            num_videos=args.synthetic_videos,
            sizes=[args.size],
            frames=args.frames,
            codecs=[args.codec or "vp9"],
            seed=args.seed,
            samples_per_shard=16,
        )
    decoders = ["dali", "pyav"] if dali_available() else ["pyav"]
    probe = MediaDataset(_config(args, "pyav", num_workers=0))
    indices = [
        i
        for i in range(len(probe))
        if not args.codec or probe.plan(i)["request"].codec == args.codec
    ]
    if not indices:
        p.error(f"no usable {args.modality} samples with codec {args.codec!r} in {args.data}")
    result: dict[str, Any] = {
        "data": args.data,
        "modality": args.modality,
        "codec": args.codec or "all",
        "samples": len(indices),
        "bucket": list(args.bucket),
        "num_frames": args.num_frames if args.modality == "video" else 1,
        "stride": args.stride,
        "batch": args.batch,
        "dali_threads": args.dali_threads,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "throughput": throughput(args, decoders, indices),
    }
    if len(decoders) == 2:
        dali, pyav = result["throughput"]
        result["dali_over_pyav"] = round(dali["frames_per_s"] / pyav["frames_per_s"], 2)
    if args.stall_steps and not args.encode:
        result["stall"] = [stall(args, d, None) for d in decoders]
    elif args.stall_steps:
        with tempfile.TemporaryDirectory(prefix="lumos-enc-") as enc_dir:
            from lumos_mcore.encoders.tiny import save_tiny_encoders

            paths = save_tiny_encoders(enc_dir)
            encoders = EncodersConfig(
                vae=str(paths["vae"]), dino=str(paths["dino"]), dino_image_size=32
            )
            result["stall"] = [stall(args, d, encoders) for d in decoders]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
