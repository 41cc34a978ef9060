"""Data-stall accounting: how much of the training wall time is spent waiting for batches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


class StallTimer:
    """Wraps a batch iterator; ``window()`` reports the time blocked in ``next`` since the last
    call as ``data/wait_s`` and its share of the elapsed wall time as ``data/stall_fraction``.

    Other attributes (``state_dict``, ``consumed_samples``, ``close``...) pass through to the
    wrapped iterator, so the wrapper can stand in for a ``MicroBatchIterator``.
    """

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches
        self.total_wait_s = 0.0
        self._window_wait = 0.0
        self._window_start = time.perf_counter()
        self._window_batches = 0

    def __iter__(self) -> StallTimer:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        batch = next(self.batches)
        dt = time.perf_counter() - t0
        self.total_wait_s += dt
        self._window_wait += dt
        self._window_batches += 1
        return batch

    def window(self) -> dict[str, float]:
        """Stall metrics since the previous call (then starts a new window)."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        out = {
            "data/wait_s": self._window_wait,
            "data/stall_fraction": min(self._window_wait / elapsed, 1.0),
            "data/batches": float(self._window_batches),
        }
        self._window_wait, self._window_start, self._window_batches = 0.0, now, 0
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batches, name)
