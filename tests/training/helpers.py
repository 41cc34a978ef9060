"""Shared helpers for the training tests: tiny synthetic data and job configs."""

from __future__ import annotations

import json
from pathlib import Path

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, OptimConfig, TrainConfig
from lumos_mcore.data.synthetic import write_synthetic_feature_shards


def make_data(root: Path, num_samples: int = 64, latent_size: int = 8, cond_dim: int = 32) -> Path:
    return write_synthetic_feature_shards(
        root / "data",
        num_samples=num_samples,
        latent_size=latent_size,
        cond_tokens=1,
        cond_dim=cond_dim,
        samples_per_shard=16,
        seed=0,
    )


def make_job(
    data: Path | None, out: Path, *, objective: str = "ddpm", steps: int = 12, **sections
) -> JobConfig:
    """A Lumos-Micro job on 8x8 latents; ``sections`` override whole config sections."""
    base = dict(
        data=DataConfig(path=str(data), num_workers=0) if data is not None else None,
        model=ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_channels=32),
        diffusion=DiffusionConfig(objective=objective),
        optim=OptimConfig(lr=2e-3, warmup_steps=2),
        train=TrainConfig(
            steps=steps,
            micro_batch_size=4,
            global_batch_size=8,
            log_interval=100,
            output_dir=str(out),
            ema_decay=0.99,
            tensorboard=False,
        ),
        checkpoint=CheckpointConfig(save_interval=4),
        parallel=ParallelConfig(),
    )
    base.update(sections)
    return JobConfig(**base)


def make_media_job(root: Path, steps: int = 3) -> JobConfig:
    """Raw JPEG shards (64 px) + tiny random VAE / DINO saved locally; Lumos-Micro on 8x8."""
    from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
    from lumos_mcore.data.media.synthetic import write_synthetic_media
    from lumos_mcore.encoders.tiny import save_tiny_encoders

    media = write_synthetic_media(root / "media", num_images=16, sizes=[(64, 64)], seed=0)
    enc = save_tiny_encoders(root / "encoders")
    cfg = MediaDataConfig(
        path=str(media),
        buckets=[[64, 64]],
        num_workers=0,
        encoders=EncodersConfig(vae=str(enc["vae"]), dino=str(enc["dino"]), dino_image_size=32),
    )
    return make_job(
        None,
        root / "run",
        steps=steps,
        media=cfg,
        checkpoint=CheckpointConfig(save_interval=100),
        parallel=ParallelConfig(tp=2),
    )


def read_losses(out: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl; a step logged twice (re-run after a kill) keeps the last."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["train/loss"]
    return losses


def train_in_process(rank: int, world: int, job: JobConfig) -> dict:
    """``run_distributed`` target: train ``job`` on this rank, return the logging rank's losses."""
    from lumos_mcore.training.loop import Trainer

    result = Trainer(job).run()
    return {"losses": result.losses, "step": result.final_step, "checkpoint": result.checkpoint}


def read_metrics(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step (a step logged twice keeps the last record)."""
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


class KeyRecorder:
    """Stands in for a trainer's data iterator and records the sample keys of every micro-batch
    (or pack) it hands out, for tests of what was trained on."""

    def __init__(self, batches, dataset) -> None:
        self.batches, self.dataset, self.micro_batches = batches, dataset, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.micro_batches.append([self.dataset.key(i) for i in batch["index"].tolist()])
        return batch

    def __getattr__(self, name):
        return getattr(self.batches, name)

    @property
    def seen(self) -> list[str]:
        return [k for mb in self.micro_batches for k in mb]


def assert_logged_losses_equal(
    per_rank: list[list[float]], reference: list[float], steps: int, rtol: float = 1e-5
) -> None:
    """The one logging rank's per-step losses (other ranks return none) equal ``reference``."""
    logged = [losses for losses in per_rank if losses]
    assert len(logged) == 1 and len(logged[0]) == steps, per_rank
    for a, b in zip(logged[0], reference):
        assert abs(a - b) <= rtol * abs(b), (logged[0], reference)
