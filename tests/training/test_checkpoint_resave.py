"""Re-saving a step that already has a checkpoint keeps the old copy until the new one is in:
a run killed between the two renames restarts from the previous save, never from nothing."""

from __future__ import annotations

from pathlib import Path

from tests.dist_utils import run_distributed


def _restart(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from lumos_mcore.training.checkpoint import Checkpointer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ckpt = Checkpointer(Path(root), keep_last=0)
    ckpt.remove_partial()
    latest = ckpt.latest()
    return {"latest": latest.name if latest else None}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_interrupted_resave_restores_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    done = root / "iter_0000004"
    done.mkdir(parents=True)
    (done / "metadata.json").write_text("step 4")
    # Killed after the old save of step 8 moved aside, before the new one moved in:
    old8 = root / "iter_0000008.partial.old"
    old8.mkdir()
    (old8 / "metadata.json").write_text("step 8, first save")
    (root / "iter_0000008.partial").mkdir()  # the unfinished new save
    (root / "latest").write_text("iter_0000008\n")
    # Killed after the new save of step 4 moved in, before the old copy was deleted:
    old4 = root / "iter_0000004.partial.old"
    old4.mkdir()
    (old4 / "metadata.json").write_text("step 4, stale")

    res = run_distributed(_restart, 1, str(root))[0]
    assert res["latest"] == "iter_0000008"
    assert _tree(root) == {
        "iter_0000004/metadata.json": "step 4",
        "iter_0000008/metadata.json": "step 8, first save",
        "latest": "iter_0000008\n",
    }
