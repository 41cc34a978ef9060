"""The trainer on raw media: JPEG shards -> DALI/PyAV decode -> frozen VAE + DINO -> LumosDiT.

Two TP ranks read the same samples; only one encodes and broadcasts, so both must see the same
latents (a mismatch would make the TP ranks' losses differ and the run diverge).
"""

from __future__ import annotations

import json
import math

import pytest

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import assert_logged_losses_equal, make_media_job, train_in_process


def test_trainer_on_raw_media_tp2(tmp_path):
    job = make_media_job(tmp_path)
    results = run_distributed(train_in_process, 2, job, timeout=300)
    losses = [r for r in results if r["losses"]][0]["losses"]
    assert len(losses) == job.train.steps and all(math.isfinite(x) for x in losses)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "data/stall_fraction" in metrics[-1]
    assert metrics[-1]["data/bad_samples"] == 0.0
    # The logged memory estimate counts the frozen encoders (weights + encode working set).
    from lumos_mcore.perf.memory import estimate_job_memory

    args = (job.model, job.parallel, job.train, 2)
    with_encoders = estimate_job_memory(*args, bf16=False, media=job.media)
    assert with_encoders.encoders > 0 and with_encoders.encode_working > 0
    assert metrics[-1]["memory/estimate_gib"] == pytest.approx(with_encoders.total / 2**30)
    assert with_encoders.total > estimate_job_memory(*args, bf16=False).total


def _pipeline_equals_one_rank(tmp_path, **parallel) -> None:
    """Raw media through a 2-stage pipeline give one rank's per-step losses. The replica's
    encode-and-broadcast spans both stages, so the trainer reads each step's micro-batches
    before megatron's schedule starts its p2p traffic (else the stages deadlock)."""
    steps = 2
    ref_job = make_media_job(tmp_path / "one", steps=steps)
    ref_job.model = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_channels=32, depth=4)
    ref_job.train.micro_batch_size = 2  # 4 micro-batches per step: 1F1B warm-up and steady state
    ref_job.parallel = ParallelConfig()
    ref_job.__post_init__()
    (ref,) = run_distributed(train_in_process, 1, ref_job, timeout=300)
    job = make_media_job(tmp_path / "two", steps=steps)
    job.model, job.train.micro_batch_size = ref_job.model, 2
    job.parallel = ParallelConfig(**parallel)
    job.__post_init__()
    results = run_distributed(train_in_process, 2, job, timeout=300)
    assert_logged_losses_equal([r["losses"] for r in results], ref["losses"], steps)


def test_trainer_on_raw_media_pp2_equals_one_rank(tmp_path):
    _pipeline_equals_one_rank(tmp_path, pp=2)


def test_trainer_on_raw_media_interleaved_pp2_equals_one_rank(tmp_path):
    """Interleaved schedule (vpp=2: 4 chunks of one layer): every chunk sees each batch."""
    _pipeline_equals_one_rank(tmp_path, pp=2, vpp=2)
