"""Deterministic, resumable, data-parallel sample order.

The samples of all epochs form one endless sequence of *positions*: position ``p`` is sample
``order(epoch=p // N)[p % N]``, where ``order(e)`` is a permutation seeded by ``(seed, e)``. Step
``k`` consumes the ``global_batch_size`` positions starting at ``consumed_samples``; data-parallel
rank ``r`` of ``d`` takes the contiguous slice ``[r*GB/d, (r+1)*GB/d)`` of it, cut into
micro-batches. The only state is ``consumed_samples``, so a run resumed at another DP size (or
another global batch size) continues with exactly the samples the uninterrupted run would see;
the global batch is the same set regardless of how it is split across ranks.

``SampleRange`` limits a dataset to an index range without copying it (``split_tail``: the
training view and the held-out tail of ``validation.holdout``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch


class GlobalOrder:
    """Per-epoch permutation of ``N = sum(shard_sizes)`` sample indices.

    Shards are shuffled, grouped ``shards_per_block`` at a time into blocks, and the samples of
    each block are shuffled; blocks are concatenated. Consecutive positions therefore come from
    one block, so a rank's micro-batches touch few shards while every batch still mixes
    ``shards_per_block`` randomly chosen shards.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        seed: int,
        shuffle: bool = True,
        shards_per_block: int = 1,
    ) -> None:
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        if self.shard_sizes.ndim != 1 or len(self.shard_sizes) == 0 or (self.shard_sizes < 0).any():
            raise ValueError(f"shard_sizes={list(shard_sizes)}: need one size >= 0 per shard")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        if shards_per_block < 1:
            raise ValueError(f"shards_per_block={shards_per_block}: must be >= 1")
        self.num_samples = int(self.shard_sizes.sum())
        if self.num_samples == 0:
            raise ValueError("the dataset has no samples")
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
        self.seed = seed
        self.shuffle = shuffle
        self.shards_per_block = shards_per_block
        self._dtype = np.int32 if self.num_samples < 2**31 else np.int64
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _build(self, epoch: int) -> np.ndarray:
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=self._dtype)
        rng = np.random.default_rng([self.seed, epoch])
        shard_perm = rng.permutation(len(self.shard_sizes))
        out = np.empty(n, dtype=self._dtype)
        pos = 0
        for b in range(0, len(shard_perm), self.shards_per_block):
            block = shard_perm[b : b + self.shards_per_block]
            idx = np.concatenate(
                [
                    np.arange(self.shard_starts[s], self.shard_starts[s] + self.shard_sizes[s])
                    for s in block
                ]
            )
            out[pos : pos + len(idx)] = rng.permutation(idx)
            pos += len(idx)
        return out

    def epoch(self, epoch: int) -> np.ndarray:
        """The permutation for ``epoch`` (read-only; the two most recent are cached)."""
        with self._lock:
            order = self._cache.get(epoch)
            if order is None:
                order = self._build(epoch)
                order.flags.writeable = False
                self._cache[epoch] = order
                while len(self._cache) > 2:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(epoch)
            return order

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at positions ``[start, start + count)``, crossing epochs as needed."""
        if start < 0 or count < 0:
            raise ValueError(f"positions [{start}, {start + count}): must be non-negative")
        n = self.num_samples
        parts = []
        p, end = start, start + count
        while p < end:
            e, off = divmod(p, n)
            take = min(end - p, n - off)
            parts.append(self.epoch(e)[off : off + take])
            p += take
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


def rank_slice(
    consumed_samples: int, *, global_batch_size: int, dp_rank: int, dp_size: int
) -> tuple[int, int]:
    """First position and length of DP rank ``dp_rank``'s share of the next global batch."""
    local = global_batch_size // dp_size
    return consumed_samples + dp_rank * local, local


class SampleSource(Protocol):
    """What the iterator needs from a dataset (``FeatureDataset`` provides it)."""

    shard_sizes: np.ndarray

    def __len__(self) -> int: ...

    def get_or_none(self, index: int) -> dict[str, Any] | None: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...


class SampleRange:
    """Samples ``[start, stop)`` of ``base`` as a dataset of their own, re-indexed from 0.

    Carves a split out of one dataset without copying it: ``SampleRange(ds, 0, n - h)`` is
    what training iterates (``MicroBatchIterator`` / ``PackedMicroBatchIterator`` never see an
    index past ``n - h``: sample ``i`` of the view is ``base[start + i]``, a bad sample is
    replaced inside the view), ``SampleRange(ds, n - h, n)`` the held-out tail. ``shard_sizes``
    are the base's shards clipped to the range (empty ones dropped), so the global order keeps
    its shard blocks. Samples keep their base ``index`` (the global sample id). ``cfg``,
    ``bad_counts`` and ``num_bad`` are the base's (bad counts cover the whole dataset).
    """

    def __init__(self, base: Any, start: int, stop: int) -> None:
        n = len(base)
        if not 0 <= start < stop <= n:
            raise ValueError(f"sample range [{start}, {stop}): need 0 <= start < stop <= {n}")
        self.base, self.start, self.stop = base, int(start), int(stop)
        sizes = np.asarray(base.shard_sizes, dtype=np.int64)
        ends = np.cumsum(sizes)
        clipped = np.clip(ends, start, stop) - np.clip(ends - sizes, start, stop)
        self.shard_sizes = clipped[clipped > 0]

    def __len__(self) -> int:
        return self.stop - self.start

    def _base_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        return self.start + index

    @property
    def cfg(self) -> Any:
        return getattr(self.base, "cfg", None)

    @property
    def bad_counts(self) -> dict[str, int]:
        return self.base.bad_counts

    @property
    def num_bad(self) -> int:
        return self.base.num_bad

    def get(self, index: int) -> dict[str, Any]:
        return self.base.get(self._base_index(index))

    def get_or_none(self, index: int) -> dict[str, Any] | None:
        return self.base.get_or_none(self._base_index(index))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.base.collate(samples)

    def key(self, index: int) -> str:
        return self.base.key(self._base_index(index))

    def latent_shape(self, index: int) -> tuple[int, ...] | None:
        return self.base.latent_shape(self._base_index(index))

    def token_counts(self, patch_size: int) -> np.ndarray:
        return np.asarray(self.base.token_counts(patch_size))[self.start : self.stop]

    def is_known_bad(self, index: int) -> bool:
        return self.base.is_known_bad(self._base_index(index))

    def reject(self, index: int, reason: str, detail: str) -> None:
        self.base.reject(self._base_index(index), reason, detail)

    def iterator(self, **kwargs: Any) -> MicroBatchIterator:
        """``MicroBatchIterator(self, **kwargs)``."""
        return MicroBatchIterator(self, **kwargs)


def split_tail(dataset: Any, holdout: int) -> tuple[SampleRange, SampleRange]:
    """``(head, tail)``: the first ``len(dataset) - holdout`` samples and the last ``holdout``."""
    n = len(dataset)
    if not 0 < holdout < n:
        raise ValueError(f"holdout={holdout}: need 0 < holdout < {n} (the dataset's samples)")
    return SampleRange(dataset, 0, n - holdout), SampleRange(dataset, n - holdout, n)


class MicroBatchIterator:
    """Endless iterator over this DP rank's micro-batches, resumable from ``consumed_samples``.

    Yields one collated micro-batch per ``next()``; after the last micro-batch of a global batch,
    ``consumed_samples`` advances by ``global_batch_size``. A bad sample (see
    ``FeatureDataset.get_or_none``) is replaced by the next good sample in the global order, which
    depends only on the data, so the stream is deterministic with or without prefetch threads.
    """

    def __init__(
        self,
        dataset: SampleSource,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        seed: int | None = None,
        num_workers: int | None = None,
        prefetch: int | None = None,
        shuffle: bool | None = None,
        shards_per_block: int | None = None,
    ) -> None:
        cfg = getattr(dataset, "cfg", None)

        def default(value: Any, name: str, fallback: Any) -> Any:
            return value if value is not None else getattr(cfg, name, fallback)

        seed = default(seed, "seed", 0)
        num_workers = default(num_workers, "num_workers", 0)
        prefetch = default(prefetch, "prefetch", 2)
        shuffle = default(shuffle, "shuffle", True)
        shards_per_block = default(shards_per_block, "shuffle_shards_per_block", 1)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size}: must be a positive multiple of "
                f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}"
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples}: must be >= 0")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"num_workers={num_workers}, prefetch={prefetch}: need >= 0 and >= 1")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self.order = GlobalOrder(
            dataset.shard_sizes, seed=seed, shuffle=shuffle, shards_per_block=shards_per_block
        )
        if self.order.num_samples != len(dataset):
            raise ValueError(
                f"shard sizes sum to {self.order.num_samples}, dataset has {len(dataset)}"
            )
        self.global_batches_produced = 0
        self._consumed = consumed_samples  # first position of the global batch being yielded
        self._next_mb = 0  # next micro-batch (within that global batch) to yield
        self._depth = num_workers * prefetch
        self._pool = ThreadPoolExecutor(num_workers, "lumos-data") if num_workers > 0 else None
        self._pending: collections.deque[Future] = collections.deque()
        self._sched = (self._consumed, 0)  # (global batch start, micro-batch) to submit next

    # ---- state ----
    @property
    def consumed_samples(self) -> int:
        """Positions consumed by completed global batches (a partial batch is replayed on resume)."""
        return self._consumed

    @property
    def epoch(self) -> int:
        return self._consumed // self.order.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples={consumed}: must be >= 0")
        self._drop_pending()
        self._consumed = consumed
        self._next_mb = 0
        self._sched = (consumed, 0)

    # ---- positions and loading ----
    def micro_batch_positions(self, batch_start: int, micro_batch: int) -> tuple[int, int]:
        """First position and size of micro-batch ``micro_batch`` of the global batch at ``batch_start``."""
        start, _ = rank_slice(
            batch_start,
            global_batch_size=self.global_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        return start + micro_batch * self.micro_batch_size, self.micro_batch_size

    def _sample_at(self, position: int, index: int) -> dict[str, Any]:
        sample = self.dataset.get_or_none(index)
        p = position
        # Bad sample: take the next good one in the global order (bounded by one full epoch).
        for _ in range(self.order.num_samples):
            if sample is not None:
                return sample
            p += 1
            sample = self.dataset.get_or_none(int(self.order.indices(p, 1)[0]))
        raise RuntimeError(f"no readable sample within one epoch after position {position}")

    def _load(self, batch_start: int, micro_batch: int) -> dict[str, torch.Tensor]:
        start, size = self.micro_batch_positions(batch_start, micro_batch)
        idx = self.order.indices(start, size)
        samples = [self._sample_at(start + j, int(i)) for j, i in enumerate(idx)]
        return self.dataset.collate(samples)

    def micro_batches_at(self, batch_start: int) -> int:
        """Micro-batches of this rank in the global batch at ``batch_start`` (fixed here;
        the packed iterator's count varies with the packs a window makes)."""
        return self.num_micro_batches

    def _advance(self, pos: tuple[int, int]) -> tuple[int, int]:
        start, mb = pos
        mb += 1
        if mb == self.micro_batches_at(start):
            return start + self.global_batch_size, 0
        return start, mb

    def _drop_pending(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()

    # ---- iteration ----
    def __iter__(self) -> MicroBatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            batch = self._load(self._consumed, self._next_mb)
        else:
            while len(self._pending) < self._depth:
                self._pending.append(self._pool.submit(self._load, *self._sched))
                self._sched = self._advance(self._sched)
            batch = self._pending.popleft().result()
        self._consumed, self._next_mb = self._advance((self._consumed, self._next_mb))
        if self._next_mb == 0:
            self.global_batches_produced += 1
        return batch

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """All micro-batches of this rank's share of the next global batch."""
        if self._next_mb != 0:
            raise RuntimeError("next_global_batch called in the middle of a global batch")
        return [next(self) for _ in range(self.micro_batches_at(self._consumed))]

    def close(self) -> None:
        """Stop the prefetch threads (pending work is cancelled)."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> MicroBatchIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
