"""Which checkpoints a run keeps: the newest ``checkpoint.keep_last`` plus the milestones every
``checkpoint.keep_every`` steps, which pruning never deletes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumos_mcore.config.train import CheckpointConfig
from lumos_mcore.training.checkpoint import Checkpointer
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, train_in_process


def _folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_prune_keeps_the_newest_and_the_milestones(tmp_path):
    for step in range(2, 22, 2):
        (tmp_path / f"iter_{step:07d}").mkdir()
    (tmp_path / "iter_0000003.partial").mkdir()  # an unfinished save is not pruning's business
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_every=8)
    ckpt._prune(keep=tmp_path / "iter_0000020")
    assert _folders(tmp_path) == [
        "iter_0000003.partial",
        "iter_0000008",
        "iter_0000016",
        "iter_0000018",
        "iter_0000020",
    ]


def test_without_milestones_only_the_newest_remain(tmp_path):
    for step in (4, 8, 12):
        (tmp_path / f"iter_{step:07d}").mkdir()
    Checkpointer(tmp_path, keep_last=1)._prune(keep=tmp_path / "iter_0000012")
    assert _folders(tmp_path) == ["iter_0000012"]


@pytest.mark.parametrize("keep_every", [-4, 3])
def test_a_milestone_no_save_lands_on_is_refused(keep_every):
    with pytest.raises(ValueError, match=rf"checkpoint\.keep_every={keep_every}.*save_interval=2"):
        CheckpointConfig(save_interval=2, keep_every=keep_every)


def test_a_run_keeps_its_milestones_and_resumes_from_the_newest(tmp_path):
    data = make_data(tmp_path)
    ckpt = CheckpointConfig(save_interval=2, keep_last=1, keep_every=4)
    (first,) = run_distributed(
        train_in_process, 1, make_job(data, tmp_path / "run", steps=10, checkpoint=ckpt)
    )
    root = tmp_path / "run" / "checkpoints"
    assert _folders(root) == ["iter_0000004", "iter_0000008", "iter_0000010"]
    assert first["checkpoint"].endswith("iter_0000010")
    (second,) = run_distributed(
        train_in_process, 1, make_job(data, tmp_path / "run", steps=12, checkpoint=ckpt)
    )
    assert second["step"] == 12 and len(second["losses"]) == 2  # resumed at 10, not a milestone
    assert _folders(root) == ["iter_0000004", "iter_0000008", "iter_0000012"]
