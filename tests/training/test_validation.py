"""Periodic validation (held-out loss with fixed noise, sample grid) and MFU in the training
TensorBoard: deterministic across runs and resumes, equal to a hand-computed forward-only loss,
read back from the event files, and the same at TP=2 as at TP=1."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, TrainConfig, ValidationConfig
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from lumos_mcore.training.validation import Validator
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job


def _records(out: Path) -> dict[int, dict]:
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        recs[rec["step"]] = rec
    return recs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    val = write_synthetic_feature_shards(
        root / "held_out",
        num_samples=16,
        latent_size=8,
        cond_tokens=1,
        cond_dim=32,
        samples_per_shard=8,
        seed=7,
    )
    return make_data(root), val, root


def _job(data, val, out, steps, *, interval=2, tb=True, **sections):
    base = make_job(data, out, steps=steps, checkpoint=CheckpointConfig(save_interval=2))
    train = dataclasses.replace(base.train, tensorboard=tb)
    validation = ValidationConfig(
        interval=interval, path=str(val), num_samples=8, grid_samples=2, grid_steps=2
    )
    return make_job(
        data,
        out,
        steps=steps,
        train=train,
        validation=validation,
        checkpoint=CheckpointConfig(save_interval=2),
        **sections,
    )


def _single_rank_runs(rank: int, world: int, jobs: dict, manual_job) -> dict:
    """Several trainings in one process (one spawn: start-up dominates these tiny runs), then
    the trainer's validation at step 0 vs the forward-only loss computed here by hand."""
    import torch

    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.step import DiffusionForwardStep

    for job in jobs.values():
        Trainer(job).run()
    trainer = Trainer(manual_job)
    got = trainer.validate()
    step = DiffusionForwardStep(
        build_objective(manual_job.diffusion),
        seed=manual_job.validation.seed,
        cond_dropout=0.0,
        device=torch.device("cpu"),
    )
    losses = []
    with torch.no_grad():
        for batch in trainer.validator.micro_batches():
            output, loss_func = step(iter([batch]), trainer.chunks[0])  # [B, s, p*p*C_out]
            loss, _ = loss_func(output)
            losses.append(float(loss))
    return {"got": got, "manual": sum(losses) / len(losses)}


@pytest.fixture(scope="module")
def runs(data):
    train_data, val, root = data
    off = _job(train_data, val, root / "off", 4, interval=0, tb=False)
    off = dataclasses.replace(off, train=dataclasses.replace(off.train, peak_tflops=0.5))
    jobs = {
        "full": _job(train_data, val, root / "full", 4),
        "split_a": _job(train_data, val, root / "split", 2),
        "split_b": _job(train_data, val, root / "split", 4),  # resumes at step 2
        "off": off,
    }
    manual = _job(train_data, val, root / "manual", 2, tb=False)
    (res,) = run_distributed(_single_rank_runs, 1, jobs, manual, timeout=300)
    return jobs, res


def test_val_loss_repeatable_across_runs_and_resume_and_logged(data, runs):
    _, _, root = data
    full = root / "full"
    a, b, c = _records(full), _records(root / "split"), _records(root / "off")
    for step in (2, 4):
        assert math.isfinite(a[step]["val/loss"])
        assert a[step]["val/loss"] == b[step]["val/loss"]
        assert a[step]["val/loss_ema"] == b[step]["val/loss_ema"]
    assert "val/loss" not in a[1] and "val/loss" not in a[3]
    assert a[4]["val/loss_ema"] != a[4]["val/loss"]  # the EMA weights are really swapped in
    # Validation leaves the training stream alone.
    assert [a[s]["train/loss"] for s in range(1, 5)] == [c[s]["train/loss"] for s in range(1, 5)]
    assert (full / "val_samples" / "step_0000004.png").is_file()

    # TensorBoard: scalars and the sample grid read back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("val/loss", "val/loss_ema", "throughput/mfu", "throughput/tflops_per_s"):
        assert tag in tags["scalars"], tag
    assert "val/samples" in tags["images"]
    vals = {e.step: e.value for e in acc.Scalars("val/loss")}
    assert sorted(vals) == [2, 4]
    assert vals[4] == pytest.approx(a[4]["val/loss"], rel=1e-6)
    img = acc.Images("val/samples")[-1]
    assert img.step == 4 and img.width > 0 and img.height > 0


def test_mfu_equals_flops_over_time_over_peak(data, runs):
    """The logged MFU is the analytic model FLOPs of the step over its time and the peak
    (one condition token: the cross-attention as executed, see perf/flops.py)."""
    from lumos_mcore.perf.flops import DiTShape, count_flops

    jobs, _ = runs
    job = jobs["off"]
    m = job.model
    shape = DiTShape.from_model_config(m)
    one_token = m.cond_tokens == 1
    per_sample = count_flops(shape, m.num_tokens, single_token_cross=one_token).model_train
    recs = _records(Path(job.train.output_dir))
    assert sorted(recs) == [1, 2, 3, 4]
    for rec in recs.values():
        seconds = rec["throughput/step_time_ms"] / 1e3
        tflops = per_sample * job.train.global_batch_size / seconds / 1e12
        assert rec["throughput/tflops_per_s"] == pytest.approx(tflops, rel=1e-9)
        assert rec["throughput/peak_tflops_per_rank"] == 0.5
        assert rec["throughput/mfu"] == pytest.approx(tflops / 0.5, rel=1e-9)
        assert rec["throughput/hfu"] == pytest.approx(rec["throughput/mfu"], rel=1e-9)


def test_val_loss_equals_manual_forward_only_loss(runs):
    _, res = runs
    assert res["got"]["val/loss"] == pytest.approx(res["manual"], rel=1e-6)
    assert res["got"]["val/loss_ema"] == pytest.approx(res["manual"], rel=1e-6)  # EMA = weights


def _train_many(rank: int, world: int, jobs: list) -> None:
    from lumos_mcore.training.loop import Trainer

    for job in jobs:
        Trainer(job).run()


def test_val_at_tp2_and_pp2_equals_tp1(data, runs):
    """TP=2 samples the grid with both ranks; PP=2 runs the held-out loss through the pipeline
    schedule and skips the grid."""
    train_data, val, root = data
    tp2, pp2 = root / "tp2", root / "pp2"
    jobs = [
        _job(train_data, val, tp2, 2, interval=1, tb=False, parallel=ParallelConfig(tp=2)),
        _job(train_data, val, pp2, 2, interval=1, tb=False, parallel=ParallelConfig(pp=2)),
    ]
    run_distributed(_train_many, 2, jobs, timeout=300)
    # Step 1 trains at lr 0 (warm-up from 0): the weights are still the initial ones, so the
    # held-out loss must equal the single-process one at step 0 whatever the layout.
    _, res = runs
    initial = res["got"]["val/loss"]
    assert _records(tp2)[1]["val/loss"] == pytest.approx(initial, rel=1e-5)
    assert _records(pp2)[1]["val/loss"] == pytest.approx(initial, rel=1e-5)
    assert _records(tp2)[2]["val/loss"] == pytest.approx(
        _records(root / "full")[2]["val/loss"], rel=1e-4
    )
    assert (tp2 / "val_samples" / "step_0000002.png").is_file()
    assert not (pp2 / "val_samples").exists()


def test_validation_config_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"validation.interval=-1"):
        ValidationConfig(interval=-1)
    with pytest.raises(ValueError, match=r"validation.path=.*index.json"):
        ValidationConfig(interval=5, path=str(tmp_path))
    with pytest.raises(ValueError, match=r"validation.grid_sampler='heun'"):
        ValidationConfig(grid_sampler="heun")
    with pytest.raises(ValueError, match=r"train.peak_tflops=0"):
        TrainConfig(peak_tflops=0)
    data = make_data(tmp_path)
    with pytest.raises(ValueError, match=r"validation.grid_sampler='euler' does not fit"):
        make_job(
            data, tmp_path / "o", validation=ValidationConfig(interval=1, grid_sampler="euler")
        )
    # megatron's interleaved schedule needs whole groups of pp micro-batches: refused when the
    # validator is built, not at the first validation hours into the run.
    job = make_job(
        data, tmp_path / "v", validation=ValidationConfig(interval=1, num_samples=4, path=str(data))
    )
    job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, pp=2, vpp=2))
    common = dict(dp_rank=0, dp_size=1, is_last_stage=True, device=torch.device("cpu"))
    common["train_dataset"] = None
    with pytest.raises(ValueError, match=r"validation.num_samples=4: .*parallel.vpp=2.*pp=2"):
        Validator(job, pp_size=2, **common)
    Validator(job, pp_size=1, **common)  # a plain pipeline takes any micro-batch count


# ---- validation.holdout: a held-out tail of data.path ----


class _Recorder:
    """Stands in for the trainer's data iterator and records the sample ids it yields."""

    def __init__(self, batches) -> None:
        self.batches, self.seen = batches, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.seen += batch["index"].tolist()
        return batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


def _holdout_runs(rank: int, world: int, jobs: dict) -> dict:
    from lumos_mcore.data.features import FeatureDataset
    from lumos_mcore.training.loop import Trainer

    out = {}
    for name, job in jobs.items():
        trainer = Trainer(job)
        trainer.data = _Recorder(trainer.data)
        v = trainer.validator
        val_ids = [i for b in v.micro_batches() for i in b["index"].tolist()]
        val_positions = [i for b in v.micro_batches() for i in b["position"].tolist()]
        trainer.run()
        full = FeatureDataset(job.data)
        out[name] = {
            "trained": trainer.data.seen,
            "val_ids": val_ids,
            "val_positions": val_positions,
            "val_keys": [v.dataset.key(i) for i in range(len(v.dataset))],
            "tail_keys": [full.key(i) for i in range(len(full) - 16, len(full))],
            "val_len": len(v.dataset),
            "held_out": v.held_out,
            "n": len(full),
        }
    return out


def test_holdout_tail_is_never_trained_and_is_the_validation_set(tmp_path):
    """64 samples, ``validation.holdout=16``: 7 steps of 8 (56 > one epoch of 48) train only on
    samples 0..47, every one of them in the first epoch; the validator reads exactly 48..63;
    a run resumed at step 4 trains on the same samples as the uninterrupted one."""
    data = make_data(tmp_path)  # 64 samples
    validation = ValidationConfig(
        interval=2, holdout=16, num_samples=16, grid_samples=2, grid_steps=2
    )

    def job(out, steps):
        return make_job(
            data,
            tmp_path / out,
            steps=steps,
            validation=validation,
            checkpoint=CheckpointConfig(save_interval=4),
        )

    jobs = {"full": job("full", 7), "split_a": job("split", 4), "split_b": job("split", 7)}
    res = run_distributed(_holdout_runs, 1, jobs, timeout=300)[0]
    full = res["full"]
    assert full["n"] == 64 and full["held_out"] and full["val_len"] == 16
    trained = full["trained"]
    assert len(trained) == 7 * 8
    assert max(trained) < 48  # no held-out sample over more than one epoch
    assert sorted(trained[:48]) == list(range(48))  # epoch 0 is exactly the 48 training samples
    assert set(trained[48:]) <= set(range(48))
    # The validator's samples are the tail of data.path, in order.
    assert full["val_ids"] == list(range(48, 64))
    assert full["val_keys"] == full["tail_keys"]
    assert full["val_positions"] == list(range(16))
    # Resume: steps 1-4 then 5-7 see the uninterrupted run's samples.
    assert res["split_a"]["trained"] + res["split_b"]["trained"] == trained
    recs, split = _records(tmp_path / "full"), _records(tmp_path / "split")
    for step in (2, 4, 6):
        assert math.isfinite(recs[step]["val/loss"])
        assert recs[step]["val/loss"] == split[step]["val/loss"]


def test_holdout_config_errors_name_the_flags(tmp_path):
    from lumos_mcore.data.features import FeatureDataset
    from lumos_mcore.training.validation import holdout_split
    from tests.training.helpers import make_media_job

    with pytest.raises(ValueError, match=r"validation.holdout=-1: must be >= 0"):
        ValidationConfig(holdout=-1)
    with pytest.raises(
        ValueError, match=r"validation.num_samples=32 .* must be <= validation.holdout=8"
    ):
        ValidationConfig(holdout=8)
    with pytest.raises(
        ValueError, match=r"validation.grid_samples=12: must be <= validation.holdout=8"
    ):
        ValidationConfig(holdout=8, num_samples=8, grid_samples=12)
    val = write_synthetic_feature_shards(
        tmp_path / "val", num_samples=4, latent_size=8, cond_tokens=1, cond_dim=32
    )
    with pytest.raises(ValueError, match=r"validation.holdout=8 and validation.path="):
        ValidationConfig(holdout=8, num_samples=8, path=str(val))

    data = make_data(tmp_path, num_samples=16)
    ds = FeatureDataset(DataConfig(path=str(data), num_workers=0))
    for holdout in (16, 20):  # refused up front: nothing left to train on
        v = ValidationConfig(interval=1, holdout=holdout, num_samples=8, grid_samples=2)
        job = make_job(data, tmp_path / "o", validation=v)
        with pytest.raises(
            ValueError, match=rf"validation.holdout={holdout}: data.path=.* has only 16 samples"
        ):
            holdout_split(ds, job)
    v = ValidationConfig(interval=1, holdout=4, num_samples=4, grid_samples=2)
    head, tail = holdout_split(ds, make_job(data, tmp_path / "o", validation=v))
    assert (len(head), len(tail), tail.start) == (12, 4, 12)
    # No holdout (or a separate path): training reads the whole dataset.
    assert holdout_split(ds, make_job(data, tmp_path / "o")) == (ds, None)

    # Raw-media jobs hold out a tail of their media (tests/training/test_media_holdout.py);
    # validating them on training media is refused when the job is loaded.
    media_job = make_media_job(tmp_path / "m")
    v = ValidationConfig(interval=1, holdout=4, num_samples=4, grid_samples=2)
    assert dataclasses.replace(media_job, validation=v).validation.holdout == 4
    with pytest.raises(
        ValueError, match=r"validation.interval=1: a raw-media job needs a held-out set"
    ):
        dataclasses.replace(media_job, validation=ValidationConfig(interval=1))
