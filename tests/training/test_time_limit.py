"""``train.max_minutes``: a run whose next step would end past its wall-clock budget stops
with a checkpoint on every rank, like a pre-emption signal, and resumes from it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, TrainConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, read_metrics, train_in_process


def _job(data, out, max_minutes):
    base = make_job(data, out, steps=6)
    return make_job(
        data,
        out,
        steps=6,
        train=replace(base.train, max_minutes=max_minutes),
        checkpoint=CheckpointConfig(save_interval=100),  # only the stop and the end save
        parallel=ParallelConfig(),
    )


def test_out_of_time_run_checkpoints_on_every_rank_and_resumes(tmp_path):
    data = make_data(tmp_path)
    out = tmp_path / "run"
    # 6 ms: no step fits, so the first one ends the run (the budget counts set-up as well)
    stopped = run_distributed(train_in_process, 2, _job(data, out, 1e-4))
    assert [r["step"] for r in stopped] == [1, 1]
    assert all(r["checkpoint"].endswith("iter_0000001") for r in stopped)
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    # a budget the remaining steps fit in: resumes at step 1 and trains to the end
    resumed = run_distributed(train_in_process, 2, _job(data, out, 60.0))
    assert [r["step"] for r in resumed] == [6, 6]
    assert sorted(read_metrics(out)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("minutes", [0.0, -5.0])
def test_a_budget_that_is_not_positive_is_refused(minutes):
    with pytest.raises(ValueError, match=rf"train\.max_minutes={minutes}"):
        TrainConfig(max_minutes=minutes)
