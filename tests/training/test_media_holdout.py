"""``validation.holdout=H`` on raw media through the trainer: JPEG shards in two aspect buckets,
the last H usable samples held out (never trained on, over more than one epoch), decoded and
encoded by the trainer's own frozen encoders, ``val/loss`` repeatable across a resume; the
validator's skipping of bad held-out samples; the errors, naming the flags."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, ValidationConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import KeyRecorder, make_job, read_metrics

BUCKETS = [[64, 64], [64, 96]]  # latents 8x8 and 8x12


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, Path, dict]:
    """20 JPEGs, 64x64 or 64x96 (seed 3: the last 4 fall in both buckets), tiny VAE / DINO."""
    from lumos_mcore.data.media.synthetic import write_synthetic_media
    from lumos_mcore.encoders.tiny import save_tiny_encoders

    root = tmp_path_factory.mktemp("media_holdout")
    path = write_synthetic_media(
        root / "media", num_images=20, sizes=[(64, 64), (64, 96)], samples_per_shard=8, seed=3
    )
    return root, path, save_tiny_encoders(root / "encoders")


def _media_cfg(path: Path, enc: dict, **kw) -> MediaDataConfig:
    return MediaDataConfig(
        path=str(path),
        buckets=BUCKETS,
        bucket_chunk=4,
        num_workers=0,
        encoders=EncodersConfig(vae=str(enc["vae"]), dino=str(enc["dino"]), dino_image_size=32),
        **kw,
    )


def _job(media, out: Path, steps: int, **validation) -> JobConfig:
    _, path, enc = media
    v = dict(interval=2, holdout=4, num_samples=4, grid_samples=2, grid_steps=2)
    v.update(validation)
    return make_job(
        None,
        out,
        steps=steps,
        media=_media_cfg(path, enc),
        validation=ValidationConfig(**v),
        checkpoint=CheckpointConfig(save_interval=100),  # saves only at each run's end
        parallel=ParallelConfig(),
    )


def _tail(path: Path, enc: dict, h: int) -> list[str]:
    """Keys of the last ``h`` usable samples in index order (opened without a holdout)."""
    from lumos_mcore.data.media.dataset import MediaDataset

    full = MediaDataset(_media_cfg(path, enc))
    names = {full.physical_index(i): full.key(i) for i in range(len(full))}
    return [names[p] for p in sorted(names)[-h:]]


def _runs(rank: int, world: int, jobs: dict) -> dict:
    from lumos_mcore.training.loop import Trainer

    out = {}
    for name, job in jobs.items():
        trainer = Trainer(job)
        trainer.data = KeyRecorder(trainer.data, trainer.dataset)
        v = trainer.validator
        batches = v.micro_batches()
        trainer.run()
        out[name] = {
            "trained": trainer.data.seen,
            "epoch": len(trainer.dataset),
            "val_keys": [k for b in batches for k in b["key"]],
            "val_positions": [i for b in batches for i in b["position"].tolist()],
            "val_shapes": sorted({tuple(b["latent"].shape) for b in batches}),
            "same_encoders": v.encoders is trainer.encoders and v.vae is trainer.encoders.vae,
        }
    return out


def test_trainer_holds_out_the_media_tail_and_resumes_val_loss(media, tmp_path) -> None:
    """4 steps of 8 samples over a 20-sample epoch (16 training images, padded per bucket
    chunk): no held-out image is trained on; ``val/loss`` at steps 2 and 4 is the same when the
    run stops at step 2 and resumes."""
    root, path, enc = media
    jobs = {
        "full": _job(media, tmp_path / "full", 4),
        "split_a": _job(media, tmp_path / "split", 2),
        "split_b": _job(media, tmp_path / "split", 4),  # resumes at step 2
    }
    res = run_distributed(_runs, 1, jobs, timeout=300)[0]
    tail = _tail(path, enc, 4)
    full = res["full"]
    assert len(full["trained"]) == 4 * 8 > full["epoch"]  # more than one epoch
    assert not set(full["trained"]) & set(tail)
    # The validator reads exactly the tail, in order, one sample per micro-batch, in two shapes.
    assert full["val_keys"] == tail
    assert full["val_positions"] == [0, 1, 2, 3]
    assert full["val_shapes"] == [(1, 4, 8, 8), (1, 4, 8, 12)]
    assert full["same_encoders"]  # the trainer's FrozenEncoders, not a second copy
    # Resume: the same training samples and the same held-out losses.
    assert res["split_a"]["trained"] + res["split_b"]["trained"] == full["trained"]
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    for step in (2, 4):
        assert math.isfinite(a[step]["val/loss"]) and math.isfinite(a[step]["val/loss_ema"])
        assert a[step]["val/loss"] == b[step]["val/loss"]
        assert a[step]["val/loss_ema"] == b[step]["val/loss_ema"]
        assert a[step]["data/bad_samples"] == 0.0
    assert "val/loss" not in a[1] and "val/loss" not in a[3]
    assert a[4]["val/loss"] != a[2]["val/loss"]  # the model trained in between
    assert (tmp_path / "full" / "val_samples" / "step_0000004.png").is_file()


def test_validator_skips_bad_held_out_samples(tmp_path) -> None:
    """A truncated JPEG in the tail is replaced by the next held-out sample and counted once;
    the encoded held-out batches are built once per run."""
    from lumos_mcore.data.media.dataset import MediaDataset
    from lumos_mcore.data.media.shards import build_media_index
    from lumos_mcore.encoders.frozen import FrozenEncoders
    from lumos_mcore.encoders.tiny import save_tiny_encoders
    from lumos_mcore.training.validation import Validator
    from tests.data.media.helpers import jpeg, write_tar

    good = jpeg(64, 64, cls=1)
    members = [(f"good{i:02d}.jpg", jpeg(64, 64, cls=i, seed=i)) for i in range(8)]
    members += [("trunc.jpg", good[: len(good) // 2])]
    members += [(f"late{i}.jpg", jpeg(64, 64, cls=i, seed=20 + i)) for i in range(3)]
    (tmp_path / "media").mkdir()
    write_tar(tmp_path / "media" / "part-000.tar", members)
    build_media_index(tmp_path / "media")
    enc = save_tiny_encoders(tmp_path / "encoders")
    cfg = dataclasses.replace(
        _media_cfg(tmp_path / "media", enc), buckets=[[64, 64]], max_bad_fraction=0.5
    )
    job = make_job(
        None,
        tmp_path / "run",
        media=cfg,
        validation=ValidationConfig(interval=1, holdout=4, num_samples=4, grid_samples=2),
    )
    ds = MediaDataset(cfg, holdout=4)
    encoders = FrozenEncoders(cfg.encoders)
    v = Validator(
        job,
        dp_rank=0,
        dp_size=1,
        pp_size=1,
        is_last_stage=True,
        train_dataset=ds,
        device=torch.device("cpu"),
        encoders=encoders,
    )
    assert v.held_out and v.micro_batch_size == 1 and v.num_microbatches == 4
    decoded: list[str] = []
    decode = ds._decode_one
    ds._decode_one = lambda plan: decoded.append(plan["key"]) or decode(plan)
    batches = v.micro_batches()
    assert decoded == ["trunc", "late0", "late0", "late1", "late2"]
    assert [b["key"] for b in batches] == [["late0"], ["late0"], ["late1"], ["late2"]]
    assert [b["position"].tolist() for b in batches] == [[0], [1], [2], [3]]
    assert all(b["latent"].shape == (1, 4, 8, 8) and b["cond"].shape[0] == 1 for b in batches)
    assert ds.bad_counts["truncated"] == 1 and ds.num_bad == 1
    assert {ds.key(i) for i in range(len(ds))} == {f"good{i:02d}" for i in range(8)}
    again = v.micro_batches()  # cached: nothing decoded or counted again, same tensors
    assert len(decoded) == 5 and ds.num_bad == 1
    assert all((x["latent"] == y["latent"]).all() for x, y in zip(batches, again))


def test_media_holdout_errors_name_the_flags(media, tmp_path) -> None:
    from lumos_mcore.data.media.dataset import MediaDataset
    from lumos_mcore.training.validation import Validator, holdout_split

    _, path, enc = media
    job = _job(media, tmp_path / "o", 2)  # accepted: raw media with validation.holdout
    assert job.validation.holdout == 4 and job.validation.path is None
    # Raw-media validation needs a held-out set.
    with pytest.raises(
        ValueError,
        match=r"validation.interval=1: a raw-media job needs a held-out set: "
        r"validation.holdout=H .* or validation.path",
    ):
        dataclasses.replace(job, validation=ValidationConfig(interval=1))
    # num_samples / grid_samples must fit in the holdout; holdout and path exclude each other.
    with pytest.raises(ValueError, match=r"validation.num_samples=8 .* <= validation.holdout=4"):
        ValidationConfig(interval=1, holdout=4, num_samples=8)
    with pytest.raises(
        ValueError, match=r"validation.grid_samples=6: must be <= validation.holdout=4"
    ):
        ValidationConfig(interval=1, holdout=4, num_samples=4, grid_samples=6)
    from lumos_mcore.data.synthetic import write_synthetic_feature_shards

    val = write_synthetic_feature_shards(tmp_path / "val", num_samples=4, cond_dim=8)
    with pytest.raises(ValueError, match=r"validation.holdout=4 and validation.path="):
        ValidationConfig(interval=1, holdout=4, num_samples=4, path=str(val))
    # H >= the usable media samples: nothing left to train on (the trainer opens it so).
    with pytest.raises(
        ValueError, match=r"validation.holdout=20: media.path=.* has only 20 usable image"
    ):
        MediaDataset(_media_cfg(path, enc), holdout=20)
    # A media dataset opened without the job's holdout cannot be split after the fact.
    with pytest.raises(ValueError, match=r"validation.holdout=4: the media dataset .* holdout=0"):
        holdout_split(MediaDataset(_media_cfg(path, enc)), job)
    ds = MediaDataset(_media_cfg(path, enc), holdout=4)
    train, held = holdout_split(ds, job)
    assert train is ds and len(held) == 4 and len(ds) == 20  # 6 + 10 training, chunk-padded

    common = dict(pp_size=1, is_last_stage=True, train_dataset=ds, device=None)
    with pytest.raises(ValueError, match=r"validation.holdout=4: .* pass Validator\(encoders"):
        Validator(job, dp_rank=0, dp_size=1, **common)
    with pytest.raises(
        ValueError, match=r"validation.num_samples=4: must be a multiple of the data-parallel"
    ):
        Validator(job, dp_rank=0, dp_size=3, encoders=object(), vae=object(), **common)
