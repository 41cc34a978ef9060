"""What a run reports matches what it runs: feature latents of another size than the config
are refused (tokens/s and MFU would be counted for the wrong size), packs are credited their
full cross-attention FLOPs, and a resumed run's metrics.jsonl holds each step once."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lumos_mcore.config.train import CheckpointConfig
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job
from tests.training.test_packed_training import SHAPES, _packed_job


def _build(rank: int, world: int, job) -> str:
    from lumos_mcore.training.loop import Trainer

    try:
        Trainer(job)
    except ValueError as err:
        return str(err)
    return "built"


def test_latents_of_another_size_than_the_model_are_refused(tmp_path):
    data = make_data(tmp_path, num_samples=16, latent_size=16)  # the model says 8
    job = make_job(data, tmp_path / "run", steps=1)
    (msg,) = run_distributed(_build, 1, job, timeout=200)
    assert "latents are 16 x 16 but model.latent_size=8" in msg
    assert "set model.latent_size=16" in msg


def _pack_flops(rank: int, world: int, job) -> dict:
    from lumos_mcore.perf.flops import DiTShape, count_flops
    from lumos_mcore.training.loop import Trainer

    trainer = Trainer(job)
    tokens, model, _ = trainer.step_work(0)
    want = 0.0
    m = job.model
    for size in trainer._packed.step_sample_sizes(0):
        f = count_flops(DiTShape.from_model_config(m), size[0], recompute=m.recompute)
        want += f.model_train
    trainer.data.close()
    return {"model": model, "want": want, "tokens": tokens}


def test_packs_are_credited_their_full_cross_attention(tmp_path):
    data = write_synthetic_feature_shards(
        tmp_path / "data", num_samples=16, shapes=SHAPES, cond_tokens=1, cond_dim=32, seed=0
    )
    (res,) = run_distributed(_pack_flops, 1, _packed_job(data, tmp_path / "o", 1), timeout=200)
    assert res["tokens"] > 0
    assert res["model"] == pytest.approx(res["want"], rel=1e-12)


def _train(rank: int, world: int, job) -> None:
    from lumos_mcore.training.loop import Trainer

    Trainer(job).run()


def test_resumed_run_logs_each_step_once(tmp_path):
    data = make_data(tmp_path)
    out = tmp_path / "run"
    job = make_job(data, out, steps=4, checkpoint=CheckpointConfig(save_interval=2))
    run_distributed(_train, 1, job, timeout=200)
    # As if killed after step 4 was logged but before its checkpoint: resume from step 2.
    (out / "checkpoints" / "iter_0000004").rename(out / "checkpoints" / "moved")
    (out / "checkpoints" / "latest").write_text("iter_0000002\n")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a record cut by the kill
    run_distributed(_train, 1, dataclasses.replace(job), timeout=200)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
