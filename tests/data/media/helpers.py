"""Builders of small real media (encoded JPEG / VP9 / H.264) and datasets for the media tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.media.synthetic import encode_jpeg, encode_video, render_clip


def jpeg(h: int = 64, w: int = 64, *, cls: int = 0, seed: int = 0) -> bytes:
    return encode_jpeg(render_clip(cls, h, w, 1, seed=seed, jitter=seed)[0])


def video(
    codec: str = "vp9", h: int = 48, w: int = 64, frames: int = 20, *, cls: int = 0, seed: int = 0
) -> tuple[bytes, str]:
    return encode_video(render_clip(cls, h, w, frames, seed=seed, jitter=seed), codec)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain webdataset tar (what img2dataset-like tools produce), members in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def meta(**kw) -> bytes:
    return json.dumps(kw).encode()


def open_media(path: Path, **kw) -> MediaDataset:
    kw.setdefault("num_workers", 0)
    return MediaDataset(MediaDataConfig(path=str(path), **kw))


def epoch_keys(ds: MediaDataset, batch: int = 4) -> list[str]:
    """Keys of one pass over the dataset's units in order, decoded batch by batch."""
    keys = []
    for lo, hi in ds.units():
        for start in range(lo, hi, batch):
            plans = [ds.get_or_none(i) for i in range(start, min(start + batch, hi))]
            keys += ds.collate([p for p in plans if p is not None])["key"]
    return keys


def rng_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
