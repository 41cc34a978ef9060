"""Crash safety: SIGKILL a 2-rank training run (at a random step, and in the middle of a
checkpoint save), resume it, and the losses afterwards equal an uninterrupted run's.

Also: a run with megatron's distributed optimizer at DP=2 follows the DP=1 loss curve, and a
checkpoint written at TP=2 continues at PP=2.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lumos_mcore.config.loader import save_config
from lumos_mcore.config.parallel import ParallelConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, read_losses, train_in_process

STEPS = 12


def _launch(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(random.randint(20000, 40000)),
        "-m",
        "lumos_mcore.train",
        "--config",
        str(config),
        *overrides,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "run ended before the kill point"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.01)
    # Like a node failure / scheduler kill: every process of the job dies at once (torchrun's
    # workers run in their own process groups, so walk the tree rather than killpg).
    tree = psutil.Process(proc.pid)
    victims = [tree, *tree.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_data(root)
    reference = root / "reference"
    job = make_job(data, reference, steps=STEPS, parallel=ParallelConfig(tp=2))
    config = root / "job.yaml"
    save_config(job, config)
    _finish(_launch(config))
    return root, config, read_losses(reference)


def test_sigkill_at_random_step_then_resume(setup):
    root, config, ref = setup
    out = root / "killed_step"
    kill_after = random.Random(0).randint(5, 10)  # between checkpoints (saved every 4 steps)
    proc = _launch(config, f"train.output_dir={out}")
    _kill_when(proc, lambda: _steps_logged(out) >= kill_after)
    assert not (out / "checkpoints" / f"iter_{STEPS:07d}").exists()
    _finish(_launch(config, f"train.output_dir={out}"))
    got = read_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]


def test_sigkill_during_checkpoint_save_then_resume(setup):
    root, config, ref = setup
    out = root / "killed_save"
    ckpt = out / "checkpoints"
    proc = _launch(config, f"train.output_dir={out}")
    # The second save (step 8) is killed while its files are being written.
    _kill_when(proc, lambda: (ckpt / "iter_0000008.partial").exists())
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    text = _finish(_launch(config, f"train.output_dir={out}"))
    assert "resumed from" in text and "iter_0000004" in text
    assert not list(ckpt.glob("*.partial"))
    got = read_losses(out)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]


def test_distributed_optimizer_dp2_follows_dp1_and_resumes(tmp_path):
    """DP=2 with the distributed optimizer equals DP=1, also across a save + resume."""
    data = make_data(tmp_path)
    single = make_job(data, tmp_path / "dp1", steps=6)
    (ref,) = run_distributed(train_in_process, 1, single)

    def dist_opt(steps):
        return make_job(
            data,
            tmp_path / "dp2",
            steps=steps,
            parallel=ParallelConfig(use_distributed_optimizer=True),
        )

    first = [r for r in run_distributed(train_in_process, 2, dist_opt(4)) if r["losses"]]
    second = [r for r in run_distributed(train_in_process, 2, dist_opt(6)) if r["losses"]]
    assert len(first) == len(second) == 1
    got = first[0]["losses"] + second[0]["losses"]  # steps 1-4, then 5-6 after the resume
    assert len(got) == 6
    for a, b in zip(got, ref["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (got, ref["losses"])

    # The trainer logs the config's per-rank memory estimate next to the measured peak; with
    # the distributed optimizer the Adam state is split over the 2 data-parallel ranks.
    from lumos_mcore.perf.memory import estimate_job_memory

    job = dist_opt(6)
    est = estimate_job_memory(job.model, job.parallel, job.train, 2, bf16=False)
    assert est.optimizer == est.num_params * 8 // 2
    logged = [json.loads(line) for line in (tmp_path / "dp2" / "metrics.jsonl").open()]
    assert all(r["memory/estimate_gib"] == pytest.approx(est.total / 2**30) for r in logged)


def test_checkpoint_from_tp2_continues_at_pp2(setup, tmp_path):
    """Resharding on resume: the TP=2 reference checkpoint at step 12 trains on at PP=2."""
    root, config, _ = setup
    src = root / "reference" / "checkpoints" / f"iter_{STEPS:07d}"
    out = tmp_path / "pp2"
    text = _finish(
        _launch(
            config,
            f"train.output_dir={out}",
            f"checkpoint.load={src}",
            "parallel.tp=1",
            "parallel.pp=2",
            f"train.steps={STEPS + 2}",
        )
    )
    assert f"at step {STEPS}" in text
    assert sorted(read_losses(out)) == [STEPS + 1, STEPS + 2]
