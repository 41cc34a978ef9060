#!/usr/bin/env python
"""Time megatron -> HF conversion against a plain safetensors save of the same tensors.

    python tools/benchmark_conversion.py --model Lumos-XL/2 --workdir /tmp/bench_conv

1. random weights of ``--model`` are written as a megatron checkpoint (stacked layers, as the
   trainer writes them; not timed);
2. ``convert_checkpoint(mcore -> hf)`` runs in a fresh process: read the sharded checkpoint,
   de-interleave the per-head QKV / KV rows, write ``diffusion_pytorch_model.safetensors``.
   The checkpoint files are read once before the timer (as after training wrote them, they are
   in the page cache; the time of that read from disk is printed separately), and ``os.sync()``
   runs before each timer so that neither side flushes the other's writes;
3. another fresh process loads those HF tensors into memory (not timed) and times
   ``safetensors.torch.save_file`` of them to the same disk.

Both timed steps run ``--repeat`` times, alternating, and the median is reported together with
each process's peak resident memory (the converter streams: its peak stays near one stacked
weight plus the interpreter, not the model size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def make_checkpoint(model: str, path: Path, seed: int = 0) -> dict:
    """Random full weights of ``model`` saved as a weights-only megatron checkpoint."""
    import torch

    from lumos_mcore.config.loader import config_to_dict
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.dit.hf_adapter import mcore_shapes
    from lumos_mcore.parallel.state import init_distributed
    from lumos_mcore.training.checkpoint import save_weights_only

    init_distributed()
    cfg = ModelConfig(name=model)
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in mcore_shapes(cfg).items()}
    params = sum(v.numel() for v in weights.values())
    save_weights_only(path, weights, config_to_dict(cfg))
    return {"params": params, "bytes": sum(v.numel() * v.element_size() for v in weights.values())}


def time_conversion(src: Path, dst: Path, max_shard_size: str) -> dict:
    # Import what the converter imports lazily, so that the timer sees the conversion only
    # (the save_file side is timed after its imports too).
    import torch.distributed.checkpoint  # noqa: F401
    import tqdm.auto  # noqa: F401

    from lumos_mcore.convert import convert_checkpoint, stream_weights

    shutil.rmtree(dst, ignore_errors=True)
    # Read the checkpoint files once (as right after training wrote them, they are then in the
    # page cache): the timed conversion compares with save_file, which reads nothing either.
    t0 = time.perf_counter()
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    preread_s = time.perf_counter() - t0
    os.sync()  # no other writer's dirty data left to flush inside the timed region
    t0 = time.perf_counter()
    convert_checkpoint(src, "mcore", dst, "hf", max_shard_size=max_shard_size)
    seconds = time.perf_counter() - t0
    # The read + convert part alone (every tensor produced, nothing written).
    t0 = time.perf_counter()
    _, _, stream = stream_weights(src, "mcore", ema=False)
    nbytes = sum(t.numel() * t.element_size() for _, t in stream)
    read_s = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "read_convert_s": read_s,
        "preread_s": preread_s,
        "bytes": nbytes,
        "peak_rss_gib": _peak_rss_gib(),
    }


def time_plain_save(hf_dir: Path, dst: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from lumos_mcore.convert.safetensors_io import safetensors_files
    from lumos_mcore.durable import fsync_file

    tensors = {}
    for f in safetensors_files(hf_dir):
        for k, v in load_file(f).items():
            tensors[k] = v.clone()  # resident in process memory, not file-backed
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    out = dst / "model.safetensors"
    os.sync()
    t0 = time.perf_counter()
    save_file(tensors, out, metadata={"format": "pt"})
    fsync_file(out)  # the converter fsyncs its files; do the same here
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": _peak_rss_gib()}


def _child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Lumos-XL/2")
    p.add_argument("--workdir", default="/tmp/lumos_benchmark_conversion")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-shard-size", default="10GB")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    p.add_argument("--_step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    ckpt, hf, plain = work / "mcore", work / "hf", work / "plain"

    if args._step == "make":
        print(json.dumps(make_checkpoint(args.model, ckpt)))
        return {}
    if args._step == "convert":
        print(json.dumps(time_conversion(ckpt, hf, args.max_shard_size)))
        return {}
    if args._step == "save":
        print(json.dumps(time_plain_save(hf, plain)))
        return {}

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = ["--model", args.model, "--workdir", str(work)]
    common += ["--max-shard-size", args.max_shard_size]
    t0 = time.perf_counter()
    made = _child(["--_step", "make", *common])
    print(
        f"{args.model}: {made['params'] / 1e6:.0f}M parameters, {made['bytes'] / 2**30:.2f} GiB "
        f"fp32; megatron checkpoint written in {time.perf_counter() - t0:.1f}s"
    )
    convert, save = [], []
    for i in range(args.repeat):
        convert.append(_child(["--_step", "convert", *common]))
        save.append(_child(["--_step", "save", *common]))
        print(
            f"  run {i + 1}: [source files read in {convert[-1]['preread_s']:.2f}s] mcore->hf "
            f"{convert[-1]['seconds']:.2f}s (reading + converting alone "
            f"{convert[-1]['read_convert_s']:.2f}s; peak RSS "
            f"{convert[-1]['peak_rss_gib']:.2f} GiB) | safetensors save_file "
            f"{save[-1]['seconds']:.2f}s (peak RSS {save[-1]['peak_rss_gib']:.2f} GiB)"
        )
    c = statistics.median(r["seconds"] for r in convert)
    s = statistics.median(r["seconds"] for r in save)
    c_min, s_min = min(r["seconds"] for r in convert), min(r["seconds"] for r in save)
    result = {
        "model": args.model,
        "params": made["params"],
        "bytes": made["bytes"],
        "convert_s": c,
        "save_file_s": s,
        "ratio": c / s,
        "convert_min_s": c_min,
        "save_file_min_s": s_min,
        "ratio_of_minima": c_min / s_min,
        "convert_peak_rss_gib": max(r["peak_rss_gib"] for r in convert),
        "save_peak_rss_gib": max(r["peak_rss_gib"] for r in save),
    }
    print(
        f"median over {args.repeat}: mcore->hf {c:.2f}s vs save_file {s:.2f}s -> "
        f"{c / s:.2f}x; best runs {c_min:.2f}s vs {s_min:.2f}s -> {c_min / s_min:.2f}x "
        "(target <= 2x)"
    )
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
