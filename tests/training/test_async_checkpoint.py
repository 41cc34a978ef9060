"""checkpoint.async_save: shards written by a background process while training goes on.

The checkpoint must hold the state of the step it was taken at, although the following steps
update the same weights and optimizer tensors in place while the writer runs; a run resumed
from it therefore follows an uninterrupted synchronous run exactly.
"""

from __future__ import annotations

from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, read_losses, train_in_process

STEPS = 8


def _job(data, out, steps, async_save):
    return make_job(
        data,
        out,
        steps=steps,
        checkpoint=CheckpointConfig(save_interval=2, keep_last=2, async_save=async_save),
        parallel=ParallelConfig(use_distributed_optimizer=True),
    )


def test_async_checkpoints_resume_like_an_uninterrupted_run(tmp_path):
    data = make_data(tmp_path, num_samples=48)
    run_distributed(train_in_process, 2, _job(data, tmp_path / "sync", STEPS, False), timeout=400)
    ref = read_losses(tmp_path / "sync")

    out = tmp_path / "async"
    first = run_distributed(train_in_process, 2, _job(data, out, 5, True), timeout=400)
    ckpt = out / "checkpoints"
    # the run waited for its last save: committed, named by `latest`, older ones pruned
    assert first[0]["checkpoint"] == str(ckpt / "iter_0000005")
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000004", "iter_0000005", "latest"]

    second = run_distributed(train_in_process, 2, _job(data, out, STEPS, True), timeout=400)
    assert second[0]["step"] == STEPS
    got = read_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - ref[s]) <= 1e-6 * max(1.0, abs(ref[s])), (s, got[s], ref[s])
    assert not list(ckpt.glob("*.partial*"))


def _save_in_flight(rank: int, world: int, job) -> dict:
    from lumos_mcore.training.loop import Trainer

    trainer = Trainer(job)
    ckpt = trainer.checkpointer
    trainer.train_step(trainer._iterators())
    trainer.step = 3
    path = trainer.save()
    seen = {
        "in_flight": ckpt.save_in_flight,
        "final_before": (ckpt.root / "iter_0000003").exists(),
        "partial_before": (ckpt.root / "iter_0000003.partial").is_dir(),
    }
    done = ckpt.finalize(blocking=True)
    seen.update(
        path=path,
        done=str(done),
        final_after=(ckpt.root / "iter_0000003" / "metadata.json").is_file(),
        latest=(ckpt.root / "latest").read_text().strip(),
        again=ckpt.finalize(blocking=True),  # nothing left to commit
    )
    trainer.data.close()
    return seen


def test_an_async_save_is_committed_only_when_finalized(tmp_path):
    data = make_data(tmp_path, num_samples=16)
    for seen in run_distributed(_save_in_flight, 2, _job(data, tmp_path / "o", 4, True)):
        assert seen["in_flight"] and seen["partial_before"] and not seen["final_before"]
        assert seen["done"] == seen["path"] and seen["final_after"]
        assert seen["latest"] == "iter_0000003" and seen["again"] is None
