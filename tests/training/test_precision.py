"""bf16 mixed precision (megatron Float16Module + fp32 main weights) trains and resumes exactly.

bf16 is the GPU default; forcing it on CPU exercises the same megatron wrappers and optimizer.
"""

from __future__ import annotations

import math

from lumos_mcore.config.model import ModelConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job, train_in_process


def test_bf16_trains_and_resumes_exactly(tmp_path):
    data = make_data(tmp_path)
    model = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_channels=32, precision="bf16")

    def job(out, steps):
        return make_job(data, tmp_path / out, steps=steps, model=model)

    (full,) = run_distributed(train_in_process, 1, job("full", 6))
    (first,) = run_distributed(train_in_process, 1, job("split", 4))
    (second,) = run_distributed(train_in_process, 1, job("split", 6))
    assert all(math.isfinite(x) for x in full["losses"])
    assert first["losses"] + second["losses"] == full["losses"]
