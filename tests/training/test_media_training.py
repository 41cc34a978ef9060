"""The trainer on raw media: JPEG shards -> DALI/PyAV decode -> frozen VAE + DINO -> LumosDiT.

Two TP ranks read the same samples; only one encodes and broadcasts, so both must see the same
latents (a mismatch would make the TP ranks' losses differ and the run diverge).
"""

from __future__ import annotations

import json
import math

from tests.dist_utils import run_distributed
from tests.training.helpers import make_media_job, train_in_process


def test_trainer_on_raw_media_tp2(tmp_path):
    job = make_media_job(tmp_path)
    results = run_distributed(train_in_process, 2, job, timeout=300)
    losses = [r for r in results if r["losses"]][0]["losses"]
    assert len(losses) == job.train.steps and all(math.isfinite(x) for x in losses)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "data/stall_fraction" in metrics[-1]
    assert metrics[-1]["data/bad_samples"] == 0.0
