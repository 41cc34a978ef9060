"""``memory/peak_gib`` is the largest rank's peak, not the logging rank's."""

from __future__ import annotations

from tests.dist_utils import run_distributed


def _peak(rank: int, world: int) -> float:
    import torch.distributed as dist

    from lumos_mcore.training.loop import max_over_ranks

    dist.init_process_group("gloo")
    return max_over_ranks([7.5, 3.25][rank])  # the first stage holds more


def test_every_rank_reports_the_largest_peak() -> None:
    assert run_distributed(_peak, 2, timeout=120) == [7.5, 7.5]
