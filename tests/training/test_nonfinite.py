"""A step with a NaN / Inf loss or gradient: every rank agrees, nothing of it is applied, and the
run either skips it (``train.nonfinite_skips``) or stops with a checkpoint of the last good state.

The NaN is injected into the real loss of one rank (the model output is multiplied by NaN
inside ``loss_func``), so it travels through megatron's backward, DDP / distributed-optimizer
reduction and pipeline p2p exactly as a diverged step would.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import TrainConfig
from lumos_mcore.training.nonfinite import (
    NonFiniteError,
    NonFiniteGuard,
    NonFiniteReport,
    grads_finite,
)
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, read_metrics

CPU = torch.device("cpu")


# -- in-process units ----------------------------------------------------------------------
def _module_with_grads(value: float | None = None, main_grad: bool = False) -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in m.parameters():
        g = torch.ones_like(p)
        if value is not None and p.dim() == 2 and p.shape[0] == 2:
            g[1, 0] = value
        if main_grad:
            p.main_grad = g
        else:
            p.grad = g
    return m


@pytest.mark.parametrize("main_grad", [False, True])
def test_grads_finite_flags_nan_and_inf_in_any_parameter(main_grad):
    assert bool(grads_finite([_module_with_grads(main_grad=main_grad)], CPU))
    for bad in (float("nan"), float("inf"), float("-inf")):
        chunks = [_module_with_grads(), _module_with_grads(bad, main_grad=main_grad)]
        assert not bool(grads_finite(chunks, CPU)), bad


def test_grads_finite_reads_megatron_grad_buffers():
    class Buffer:
        def __init__(self, data):
            self.grad_data = data

    chunk = nn.Linear(2, 2)  # its own .grad is None: the buffers are what counts
    chunk.buffers = [Buffer(torch.zeros(8))]
    chunk.expert_parallel_buffers = [Buffer(torch.zeros(4))]
    assert bool(grads_finite([chunk], CPU))
    chunk.expert_parallel_buffers[0].grad_data[3] = float("nan")
    assert not bool(grads_finite([chunk], CPU))


def test_guard_skips_up_to_the_limit_then_stops_and_resets_on_a_good_step():
    good, bad = NonFiniteReport((), ()), NonFiniteReport((1,), (0, 1))
    guard = NonFiniteGuard(max_skips=2)
    assert guard.skip(1, bad) and guard.skip(2, bad)
    assert not guard.skip(3, good) and guard.consecutive == 0  # a good step resets the run
    assert guard.skip(4, bad) and guard.skip(5, bad)
    with pytest.raises(NonFiniteError) as err:
        guard.skip(6, bad)
    text = str(err.value)
    assert "step 6" in text and "loss is not finite on rank 1" in text
    assert "gradients are not finite on ranks 0, 1" in text
    assert "2 consecutive skipped steps (train.nonfinite_skips=2)" in text
    assert guard.total == 4


def test_guard_without_skips_stops_at_the_first_bad_step():
    with pytest.raises(NonFiniteError, match=r"step 1: gradients .*train\.nonfinite_skips=N"):
        NonFiniteGuard(max_skips=0).skip(1, NonFiniteReport((), (3,)))


def test_negative_skip_budget_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"train\.nonfinite_skips=-1"):
        TrainConfig(nonfinite_skips=-1)


# -- training runs on gloo ranks -----------------------------------------------------------
def _params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for c in trainer.chunks for p in c.parameters()])


def _ema(trainer) -> torch.Tensor:
    return torch.cat([t.flatten() for shadow in trainer.ema.shadow for t in shadow.values()])


def _train_with_nan(rank, world, job, bad_steps, bad_rank):
    """Train ``job``; ``bad_rank``'s loss is NaN in ``bad_steps`` (1-based). Returns the
    weights / EMA after each step run here and the error that stopped the run, if any."""
    from lumos_mcore.training.loop import Trainer

    trainer = Trainer(job)
    loss_func = trainer.forward_step.loss_func

    def poisoned(output, *, prep):
        if rank == bad_rank and trainer.step + 1 in bad_steps:
            output = output * float("nan")
        return loss_func(output, prep=prep)

    trainer.forward_step.loss_func = poisoned
    after = {trainer.step: (_params(trainer), _ema(trainer))}
    train_step = trainer.train_step

    def recorded(batches):
        m = train_step(batches)
        after[trainer.step + 1] = (_params(trainer), _ema(trainer))
        return m

    trainer.train_step = recorded
    try:
        trainer.run()
        error = None
    except NonFiniteError as err:
        error = str(err)
    return {"after": after, "error": error, "skipped": trainer.nonfinite.total}


def _state(ckpt) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt))["train_state"]


def test_nonfinite_step_stops_with_last_good_checkpoint_then_resume_skips_it(tmp_path):
    """DP=2 with the distributed optimizer; rank 1's loss is NaN at step 3. The run stops on
    every rank naming step 3 and rank 1 and writes step 2 (save_interval is 4); resumed with
    a skip budget, step 3 applies nothing (weights and EMA stay those of step 2) and training
    goes on from step 4 with the skip counted in metrics and checkpoints."""
    data = make_data(tmp_path)
    parallel = ParallelConfig(use_distributed_optimizer=True)
    job = make_job(data, tmp_path / "run", steps=6, parallel=parallel)
    first = run_distributed(_train_with_nan, 2, job, {3}, 1)
    for r in first:
        assert r["error"] is not None and "step 3:" in r["error"]
        assert "loss is not finite on rank 1" in r["error"]
        assert "gradients are not finite on ranks 0, 1" in r["error"]
        assert "The last good state (step 2) is in" in r["error"]
        assert sorted(r["after"]) == [0, 1, 2]  # step 3 raised before recording
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip().endswith("2")
    assert _state(ckpts / "iter_0000002")["step"] == 2

    job = make_job(
        data,
        tmp_path / "run",
        steps=6,
        parallel=parallel,
        train=replace(job.train, nonfinite_skips=1),
    )
    second = run_distributed(_train_with_nan, 2, job, {3}, 1)
    for r, before in zip(second, first):
        assert r["error"] is None and r["skipped"] == 1
        assert sorted(r["after"]) == [2, 3, 4, 5, 6]
        for k in (0, 1):  # weights, EMA
            assert torch.equal(r["after"][2][k], before["after"][2][k])  # resumed exactly
            assert torch.equal(r["after"][3][k], r["after"][2][k])  # step 3 applied nothing
            assert not torch.equal(r["after"][4][k], r["after"][3][k])  # step 4 trained
        assert torch.isfinite(r["after"][6][0]).all()
    metrics = read_metrics(tmp_path / "run")
    assert metrics[3]["train/update_ok"] == 0.0 and metrics[3]["train/skipped_steps"] == 1.0
    # metrics.jsonl stays strict JSON: the skipped step's loss and grad norm are null
    assert metrics[3]["train/loss"] is None and metrics[3]["train/grad_norm"] is None
    assert metrics[4]["train/update_ok"] == 1.0 and math.isfinite(metrics[6]["train/loss"])
    assert _state(ckpts / "iter_0000006")["nonfinite_skipped"] == 1


def test_pipeline_run_stops_after_its_skip_budget(tmp_path):
    """PP=2: the loss lives on the last stage only, the NaN reaches the first stage's
    gradients through the pipeline's backward p2p. With two skips allowed, steps 3 and 4 are
    skipped, step 5 stops the run and the checkpoint of step 4 records both skips."""
    data = make_data(tmp_path)
    job = make_job(data, tmp_path / "pp", steps=8, parallel=ParallelConfig(pp=2))
    job = make_job(
        data,
        tmp_path / "pp",
        steps=8,
        parallel=ParallelConfig(pp=2),
        train=replace(job.train, nonfinite_skips=2),
    )
    runs = run_distributed(_train_with_nan, 2, job, {3, 4, 5, 6}, 1)
    for r in runs:
        assert "step 5:" in r["error"] and "after 2 consecutive skipped steps" in r["error"]
        assert "loss is not finite on rank 1" in r["error"]  # the last stage
        assert "gradients are not finite on ranks 0, 1" in r["error"]
        assert torch.equal(r["after"][4][0], r["after"][2][0])
        assert r["skipped"] == 2
    ckpt = tmp_path / "pp" / "checkpoints" / "iter_0000004"
    assert _state(ckpt)["nonfinite_skipped"] == 2 and _state(ckpt)["step"] == 4
