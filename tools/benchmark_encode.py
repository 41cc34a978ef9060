"""Online VAE encoding in a model replica: first rank only vs ``media.encoders.shard_vae``.

    python tools/benchmark_encode.py --ranks 2 --frames 8 --size 64 --json runs/encode.json

Spawns ``--ranks`` processes (gloo on CPU, NCCL with one GPU each) forming one replica, builds
a randomly initialised VAE of the SD-VAE architecture (84M parameters; ``--vae`` takes a local
AutoencoderKL directory instead) and times ``OnlineEncodingIterator`` on the same video
micro-batches both ways, alternating passes so a busy machine disturbs both alike: the
replica's first rank encoding everything and broadcasting, and every rank encoding an equal
share of the frames and all-gathering. It reports seconds per micro-batch (median over passes)
and the speed-up, and checks that both ways give every rank the same latents. The condition
encoder is not timed (the sharded mode leaves it on the first rank either way).

On CPU each rank gets one thread (``--threads``), so the ratio is what extra ranks give when
each has its own core; with N GPUs per replica it approaches N when the VAE dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import lumos_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def save_sd_like_vae(out: Path, seed: int = 0) -> Path:
    """A random AutoencoderKL with the SD-VAE's architecture (same cost per frame)."""
    from lumos_mcore.encoders.tiny import save_random_vae

    return save_random_vae(
        out, seed=seed, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        norm_num_groups=32, sample_size=512,
    )  # fmt: skip


class _Encoders:
    """The first rank's encoders for this benchmark: the real FrozenVAE, a constant condition
    (the condition encoder is outside what is compared)."""

    def __init__(self, vae: Any) -> None:
        self.vae, self.device = vae, vae.device

    def encode_cond(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch["pixels"].shape[0]
        return torch.zeros(b, 1, 8), torch.ones(b, 1, dtype=torch.bool)

    def encode(self, batch: dict) -> dict:
        cond, mask = self.encode_cond(batch)
        return {"latent": self.vae.encode(batch["pixels"]), "cond": cond, "cond_mask": mask}


def _rank(rank: int, world: int, args: argparse.Namespace, port: int, results: Any) -> None:
    import torch.distributed as dist

    from lumos_mcore.encoders.frozen import OnlineEncodingIterator
    from lumos_mcore.encoders.vae import FrozenVAE

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    vae = FrozenVAE(args.vae, batch=args.vae_batch, device=device, dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.frames
    batch = {
        "pixels": torch.rand(b, 3, t, args.size, args.size, generator=g) * 2 - 1,
        "index": torch.arange(b),
    }
    enc = _Encoders(vae) if rank == 0 else None
    ways = {
        "first rank only": OnlineEncodingIterator(
            iter(lambda: batch, None), enc, group=dist.group.WORLD, device=device
        ),
        "shard_vae": OnlineEncodingIterator(
            iter(lambda: batch, None), enc, group=dist.group.WORLD, device=device, vae=vae
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    latents = {}
    for p in range(args.passes + 1):  # the first pass warms up
        for name, it in ways.items():
            dist.barrier()
            t0 = time.perf_counter()
            out = next(it)
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if p:
                times[name].append(time.perf_counter() - t0)
            latents[name] = out["latent"].cpu()
    same = torch.allclose(latents["first rank only"], latents["shard_vae"], rtol=0, atol=1e-4)
    results.put(
        (rank, {"times": times, "same": bool(same), "shape": list(latents["shard_vae"].shape)})
    )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the replica (processes)")
    ap.add_argument("--batch", type=int, default=1, help="videos per micro-batch")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="frame side in pixels")
    ap.add_argument("--vae", help="local AutoencoderKL directory (default: random SD-VAE shape)")
    ap.add_argument("--vae-batch", type=int, default=4, help="frames per VAE call")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        raise SystemExit("--ranks: a replica of at least 2 ranks is needed to compare")
    if min(args.batch, args.frames, args.size, args.passes, args.vae_batch) < 1:
        raise SystemExit("--batch, --frames, --size, --passes and --vae-batch must be >= 1")
    import torch.multiprocessing as mp

    from lumos_mcore.parallel.state import find_free_port

    with tempfile.TemporaryDirectory() as tmp:
        if args.vae is None:
            args.vae = str(save_sd_like_vae(Path(tmp) / "vae"))
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = find_free_port()
        procs = [
            ctx.Process(target=_rank, args=(r, args.ranks, args, port, results))
            for r in range(args.ranks)
        ]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    r0 = got[0]
    med = {k: statistics.median(v) for k, v in r0["times"].items()}
    speedup = med["first rank only"] / med["shard_vae"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"replica of {args.ranks} ranks ({device}), {args.batch} x {args.frames} frames of "
        f"{args.size}x{args.size}, latents {r0['shape']}"
    )
    for name, sec in med.items():
        print(f"  {name:16s} {sec:8.3f} s / micro-batch (median of {args.passes})")
    print(f"  speed-up {speedup:.2f}x; same latents on every rank both ways: "
          f"{all(r['same'] for r in got.values())}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "ranks": args.ranks,
            "device": device,
            "batch": args.batch,
            "frames": args.frames,
            "size": args.size,
            "seconds": med,
            "speedup": speedup,
            "same_latents": all(r["same"] for r in got.values()),
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if all(r["same"] for r in got.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
