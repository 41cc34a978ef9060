"""Shared media datasets (built once per test session: encoding video takes real time)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lumos_mcore.data.media.synthetic import write_synthetic_media


@pytest.fixture(scope="session")
def synth_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 JPEGs (64x64 and 64x96) + 12 videos (48x64, 20 frames, VP9 and H.264 alternating),
    captions and camera poses, 8 samples per shard."""
    out = tmp_path_factory.mktemp("media") / "synth"
    return write_synthetic_media(
        out,
        num_images=24,
        num_videos=12,
        sizes=[(64, 64), (64, 96), (48, 64)],
        frames=20,
        camera=True,
        samples_per_shard=8,
        seed=3,
    )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine the
    OpenMP pool makes them 10-40x slower; restore the setting for other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
