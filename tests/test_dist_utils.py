"""The multi-process harness itself: what a rank sees must not depend on how it was started
(forked from the preloaded server on CPU, spawned with CUDA)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests import dist_utils
from tests.dist_utils import run_distributed

_STATE = {"touched": False}


def _what_a_rank_sees(rank: int, world: int, tensors: list[torch.Tensor]) -> dict:
    seen = {
        "rank": int(os.environ["RANK"]),
        "world": int(os.environ["WORLD_SIZE"]),
        "marker": os.environ.get("LUMOS_TEST_MARKER"),
        "touched_before": _STATE["touched"],
        "sum": float(sum(t.sum() for t in tensors)),
        "threads": torch.get_num_threads(),
        "preloaded": "lumos_mcore.training.loop" in sys.modules,
    }
    _STATE["touched"] = True  # a later run's ranks must not see this
    return seen


def test_ranks_get_the_callers_environment_fresh_state_and_many_tensors(monkeypatch):
    # Hundreds of tensors: passed as file descriptors they would exceed what a forkserver
    # accepts per process; the harness copies them.
    tensors = [torch.full((3,), float(i)) for i in range(400)]
    expected = 3.0 * sum(range(400))
    for marker in ("first", "second"):  # set after the server started: still seen
        monkeypatch.setenv("LUMOS_TEST_MARKER", marker)
        seen = run_distributed(_what_a_rank_sees, 2, tensors)
        assert [s["rank"] for s in seen] == [0, 1]
        for s in seen:
            assert s["world"] == 2 and s["marker"] == marker and s["threads"] == 1
            assert s["touched_before"] is False
            assert s["sum"] == expected
    if not torch.cuda.is_available():  # forked from the server that imported the library
        assert all(s["preloaded"] for s in seen)
        assert dist_utils._context().get_start_method() == "forkserver"


def _fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(AssertionError, match=r"rank 1 of _fails failed(.|\n)*rank one refuses"):
        run_distributed(_fails, 2)
