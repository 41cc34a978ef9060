"""A resume at another ``train.global_batch_size`` continues with the samples the run would
have read next: the data position comes from the checkpoint's ``consumed_samples``, not from
``step * global_batch_size`` of the new setting."""

from __future__ import annotations

import dataclasses

from lumos_mcore.config.train import CheckpointConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import KeyRecorder, make_data, make_job


def _runs(rank: int, world: int, jobs: dict) -> dict:
    from megatron.core import dist_checkpointing

    from lumos_mcore.training.loop import Trainer

    out = {}
    for name, job in jobs.items():
        trainer = Trainer(job)
        trainer.data = KeyRecorder(trainer.data, trainer.dataset)
        start = trainer.consumed_samples_at(trainer.step)
        trainer.run()
        common = dist_checkpointing.load_common_state_dict(str(trainer.checkpointer.latest()))
        consumed = common["train_state"]["consumed_samples"]
        out[name] = {"seen": trainer.data.seen, "start": start, "consumed": consumed}
    return out


def test_resume_at_another_global_batch_size_reads_the_next_samples(tmp_path):
    data = make_data(tmp_path, num_samples=96)
    ckpt = CheckpointConfig(save_interval=4)
    base = make_job(data, tmp_path / "run", steps=4, checkpoint=ckpt)
    bigger = dataclasses.replace(base.train, steps=6, global_batch_size=16)
    jobs = {
        "first": base,  # 4 steps x 8 samples: positions 0..31
        "resumed": dataclasses.replace(base, train=bigger),  # steps 4, 5 x 16: 32..63
        "reference": make_job(data, tmp_path / "ref", steps=8, checkpoint=ckpt),  # 0..63 by 8
    }
    res = run_distributed(_runs, 1, jobs, timeout=300)[0]
    assert res["resumed"]["start"] == 32
    assert len(res["resumed"]["seen"]) == 32
    assert res["resumed"]["consumed"] == 64 == res["reference"]["consumed"]
    assert res["first"]["seen"] + res["resumed"]["seen"] == res["reference"]["seen"]
