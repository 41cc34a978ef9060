"""Read-side plumbing shared by ``FeatureDataset`` and ``MediaDataset``: cached shard files.

Both readers ``pread`` a sample's members straight out of its shard through ``index.json``, from
several prefetch threads at once. ``ShardFiles`` keeps the open descriptors (per thread, so no
thread closes a descriptor another is reading), closes them, and drops them when the dataset is
pickled for a worker process, so the two readers cannot drift apart in how they treat files.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

MAX_OPEN_PER_THREAD = 16


class ShardFiles:
    """Mixin: an LRU of read-only descriptors per thread for the files ``self.shard_paths``.

    The host calls ``_init_runtime()`` in its ``__init__`` (it creates ``self._lock``, which the
    host may also use for its own bookkeeping). ``close`` closes every descriptor; reads reopen
    them. Pickling drops the descriptors and the lock; the copy reopens files on demand.
    """

    shard_paths: list[str]
    _RUNTIME = ("_lock", "_local", "_generation", "_all_fds")

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._generation = 0
        self._all_fds: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in self._RUNTIME:
            state.pop(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _fd(self, shard: int) -> int:
        loc = self._local
        if getattr(loc, "generation", None) != self._generation:
            loc.fds = collections.OrderedDict()
            loc.generation = self._generation
        fd = loc.fds.get(shard)
        if fd is not None:
            loc.fds.move_to_end(shard)
            return fd
        fd = os.open(self.shard_paths[shard], os.O_RDONLY)
        with self._lock:
            self._all_fds.add(fd)
        loc.fds[shard] = fd
        if len(loc.fds) > MAX_OPEN_PER_THREAD:
            _, old = loc.fds.popitem(last=False)
            with self._lock:
                self._all_fds.discard(old)
            os.close(old)
        return fd

    def close(self) -> None:
        """Close all shard files (call when no read is in flight; reads reopen them)."""
        with self._lock:
            fds, self._all_fds = self._all_fds, set()
            self._generation += 1
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        for fd in getattr(self, "_all_fds", ()):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _pread_members(
        self,
        shard: int,
        offsets: list[int],
        sizes: list[int],
        member_column: dict[str, int],
        fail: Callable[[str, str], Exception],
        span_slack: int | None = None,
    ) -> dict[str, memoryview]:
        """The members present in a sample's ``offsets``/``sizes`` row (offset -1 = absent).

        One ``pread`` covers them all (the slices share it, no copies) unless ``span_slack`` is
        given and the gap between them exceeds it, then one ``pread`` each. A short read raises
        ``fail("truncated", detail)``.
        """
        present = [(m, offsets[c], sizes[c]) for m, c in member_column.items() if offsets[c] >= 0]
        lo = min(o for _, o, _ in present)
        hi = max(o + s for _, o, s in present)
        fd = self._fd(shard)
        out: dict[str, memoryview] = {}
        if span_slack is None or hi - lo <= sum(s for _, _, s in present) + span_slack:
            span = memoryview(os.pread(fd, hi - lo, lo))
            for m, o, s in present:
                out[m] = span[o - lo : o - lo + s]
        else:
            for m, o, s in present:
                out[m] = memoryview(os.pread(fd, s, o))
        for m, _, s in present:
            if len(out[m]) != s:
                raise fail("truncated", f"{m}: read {len(out[m])} of {s} bytes")
        return out
