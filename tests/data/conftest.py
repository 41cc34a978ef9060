"""Shared helpers for the data tests: small datasets with known contents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.features import FeatureDataset
from lumos_mcore.data.shards import FeatureShardWriter


def write_random_dataset(
    out: Path,
    *,
    num_samples: int,
    samples_per_shard: int,
    latent_shape: tuple[int, ...] = (4, 8, 8),
    cond_shape: tuple[int, int] = (1, 16),
    storage_dtype: str = "float16",
    with_mask: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Write random samples; returns what was written (arrays as given to the writer)."""
    rng = np.random.default_rng(seed)
    written = []
    with FeatureShardWriter(
        out, samples_per_shard=samples_per_shard, storage_dtype=storage_dtype
    ) as w:
        for i in range(num_samples):
            latent = rng.normal(size=latent_shape).astype(np.float32)
            cond = rng.normal(size=cond_shape).astype(np.float32)
            mask = None
            if with_mask:
                mask = np.arange(cond_shape[0]) < rng.integers(1, cond_shape[0] + 1)
            meta = {"caption": f"sample {i}", "source_size": [64, 64]}
            key = w.write(latent, cond, cond_mask=mask, meta=meta, key=f"s{i:05d}")
            written.append(
                {"key": key, "latent": latent, "cond": cond, "cond_mask": mask, "meta": meta}
            )
    return written


def open_dataset(path: Path, **cfg) -> FeatureDataset:
    cfg.setdefault("num_workers", 0)
    return FeatureDataset(DataConfig(path=str(path), **cfg))


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """37 samples in shards of 8 (last shard partial): exercises uneven shard sizes."""
    write_random_dataset(tmp_path / "ds", num_samples=37, samples_per_shard=8)
    return tmp_path / "ds"
