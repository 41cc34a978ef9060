"""The step profiler: a bounded window of steps traced on the listed ranks only, written as a
Chrome trace with the loop's phase labels plus an op summary; bad profile settings refused."""

from __future__ import annotations

import json

import pytest

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.loader import ConfigError, load_config
from lumos_mcore.config.profile import ProfileConfig
from lumos_mcore.config.train import CheckpointConfig
from lumos_mcore.training.profiling import StepProfiler, phase
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(start_step=0), "profile.start_step=0"),
        (dict(num_steps=0), "profile.num_steps=0"),
        (dict(ranks=[]), r"profile.ranks=\[\]"),
        (dict(ranks=[-1]), r"profile.ranks=\[-1\]"),
        (dict(backend="ncu"), "profile.backend='ncu'"),
    ],
)
def test_bad_profile_settings_name_the_flag(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ProfileConfig(enabled=True, **kwargs)


def test_a_window_after_the_last_step_is_refused(tmp_path):
    data = make_data(tmp_path, num_samples=16)
    with pytest.raises(ValueError, match="profile.start_step=9: the run ends at train.steps=4"):
        make_job(data, tmp_path, steps=4, profile=ProfileConfig(enabled=True, start_step=9))
    # disabled, the same numbers are only defaults and pass
    make_job(data, tmp_path, steps=4, profile=ProfileConfig(start_step=9))


def test_profile_overrides_parse_from_the_command_line(tmp_path):
    data = make_data(tmp_path, num_samples=16)
    job = load_config(
        JobConfig,
        None,
        [
            f"data.path={data}",
            "train.steps=10",
            "profile.enabled=true",
            "profile.start_step=3",
            "profile.ranks=[0,2]",
            "profile.memory=true",
        ],
    )
    assert job.profile.ranks == [0, 2] and job.profile.last_step == 4 and job.profile.memory
    with pytest.raises(ConfigError, match="profile.num_steps"):
        load_config(JobConfig, None, [f"data.path={data}", "profile.num_steps=two"])


def test_ranks_outside_the_world_and_nsys_without_cuda_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"rank\(s\) \[4\] do not exist in a world of 2"):
        StepProfiler(ProfileConfig(enabled=True, ranks=[0, 4]), 0, 2, tmp_path)
    StepProfiler(ProfileConfig(enabled=False, ranks=[0, 4]), 0, 2, tmp_path)  # off: not checked
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="profile.backend=nsys needs CUDA"):
            StepProfiler(ProfileConfig(enabled=True, backend="nsys"), 0, 1, tmp_path)


def _fake_steps(prof: StepProfiler, steps: range) -> None:
    import torch

    for step in steps:
        prof.before_step(step)
        with phase("forward_backward"):
            torch.ones(8, 8) @ torch.ones(8, 8)
        prof.after_step(step)


def _events(trace) -> list[str]:
    return [e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]]


def test_window_opens_and_closes_at_the_configured_steps(tmp_path):
    prof = StepProfiler(ProfileConfig(enabled=True, start_step=3, num_steps=2), 0, 1, tmp_path)
    _fake_steps(prof, range(1, 3))
    assert not prof.recording and prof.written == []
    _fake_steps(prof, range(3, 4))
    assert prof.recording
    _fake_steps(prof, range(4, 8))
    assert not prof.recording
    trace, ops = prof.written
    assert trace.name == "rank0_steps3-4.pt.trace.json" and ops.name == "rank0_steps3-4_ops.txt"
    names = _events(trace)
    assert names.count("lumos/forward_backward") == 2  # steps 3 and 4, not 1-2 or 5-7
    assert "aten::mm" in ops.read_text()


def test_a_run_ending_inside_the_window_still_writes_it(tmp_path):
    prof = StepProfiler(ProfileConfig(enabled=True, start_step=2, num_steps=5), 0, 1, tmp_path)
    _fake_steps(prof, range(1, 4))
    prof.close()
    (trace, _) = prof.written
    assert trace.name == "rank0_steps2-3.pt.trace.json"
    assert _events(trace).count("lumos/forward_backward") == 2


def test_a_resume_inside_the_window_records_its_rest_and_past_it_nothing(tmp_path):
    cfg = ProfileConfig(enabled=True, start_step=2, num_steps=3)
    inside = StepProfiler(cfg, 0, 1, tmp_path / "a")
    _fake_steps(inside, range(3, 6))
    assert inside.written[0].name == "rank0_steps3-4.pt.trace.json"
    past = StepProfiler(cfg, 0, 1, tmp_path / "b")
    _fake_steps(past, range(6, 9))
    past.close()
    assert past.written == [] and not (tmp_path / "b" / "profile").exists()


def _train(rank: int, world: int, job) -> list[str]:
    from lumos_mcore.training.loop import Trainer

    trainer = Trainer(job)
    trainer.run()
    return [p.name for p in trainer.profiler.written]


def test_training_run_traces_its_phases_on_the_listed_rank_only(tmp_path):
    data = make_data(tmp_path, num_samples=32)
    out = tmp_path / "run"
    job = make_job(
        data,
        out,
        steps=4,
        checkpoint=CheckpointConfig(save_interval=3),
        profile=ProfileConfig(enabled=True, start_step=2, num_steps=2, ranks=[1]),
    )
    written = run_distributed(_train, 2, job, timeout=400)
    assert written[0] == []
    assert written[1] == ["rank1_steps2-3.pt.trace.json", "rank1_steps2-3_ops.txt"]
    files = sorted(p.name for p in (out / "profile").iterdir())
    assert files == ["rank1_steps2-3.pt.trace.json", "rank1_steps2-3_ops.txt"]
    names = _events(out / "profile" / files[0])
    assert names.count("lumos/forward_backward") == 2
    assert names.count("lumos/nonfinite_check") == 2
    assert names.count("lumos/optimizer_step") == 2
    assert names.count("lumos/ema") == 2
    assert names.count("lumos/checkpoint") == 1  # step 3 saves, step 4 is outside the window
    assert any(n.startswith("aten::") for n in names)
