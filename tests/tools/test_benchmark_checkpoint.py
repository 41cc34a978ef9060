"""tools/benchmark_checkpoint.py measures both save modes side by side on a tiny model."""

from __future__ import annotations

import json
import math

from tests.dist_utils import run_distributed


def _bench(rank: int, world: int, workdir: str, out: str) -> dict:
    from tools.benchmark_checkpoint import main

    return main(
        [
            "--model",
            "Lumos-Micro/2",
            "--latent-size",
            "8",
            "--repeat",
            "1",
            "--workdir",
            workdir,
            "--out",
            out,
        ]
    )


def test_both_modes_are_timed_and_written(tmp_path):
    out = tmp_path / "ckpt.md"
    r0, r1 = run_distributed(_bench, 2, str(tmp_path / "w"), str(out), timeout=400)
    assert r1 == {}  # only rank 0 reports
    assert r0["ranks"] == 2 and r0["params_per_rank"] > 0
    for key in ("sync_save_s", "async_blocking_s", "async_to_commit_s", "idle_step_s"):
        assert r0[key] > 0 and math.isfinite(r0[key]), key
    assert r0["async_to_commit_s"] >= r0["async_blocking_s"]
    assert r0["blocking_ratio"] == r0["sync_save_s"] / r0["async_blocking_s"]
    assert "| Lumos-Micro/2 @ 8² latents | 2 |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["model"] == "Lumos-Micro/2"
    # every save committed, the last one named by `latest`, keep_last=1 pruned the rest
    ckpt = tmp_path / "w" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000005", "latest"]
