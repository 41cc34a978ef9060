"""Synthetic feature data: deterministic, fast, and the condition predicts the latent."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lumos_mcore.data.synthetic import write_synthetic_feature_shards

from .conftest import open_dataset

REPO = Path(__file__).resolve().parents[2]


def _load_all(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    ds = open_dataset(path)
    samples = [ds.get(i) for i in range(len(ds))]
    latents = torch.stack([s["latent"] for s in samples]).numpy()
    conds = torch.stack([s["cond"] for s in samples]).numpy()
    return latents, conds, [s["meta"] for s in samples]


def test_512_samples_quickly_and_deterministically(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    out = write_synthetic_feature_shards(
        tmp_path / "a", num_samples=512, latent_channels=4, latent_size=16, frames=None,
        cond_tokens=1, cond_dim=768, samples_per_shard=128, seed=7,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"512 synthetic samples took {elapsed:.2f}s (target ~1s)"
    assert out == tmp_path / "a"
    write_synthetic_feature_shards(tmp_path / "b", num_samples=512, samples_per_shard=128, seed=7)
    write_synthetic_feature_shards(tmp_path / "c", num_samples=512, samples_per_shard=128, seed=8)
    names = ["index.json"] + [f"features-{i:06d}.tar" for i in range(4)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / names[1]).read_bytes() != (tmp_path / "c" / names[1]).read_bytes()

    latents, conds, metas = _load_all(out)
    assert latents.shape == (512, 4, 16, 16) and conds.shape == (512, 1, 768)
    # Scaled-VAE-like statistics and DINO-like unit-norm condition vectors.
    assert abs(latents.mean()) < 0.1 and 0.7 < latents.std() < 1.3
    np.testing.assert_allclose(np.linalg.norm(conds[:, 0], axis=-1), 1.0, atol=2e-3)
    assert len({m["class_id"] for m in metas}) == 16


def test_condition_predicts_the_latent(tmp_path: Path) -> None:
    """Nearest neighbours in condition space predict held-out latents; no condition cannot."""
    out = write_synthetic_feature_shards(
        tmp_path / "d", num_samples=512, samples_per_shard=256, seed=1
    )
    latents, conds, metas = _load_all(out)
    x = latents.reshape(512, -1)
    c = conds[:, 0]
    train, test = slice(0, 384), slice(384, 512)
    sim = c[test] @ c[train].T  # cosine similarity, [128, 384]
    nearest = np.argsort(-sim, axis=1)[:, :8]
    pred = x[train][nearest].mean(1)  # [128, D]
    resid = ((x[test] - pred) ** 2).sum()
    total = ((x[test] - x[train].mean(0)) ** 2).sum()
    r2 = 1 - resid / total
    assert r2 > 0.75, f"condition explains only R^2={r2:.3f} of the latent"
    # The condition identifies the class; a shuffled condition explains nothing.
    classes = np.asarray([m["class_id"] for m in metas])
    assert (classes[train][nearest[:, 0]] == classes[test]).mean() > 0.98
    rng = np.random.default_rng(0)
    shuffled = x[train][rng.permutation(384)[:128]]
    r2_shuffled = 1 - ((x[test] - shuffled) ** 2).sum() / total
    assert r2_shuffled < 0.1


def test_cli_video_with_padded_conditions(tmp_path: Path) -> None:
    out = tmp_path / "v"
    cmd = [
        sys.executable, str(REPO / "tools" / "make_synthetic_shards.py"), "--out", str(out),
        "--num-samples", "12", "--latent-size", "8", "--latent-channels", "4", "--frames", "5",
        "--cond-tokens", "6", "--cond-dim", "32", "--cond-padding", "--seed", "3",
        "--samples-per-shard", "5",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    ds = open_dataset(out)
    assert len(ds) == 12 and list(ds.shard_sizes) == [5, 5, 2]
    lengths = set()
    for i in range(12):
        s = ds.get(i)
        assert s["latent"].shape == (4, 5, 8, 8)
        assert s["meta"]["num_frames"] == 5
        n = int(s["cond_mask"].sum())
        lengths.add(n)
        assert s["cond_mask"][:n].all() and not s["cond_mask"][n:].any()
        assert not s["cond"][n:].any()
        np.testing.assert_allclose(s["cond"][:n].norm(dim=-1).numpy(), 1.0, atol=2e-3)
        # Frames drift smoothly: neighbours are closer than the first and last frame.
        frames = s["latent"].transpose(0, 1).reshape(5, -1)
        step = (frames[1:] - frames[:-1]).norm(dim=-1).mean()
        assert step < (frames[4] - frames[0]).norm() + 1e-6
    assert len(lengths) > 1
