"""Synthetic precomputed-feature datasets that a conditional diffusion model can actually learn.

Each sample has a class id. The latent is a smooth procedural pattern — a few oriented sinusoids
plus a Gaussian blob — whose frequencies, orientations, phases, per-channel mixing and blob are a
deterministic function of the class id, with small per-sample jitter (phase, amplitude, noise) so
the data is a distribution rather than a lookup table. For video the waves drift with a
class-specific velocity across frames. The condition is a fixed random embedding of the class id
(per token, L2-normalised like a DINO CLS feature) plus small noise, re-normalised. A model that
uses its condition can therefore denoise far better than an unconditional one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumos_mcore.data.shards import FeatureShardWriter

_WAVES = 3
# Per-sample variation around the class template.
_PHASE_JITTER = 0.3  # radians
_AMP_JITTER = 0.1  # relative
_LATENT_NOISE = 0.05  # absolute, after normalisation to unit std
_COND_NOISE = 0.3  # norm of the noise vector relative to the unit-norm class embedding
_CHUNK = 256  # samples generated per vectorised chunk


@dataclass
class SyntheticClasses:
    """Class templates: wave and blob parameters plus condition embeddings."""

    freq: np.ndarray  # [K, W] cycles per latent width
    theta: np.ndarray  # [K, W] orientation
    phase: np.ndarray  # [K, W]
    velocity: np.ndarray  # [K, W] phase drift per frame (video)
    mix: np.ndarray  # [K, C, W] per-channel amplitude of each wave
    blob_center: np.ndarray  # [K, 2] in [0, 1]
    blob_sigma: np.ndarray  # [K]
    blob_amp: np.ndarray  # [K, C]
    cond_embedding: np.ndarray  # [K, Lc, Dc], unit-norm tokens


def make_classes(
    *, num_classes: int, latent_channels: int, cond_tokens: int, cond_dim: int, seed: int
) -> SyntheticClasses:
    """Class templates for ``seed`` (independent of the number of samples drawn)."""
    rng = np.random.default_rng([seed, 0x5C1A55])
    k, c, w = num_classes, latent_channels, _WAVES
    mix = rng.normal(size=(k, c, w))
    blob_amp = rng.normal(size=(k, c)) * 1.5
    # Waves give variance 0.8 per channel (sin has variance 1/2); the blob brings the latent
    # close to unit variance, like scaled SD-VAE latents.
    mix /= np.sqrt(0.5 * (mix**2).sum(-1, keepdims=True) / 0.8)
    emb = rng.normal(size=(k, cond_tokens, cond_dim))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return SyntheticClasses(
        freq=rng.uniform(0.5, 3.0, size=(k, w)),
        theta=rng.uniform(0.0, np.pi, size=(k, w)),
        phase=rng.uniform(0.0, 2 * np.pi, size=(k, w)),
        velocity=rng.uniform(-0.6, 0.6, size=(k, w)),
        mix=mix,
        blob_center=rng.uniform(0.2, 0.8, size=(k, 2)),
        blob_sigma=rng.uniform(0.1, 0.25, size=k),
        blob_amp=blob_amp,
        cond_embedding=emb,
    )


def synthesize(
    classes: SyntheticClasses,
    class_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    latent_size: int | tuple[int, int],
    frames: int | None,
    pad_cond: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Latents [n, C, (T,) H, W], conditions [n, Lc, Dc] and optional masks [n, Lc] for ``class_ids``.

    ``latent_size``: ``H = W``, or ``(H, W)``."""
    n = len(class_ids)
    ids = class_ids
    t_count = 1 if frames is None else frames
    lh, lw = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    y, x = np.meshgrid(
        (np.arange(lh) + 0.5) / lh, (np.arange(lw) + 0.5) / lw, indexing="ij"
    )  # [H, W]
    t = np.arange(t_count, dtype=np.float64)  # [T]
    phase = classes.phase[ids] + rng.normal(scale=_PHASE_JITTER, size=(n, _WAVES))  # [n, W]
    amp = 1.0 + rng.normal(scale=_AMP_JITTER, size=(n, 1, 1))  # [n, 1, 1]
    direction = (
        np.cos(classes.theta[ids])[..., None, None] * x
        + np.sin(classes.theta[ids])[..., None, None] * y
    )  # [n, W, H, W]
    spatial = 2 * np.pi * classes.freq[ids][..., None, None] * direction  # [n, W, H, W]
    drift = classes.velocity[ids][..., None] * t  # [n, W, T]
    arg = spatial[:, :, None] + (phase[..., None] + drift)[..., None, None]  # [n, W, T, H, W]
    waves = np.sin(arg)
    latent = np.einsum("ncw,nwthv->ncthv", classes.mix[ids] * amp, waves)  # [n, C, T, H, W]
    d2 = (x - classes.blob_center[ids, 0, None, None]) ** 2 + (
        y - classes.blob_center[ids, 1, None, None]
    ) ** 2
    blob = np.exp(-d2 / (2 * classes.blob_sigma[ids, None, None] ** 2))  # [n, H, W]
    latent += classes.blob_amp[ids][:, :, None, None, None] * blob[:, None, None]
    latent += rng.normal(scale=_LATENT_NOISE, size=latent.shape)
    if frames is None:
        latent = latent[:, :, 0]  # [n, C, H, W]

    emb = classes.cond_embedding[ids]  # [n, Lc, Dc]
    dc = emb.shape[-1]
    cond = emb + rng.normal(scale=_COND_NOISE / np.sqrt(dc), size=emb.shape)
    cond /= np.linalg.norm(cond, axis=-1, keepdims=True)
    mask = None
    if pad_cond:
        # T5-style padding: a random number of real tokens, zeros after them.
        lc = emb.shape[1]
        real = rng.integers(1, lc + 1, size=n)
        mask = np.arange(lc)[None, :] < real[:, None]  # [n, Lc]
        cond *= mask[..., None]
    return latent.astype(np.float32), cond.astype(np.float32), mask


def write_synthetic_feature_shards(
    out_dir: str | os.PathLike,
    *,
    num_samples: int,
    latent_channels: int = 4,
    latent_size: int = 16,
    frames: int | None = None,
    cond_tokens: int = 1,
    cond_dim: int = 768,
    samples_per_shard: int = 256,
    seed: int = 0,
    num_classes: int = 16,
    pad_cond: bool = False,
    storage_dtype: str = "float16",
    overwrite: bool = False,
    shapes: list[tuple[int, int, int]] | None = None,
) -> Path:
    """Write a deterministic synthetic feature dataset; returns ``out_dir`` (use as ``data.path``).

    ``frames`` set -> video latents [C, T, H, W]; ``pad_cond`` -> variable-length conditions with a
    ``cond_mask`` (T5-like). ``shapes`` -> mixed sizes for packing: each sample draws one latent
    ``(frames, H, W)`` from the list (``latent_size`` and ``frames`` are then unused); if any has
    ``frames > 1`` every latent is stored as video ``[C, T, H, W]`` (images as one frame, since a
    dataset has one latent rank), else as images ``[C, H, W]``. Same arguments -> byte-identical
    shards.
    """
    for name, v in (
        ("num_samples", num_samples),
        ("latent_channels", latent_channels),
        ("latent_size", latent_size),
        ("cond_tokens", cond_tokens),
        ("cond_dim", cond_dim),
        ("num_classes", num_classes),
    ):
        if v < 1:
            raise ValueError(f"{name}={v}: must be >= 1")
    if frames is not None and frames < 1:
        raise ValueError(f"frames={frames}: must be >= 1 or None for images")
    if shapes is not None:
        shapes = [tuple(int(v) for v in s) for s in shapes]
        if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise ValueError(f"shapes={shapes}: need a non-empty list of (frames, H, W) >= 1")
    out = Path(out_dir)
    classes = make_classes(
        num_classes=num_classes,
        latent_channels=latent_channels,
        cond_tokens=cond_tokens,
        cond_dim=cond_dim,
        seed=seed,
    )
    rng = np.random.default_rng([seed, 0xDA7A])
    extra = {
        "synthetic": {
            "seed": seed,
            "num_classes": num_classes,
            "latent_size": latent_size,
            "frames": frames,
            "cond_tokens": cond_tokens,
            "cond_dim": cond_dim,
        }
    }
    if shapes is not None:
        extra["synthetic"]["shapes"] = [list(s) for s in shapes]
    with FeatureShardWriter(
        out,
        samples_per_shard=samples_per_shard,
        storage_dtype=storage_dtype,
        overwrite=overwrite,
        extra=extra,
    ) as writer:
        if shapes is not None:
            _write_mixed(writer, classes, rng, num_samples, shapes, num_classes, pad_cond)
            return out
        for start in range(0, num_samples, _CHUNK):
            n = min(_CHUNK, num_samples - start)
            ids = rng.integers(0, num_classes, size=n)
            latents, conds, masks = synthesize(
                classes, ids, rng, latent_size=latent_size, frames=frames, pad_cond=pad_cond
            )
            for j in range(n):
                i = start + j
                meta = {
                    "class_id": int(ids[j]),
                    "caption": f"synthetic pattern {int(ids[j])}",
                    "source_size": [latent_size * 8, latent_size * 8],
                }
                if frames is not None:
                    meta.update(num_frames=frames, fps=8.0)
                writer.write(
                    latents[j],
                    conds[j],
                    cond_mask=None if masks is None else masks[j],
                    meta=meta,
                    key=f"{i:09d}",
                )
    return out


def _write_mixed(
    writer: FeatureShardWriter,
    classes: SyntheticClasses,
    rng: np.random.Generator,
    num_samples: int,
    shapes: list[tuple[int, int, int]],
    num_classes: int,
    pad_cond: bool,
) -> None:
    """Samples of mixed latent shapes (one ``synthesize`` call each; meant for small datasets)."""
    video = any(f > 1 for f, _, _ in shapes)
    for i in range(num_samples):
        f, h, w = shapes[int(rng.integers(0, len(shapes)))]
        ids = rng.integers(0, num_classes, size=1)
        latents, conds, masks = synthesize(
            classes, ids, rng, latent_size=(h, w), frames=f if video else None, pad_cond=pad_cond
        )
        meta = {
            "class_id": int(ids[0]),
            "caption": f"synthetic pattern {int(ids[0])}",
            "source_size": [h * 8, w * 8],
        }
        if video:
            meta.update(num_frames=f, fps=8.0)
        writer.write(
            latents[0],
            conds[0],
            cond_mask=None if masks is None else masks[0],
            meta=meta,
            key=f"{i:09d}",
        )
