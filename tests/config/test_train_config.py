"""TrainConfig / OptimConfig refuse values the loop cannot run, naming the flag."""

from __future__ import annotations

import math

import pytest

from lumos_mcore.config.train import OptimConfig, TrainConfig


@pytest.mark.parametrize("lr", [0.0, -1e-4, math.nan, math.inf])
def test_lr_must_be_positive_and_finite(lr):
    with pytest.raises(ValueError, match="optim.lr="):
        OptimConfig(lr=lr)


@pytest.mark.parametrize("out", ["", "  "])
def test_empty_output_dir_is_refused(out):
    """An empty run folder would put checkpoints in /checkpoints and logs in /logs."""
    with pytest.raises(ValueError, match="train.output_dir is empty"):
        TrainConfig(output_dir=out)


def test_interleaved_pipeline_needs_a_multiple_of_pp_micro_batches():
    """megatron's interleaved schedule refuses a micro-batch count that is not a multiple of
    pp (checked here, before any rank starts)."""
    train = TrainConfig(micro_batch_size=1, global_batch_size=6)
    assert train.num_microbatches(2) == 3  # no vpp: any count
    assert train.num_microbatches(2, pp=3, vpp=2) == 3
    with pytest.raises(ValueError, match=r"parallel.vpp=2: .*multiple of parallel.pp=2 .*gives 3"):
        train.num_microbatches(2, pp=2, vpp=2)
    with pytest.raises(ValueError, match=r"parallel.vpp=2: .*gives 1"):
        TrainConfig(micro_batch_size=1, global_batch_size=2).num_microbatches(2, pp=2, vpp=2)
