#!/usr/bin/env python
"""How long a checkpoint save stops training: synchronous vs ``checkpoint.async_save``.

    python tools/benchmark_checkpoint.py --model Lumos-B/2 --workdir /tmp/bench_ckpt
    torchrun --nproc-per-node 8 tools/benchmark_checkpoint.py --model Lumos-XL/2 ...

One trainer (model, distributed optimizer state, EMA) takes a few steps on synthetic feature
shards, then saves ``--repeat`` times each way, alternating, in the same process:

- sync: the training loop waits for ``dist_checkpointing.save`` and the commit;
- async: the loop waits only for the state dict, the common part and the hand-off to the
  writer process (host copy on GPU, fork on CPU); training steps then run while the shards
  are written, and the time until the commit (folder renamed, ``latest`` written) is reported
  too, with the step time measured during the write against an idle step.

Reported as medians and ratios of one run; on a machine with few cores the writer competes with
the training step for CPU, which the "step during write" column shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _job(args: argparse.Namespace, data: Path, out: Path):
    from lumos_mcore.config.data import DataConfig
    from lumos_mcore.config.job import JobConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import CheckpointConfig, TrainConfig

    return JobConfig(
        data=DataConfig(path=str(data), num_workers=0),
        model=ModelConfig(name=args.model, latent_size=args.latent_size, cond_channels=32),
        train=TrainConfig(
            steps=10_000,
            micro_batch_size=1,
            global_batch_size=args.world_size,
            output_dir=str(out),
            ema_decay=0.999,
            tensorboard=False,
        ),
        checkpoint=CheckpointConfig(save_interval=10_000, keep_last=1),
        parallel=ParallelConfig(use_distributed_optimizer=args.world_size > 1),
    )


def _timed(fn) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _agree(seconds: float) -> float:
    """The slowest rank's time: the loop goes on when the last rank does."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from lumos_mcore.data.synthetic import write_synthetic_feature_shards
    from lumos_mcore.parallel.state import init_distributed
    from lumos_mcore.training.loop import Trainer

    rank, world = init_distributed()
    args.world_size = world
    work = Path(args.workdir)
    data = work / "data"
    if rank == 0 and not (data / "index.json").is_file():
        write_synthetic_feature_shards(
            data,
            num_samples=64,
            latent_size=args.latent_size,
            cond_dim=32,
            samples_per_shard=32,
        )
    dist.barrier()
    trainer = Trainer(_job(args, data, work / "run"))
    batches = trainer._iterators()

    def step() -> None:
        trainer.train_step(batches)
        trainer.step += 1

    for _ in range(2):  # warm-up: allocator, optimizer state exists
        step()
    idle = statistics.median(_agree(_timed(step)) for _ in range(3))
    ckpt = trainer.checkpointer
    sync, blocked, commit, during = [], [], [], []
    for _ in range(args.repeat):
        ckpt.async_save = False
        sync.append(_agree(_timed(trainer.save)))
        ckpt.async_save = True
        t0 = time.perf_counter()
        blocked.append(_agree(_timed(trainer.save)))
        while ckpt.save_in_flight:  # train on while the writer runs; commit when it is done
            during.append(_agree(_timed(step)))
            ckpt.finalize()
        commit.append(_agree(time.perf_counter() - t0))
    trainer.data.close()
    params = sum(p.numel() for c in trainer.chunks for p in c.parameters())
    med = statistics.median
    result = {
        "model": args.model,
        "latent_size": args.latent_size,
        "ranks": world,
        "params_per_rank": params,
        "sync_save_s": med(sync),
        "async_blocking_s": med(blocked),
        "async_to_commit_s": med(commit),
        "idle_step_s": idle,
        "step_during_write_s": med(during) if during else float("nan"),
        "steps_during_write": len(during) / args.repeat,
        "blocking_ratio": med(sync) / med(blocked),
    }
    return result if rank == 0 else {}


def _markdown(r: dict) -> str:
    return (
        f"| model | ranks | sync save (s) | async: loop blocked (s) | blocked ratio | "
        f"async: until commit (s) | idle step (s) | step during write (s) |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {r['model']} @ {r['latent_size']}² latents | {r['ranks']} | "
        f"{r['sync_save_s']:.3f} | {r['async_blocking_s']:.3f} | "
        f"{r['blocking_ratio']:.1f}x less | {r['async_to_commit_s']:.3f} | "
        f"{r['idle_step_s']:.3f} | {r['step_during_write_s']:.3f} |\n"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="Lumos-B/2")
    p.add_argument("--latent-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/lumos_bench_checkpoint")
    p.add_argument("--out", default=None, help="write the result as markdown (and .json) here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat={args.repeat}: must be >= 1")
    result = run(args)
    if result:
        table = _markdown(result)
        print(table)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
