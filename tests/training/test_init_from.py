"""Progressive stages (256 -> 512 px): ``checkpoint.init_from`` loads only the weights of the
previous stage, restarts optimizer / schedule / step, reports keys that do not fit (non-strict)
or refuses them (strict), and yields to the new stage's own checkpoints on resubmission."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.train import CheckpointConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job


def _init(path, *, strict=True, from_ema=False, save_interval=2):
    return CheckpointConfig(
        save_interval=save_interval, init_from=str(path), init_strict=strict, init_from_ema=from_ema
    )


def _stages(rank: int, world: int, jobs: dict) -> dict:
    """Stage 1 trains; stage 2 (another resolution) starts from it, trains, is resubmitted;
    then non-strict / strict loads into models that do not fit."""
    import torch

    from lumos_mcore.training.checkpoint import read_full_weights
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import unwrap

    out: dict = {}
    Trainer(jobs["stage1"]).run()
    ckpt_root = jobs["stage1"].checkpoint_dir
    ref, _ = read_full_weights(ckpt_root)
    ref_ema, _ = read_full_weights(ckpt_root, ema=True)

    for name in ("stage2", "stage2_ema"):
        t = Trainer(jobs[name])
        params = dict(unwrap(t.chunks[0]).named_parameters())
        want = ref_ema if name.endswith("ema") else ref
        out[name] = {
            "step": t.step,
            "ok": t.init_report.ok,
            "all_equal": all(torch.equal(p.detach(), want[n]) for n, p in params.items()),
            "names_covered": set(params) <= set(want),
            "ema_equal": all(torch.equal(t.ema.shadow[0][n], ref_ema[n]) for n in params),
        }
    t = Trainer(jobs["stage2"])
    res = t.run()
    out["stage2"]["losses"] = res.losses
    t = Trainer(jobs["stage2_resubmit"])  # its own checkpoint wins over init_from
    out["resubmit_step"] = t.step
    out["resubmit_losses"] = t.run().losses

    t = Trainer(jobs["single_lenient"])  # adaLN-single: blocks differ from adaLN-Zero's
    out["lenient"] = dataclasses.asdict(t.init_report)
    for name in ("single_strict", "narrow_strict"):
        try:
            Trainer(jobs[name])
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    t = Trainer(jobs["narrow_lenient"])
    out["narrow_lenient"] = dataclasses.asdict(t.init_report)
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    data_256 = make_data(root / "256", latent_size=8)
    data_512 = make_data(root / "512", latent_size=16)
    s1 = make_job(data_256, root / "stage1", steps=2, checkpoint=CheckpointConfig(save_interval=2))
    ckpt = s1.checkpoint_dir
    hi_res = ModelConfig(name="Lumos-Micro/2", latent_size=16, cond_channels=32)
    single = dataclasses.replace(hi_res, adaln_type="single")
    narrow = dataclasses.replace(hi_res, cond_channels=16)
    jobs = {
        "stage1": s1,
        "stage2": make_job(
            data_512, root / "stage2", steps=2, model=hi_res, checkpoint=_init(ckpt)
        ),
        "stage2_ema": make_job(
            data_512, root / "s2ema", steps=2, model=hi_res, checkpoint=_init(ckpt, from_ema=True)
        ),
        "stage2_resubmit": make_job(
            data_512, root / "stage2", steps=3, model=hi_res, checkpoint=_init(ckpt)
        ),
        "single_lenient": make_job(
            data_512, root / "sl", model=single, checkpoint=_init(ckpt, strict=False)
        ),
        "single_strict": make_job(data_512, root / "ss", model=single, checkpoint=_init(ckpt)),
        "narrow_strict": make_job(data_512, root / "ns", model=narrow, checkpoint=_init(ckpt)),
        "narrow_lenient": make_job(
            data_512, root / "nl", model=narrow, checkpoint=_init(ckpt, strict=False)
        ),
    }
    (res,) = run_distributed(_stages, 1, jobs, timeout=300)
    return root, res


def test_stage2_starts_from_stage1_weights_at_step_0(stages):
    root, res = stages
    for name in ("stage2", "stage2_ema"):
        r = res[name]
        assert r["step"] == 0 and r["ok"], name
        assert r["names_covered"] and r["all_equal"], name  # 8x8 -> 16x16 latents: same weights
        assert r["ema_equal"], name  # EMA starts from the stored EMA
    assert all(math.isfinite(x) for x in res["stage2"]["losses"])
    recs = [json.loads(x) for x in (root / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # stage 2 counts from 0, then resumes at 2
    assert recs[0]["train/lr"] == 0.0  # a fresh warm-up schedule (optim.warmup_steps=2)


def test_resubmitted_stage_resumes_its_own_checkpoint(stages):
    _, res = stages
    assert res["resubmit_step"] == 2
    assert len(res["resubmit_losses"]) == 1


def test_non_strict_reports_missing_and_unexpected_keys(stages):
    _, res = stages
    rep = res["lenient"]
    # adaLN-Zero's per-block linears are not in an adaLN-single model, and vice versa.
    assert "decoder.layers.adaln.linear.weight" in rep["unexpected"]
    assert "t_block.1.weight" in rep["missing"]
    assert rep["loaded"] and not rep["mismatched"]
    assert "decoder.layers.adaln.linear.weight" in res["single_strict"]


def test_strict_shape_mismatch_names_the_key(stages):
    _, res = stages
    msg = res["narrow_strict"]
    assert msg is not None and "shape mismatch" in msg and "y_embedder" in msg
    assert "checkpoint.init_strict=false" in msg and msg.startswith("checkpoint.init_from=")
    rep = res["narrow_lenient"]
    assert [k for k, *_ in rep["mismatched"]] and all(
        "y_embedder" in k for k, *_ in rep["mismatched"]
    )


def test_init_from_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint.init_from=''"):
        CheckpointConfig(init_from="")
    with pytest.raises(ValueError, match=r"checkpoint.init_from=.*either checkpoint.load"):
        CheckpointConfig(init_from=str(tmp_path), load=str(tmp_path))
