"""``lumos_mcore.train`` with ``data.pack=true``: Lumos-I2V on a tiny fixed set of mixed images
and videos (two resolutions, 1-3 frames) trains on packs over DP=2 — each rank runs the same
number of packs per step (it varies between steps), the loss is finite and goes down."""

from __future__ import annotations

import json
import math

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, OptimConfig, TrainConfig
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from tests.dist_utils import run_distributed
from tests.training.helpers import assert_logged_losses_equal, make_job, train_in_process

SHAPES = [(1, 8, 8), (1, 8, 12), (3, 8, 8), (2, 4, 8)]


def _packed_job(data, out, steps, capacity=56, **parallel):
    job = make_job(
        data,
        out,
        steps=steps,
        model=ModelConfig(
            name="Lumos-Micro/2",
            variant="i2v",
            latent_size=8,
            num_frames=3,
            cond_channels=32,
            video_attention="full_3d",
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(
            steps=steps,
            micro_batch_size=1,
            global_batch_size=8,
            log_interval=1000,
            output_dir=str(out),
            ema_decay=0.0,
            tensorboard=False,
        ),
        checkpoint=CheckpointConfig(save_interval=10_000),
        parallel=ParallelConfig(**parallel),
    )
    job.data = DataConfig(path=str(data), num_workers=1, pack=True, pack_capacity=capacity)
    job.__post_init__()  # the cross-section checks see the packed data section
    return job


def _assert_two_ranks_equal_one(tmp_path, capacity: int, **parallel) -> None:
    """3 packed steps on two ranks laid out as ``parallel`` give one rank's per-step losses."""
    data = write_synthetic_feature_shards(
        tmp_path / "data", num_samples=16, shapes=SHAPES, cond_tokens=1, cond_dim=32, seed=0
    )
    steps = 3
    (ref,) = run_distributed(
        train_in_process, 1, _packed_job(data, tmp_path / "one", steps, capacity), timeout=300
    )
    job = _packed_job(data, tmp_path / "two", steps, capacity, **parallel)
    results = run_distributed(train_in_process, 2, job, timeout=300)
    assert_logged_losses_equal([r["losses"] for r in results], ref["losses"], steps)


def test_packed_training_cp2_equals_cp1(tmp_path):
    """Packs from the loader split over two context-parallel ranks train exactly as on one."""
    _assert_two_ranks_equal_one(tmp_path, 56, cp=2)


def test_packed_training_pp2_equals_pp1(tmp_path):
    """Under pipeline parallelism every pack is padded to model.num_tokens (fixed activation
    shapes between stages); the padding changes nothing: per-step losses equal PP=1's."""
    # pack_capacity <= model.num_tokens = 3 frames x 4 x 4 = 48 (the fixed PP pack length)
    _assert_two_ranks_equal_one(tmp_path, 48, pp=2)


def test_packed_training_dp2_loss_goes_down(tmp_path):
    data = write_synthetic_feature_shards(
        tmp_path / "data",
        num_samples=16,
        shapes=SHAPES,
        cond_tokens=1,
        cond_dim=32,
        samples_per_shard=8,
        num_classes=2,
        seed=0,
    )
    steps = 24
    job = _packed_job(data, tmp_path / "run", steps)
    results = run_distributed(train_in_process, 2, job, timeout=400)
    losses = [r for r in results if r["losses"]][0]["losses"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first, f"packed loss {first:.4f} -> {last:.4f}"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["data/bad_samples"] == 0.0
    assert (metrics[-1]["data/pack_replaced"], metrics[-1]["data/pack_dropped"]) == (0.0, 0.0)
    # Packs per step per rank (megatron's micro-batches) follow each window's plan: 2 or 3
    # here; a trainer stuck at the first step's count would read 2 every step.
    assert {m["data/batches"] for m in metrics} == {2.0, 3.0}
    # tokens/s counts the samples' own tokens (16-48 each here), not model.num_tokens = 48
    tokens = [m["throughput/tokens_per_s"] * m["throughput/step_time_ms"] / 1e3 for m in metrics]
    assert all(8 * 16 - 1e-6 <= t <= 8 * 48 + 1e-6 for t in tokens), tokens
    assert len({round(t) for t in tokens}) > 1 and max(tokens) < 8 * 48


def test_packed_training_replaces_a_broken_sample_and_reports_it(tmp_path):
    """A sample whose latent no longer decodes is skipped and counted; in its pack a no larger
    sample from after the step's window takes its place, so the step trains on its planned
    number of samples, and the metrics say so (``data/pack_replaced``)."""
    from lumos_mcore.data.features import FeatureDataset
    from lumos_mcore.data.shards import LATENT, MEMBER_COLUMN

    data = write_synthetic_feature_shards(
        tmp_path / "data", num_samples=16, shapes=SHAPES, cond_tokens=1, cond_dim=32, seed=0
    )
    job = _packed_job(data, tmp_path / "run", steps=2)
    job.data.max_bad_fraction = 0.2
    ds = FeatureDataset(job.data)
    victim = 5  # 2 steps x 8 samples read all 16 once: the victim is in one step's window
    with open(ds.shard_path(victim), "r+b") as f:  # break the .npy magic of its latent
        f.seek(int(ds._offsets[victim, MEMBER_COLUMN[LATENT]]))
        f.write(b"BROKEN")
    (res,) = run_distributed(train_in_process, 1, job, timeout=300)
    assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"])
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["data/bad_samples"] == 1.0
    assert metrics[-1]["data/bad/undecodable"] == 1.0
    assert (metrics[-1]["data/pack_replaced"], metrics[-1]["data/pack_dropped"]) == (1.0, 0.0)
