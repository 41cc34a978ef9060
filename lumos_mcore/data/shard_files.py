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


class ShardChangedError(RuntimeError):
    """A shard file is not the one the dataset's index was read with (rewritten or replaced
    during the run): its offsets no longer describe the bytes, so reading on would train on
    garbage or on other samples. Not a bad sample: the run stops."""


class ShardFiles:
    """Mixin: an LRU of read-only descriptors per thread for the files ``self.shard_paths``.

    The host calls ``_stat_shards`` right after loading its index (it records each file's
    identity) and ``_init_runtime()`` in its ``__init__`` (it creates ``self._lock``, which the
    host may also use for its own bookkeeping). ``close`` closes every descriptor; reads reopen
    them, and every open checks that the file is still the one the index was read with
    (:class:`ShardChangedError` otherwise). Pickling drops the descriptors and the lock; the
    copy reopens files on demand.
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

    def _stat_shards(self, missing: Callable[[str], Exception]) -> list[int]:
        """Sizes of ``self.shard_paths``, recording each file's identity (device, inode, size,
        mtime) for the checks on open; ``missing(path)`` is raised for an absent file."""
        identities = []
        for path in self.shard_paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise missing(path) from None
            identities.append(_identity(st))
        self._shard_identities = identities
        return [ident[2] for ident in identities]

    def _check_identity(self, shard: int, fd: int) -> None:
        known = getattr(self, "_shard_identities", None)
        if known is None:
            return
        now = _identity(os.fstat(fd))
        if now != known[shard]:
            path = self.shard_paths[shard]
            raise ShardChangedError(
                f"shard {path} changed after its index was read (was {known[shard][2]} bytes, "
                f"mtime_ns {known[shard][3]}; now {now[2]} bytes, mtime_ns {now[3]}): the data "
                "set was rewritten during the run. Let a rewrite finish before training on it, "
                "then restart the job (it resumes from its last checkpoint)"
            )

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
        try:
            self._check_identity(shard, fd)
        except BaseException:
            os.close(fd)
            raise
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


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
