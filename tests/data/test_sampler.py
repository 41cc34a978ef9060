"""Global order, DP slicing, resume at another DP size, prefetch determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumos_mcore.data.features import collate_features
from lumos_mcore.data.sampler import GlobalOrder, MicroBatchIterator, split_tail

from .conftest import open_dataset

SHARDS = [8, 8, 8, 8, 5, 7, 8]  # N = 52, uneven shards


class FakeSource:
    """In-memory dataset: sample i's latent is filled with i; indices in ``bad`` are unreadable."""

    def __init__(self, shard_sizes: list[int], bad: set[int] = frozenset()) -> None:
        self.shard_sizes = np.asarray(shard_sizes)
        self.bad = set(bad)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return int(self.shard_sizes.sum())

    def get_or_none(self, index: int) -> dict | None:
        self.reads.append(index)
        if index in self.bad:
            return None
        return {
            "latent": torch.full((2, 2, 2), float(index)),
            "cond": torch.full((1, 3), float(index)),
            "cond_mask": torch.ones(1, dtype=torch.bool),
            "index": torch.tensor(index),
            "key": str(index),
        }

    def collate(self, samples: list[dict]) -> dict:
        return collate_features(samples)


def shard_of(shard_sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(shard_sizes)), shard_sizes)


def take(it: MicroBatchIterator, global_batches: int) -> list[list[int]]:
    """Indices of this rank's share of each of the next global batches."""
    return [
        torch.cat([mb["index"] for mb in it.next_global_batch()]).tolist()
        for _ in range(global_batches)
    ]


def run_dp(source, dp_size: int, batches: int, consumed: int = 0, **kw) -> list[list[int]]:
    """Global batches as seen by all ranks, concatenated in rank order."""
    per_rank = []
    for r in range(dp_size):
        it = MicroBatchIterator(source, dp_rank=r, dp_size=dp_size, consumed_samples=consumed, **kw)
        per_rank.append(take(it, batches))
        assert it.consumed_samples == consumed + batches * kw["global_batch_size"]
        assert it.global_batches_produced == batches
        it.close()
    return [sum((per_rank[r][b] for r in range(dp_size)), []) for b in range(batches)]


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    order = GlobalOrder(SHARDS, seed=5, shards_per_block=2)
    n = sum(SHARDS)
    e0, e1 = order.epoch(0), order.epoch(1)
    assert sorted(e0.tolist()) == list(range(n)) and sorted(e1.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(GlobalOrder(SHARDS, seed=5, shards_per_block=2).epoch(1), e1)
    assert not np.array_equal(GlobalOrder(SHARDS, seed=6, shards_per_block=2).epoch(0), e0)
    np.testing.assert_array_equal(GlobalOrder(SHARDS, seed=5, shuffle=False).epoch(3), np.arange(n))
    # Positions run on across epochs.
    np.testing.assert_array_equal(order.indices(n - 3, 6), np.concatenate([e0[-3:], e1[:3]]))
    np.testing.assert_array_equal(order.indices(2 * n + 4, 2), order.epoch(2)[4:6])


@pytest.mark.parametrize("per_block", [1, 2, 3])
def test_order_is_shard_major_blocks(per_block: int) -> None:
    """Walking the order, each block is exactly the samples of ``per_block`` whole shards."""
    sizes = np.asarray(SHARDS)
    owner = shard_of(SHARDS)
    for epoch in range(3):
        order = GlobalOrder(SHARDS, seed=epoch, shards_per_block=per_block).epoch(epoch)
        p, blocks, shuffled_inside = 0, 0, False
        while p < len(order):
            seen: set[int] = set()
            q = p
            while q < len(order):
                seen.add(int(owner[order[q]]))
                q += 1
                if len(seen) == per_block and q - p == sizes[list(seen)].sum():
                    break
            block = order[p:q]
            assert q - p == sizes[list(seen)].sum(), "block holds only part of a shard"
            assert set(owner[block].tolist()) == seen
            shuffled_inside |= not np.array_equal(np.sort(block), block)
            p, blocks = q, blocks + 1
        assert blocks == -(-len(SHARDS) // per_block)
        assert shuffled_inside


def test_dp_ranks_are_disjoint_slices_of_the_global_batch() -> None:
    src = FakeSource(SHARDS)
    gb, order = 12, GlobalOrder(SHARDS, seed=3, shards_per_block=2)
    per_rank = []
    for r in range(3):
        it = MicroBatchIterator(
            src,
            global_batch_size=gb,
            micro_batch_size=2,
            dp_rank=r,
            dp_size=3,
            seed=3,
            shards_per_block=2,
        )
        assert it.num_micro_batches == 2
        per_rank.append(take(it, 6))  # 72 positions: crosses into epoch 1
    for b in range(6):
        parts = [set(per_rank[r][b]) for r in range(3)]
        assert all(len(p) == 4 for p in parts)
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        # Rank r holds positions [r*4, (r+1)*4) of the global batch.
        expected = order.indices(b * gb, gb).tolist()
        assert sum((per_rank[r][b] for r in range(3)), []) == expected


@pytest.mark.parametrize("resume_dp", [1, 4])
def test_resume_at_another_dp_size_continues_exactly(resume_dp: int) -> None:
    src = FakeSource(SHARDS)
    kw = dict(global_batch_size=8, micro_batch_size=2, seed=11)
    reference = run_dp(src, dp_size=2, batches=9, **kw)  # 72 positions > one epoch of 52
    # Interrupted run: DP=2 for 4 global batches, then save consumed_samples.
    states = []
    for r in range(2):
        it = MicroBatchIterator(src, dp_rank=r, dp_size=2, **kw)
        take(it, 4)
        states.append(it.state_dict())
    assert states[0] == states[1] == {"consumed_samples": 32}
    resumed = run_dp(
        src, dp_size=resume_dp, batches=5, consumed=states[0]["consumed_samples"], **kw
    )
    for got, ref in zip(resumed, reference[4:]):
        assert sorted(got) == sorted(ref)  # the same global batch ...
        assert got == ref  # ... in the same position order


def test_resume_with_real_shards_and_prefetch(small_dataset: Path) -> None:
    ds = open_dataset(small_dataset, num_workers=2, prefetch=2)
    kw = dict(global_batch_size=8, micro_batch_size=2, seed=0)
    reference = run_dp(ds, dp_size=2, batches=7, **kw)  # 56 positions, N = 37
    it = MicroBatchIterator(ds, dp_rank=1, dp_size=2, **kw)
    take(it, 3)
    state = it.state_dict()
    it.close()
    assert state == {"consumed_samples": 24}
    resumed = run_dp(ds, dp_size=4, batches=4, consumed=state["consumed_samples"], **kw)
    assert resumed == reference[3:]


def test_prefetch_threads_do_not_change_the_stream(small_dataset: Path) -> None:
    streams = []
    for workers in (0, 1, 3):
        ds = open_dataset(small_dataset, num_workers=workers, prefetch=3)
        with MicroBatchIterator(
            ds, global_batch_size=6, micro_batch_size=3, dp_rank=0, dp_size=1
        ) as it:
            streams.append([next(it) for _ in range(20)])  # 60 positions, N = 37
    for other in streams[1:]:
        for a, b in zip(streams[0], other):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k])
    # The latent of each yielded sample is the stored one for its index.
    first = streams[0][0]
    ds = open_dataset(small_dataset)
    for j, i in enumerate(first["index"].tolist()):
        assert torch.equal(first["latent"][j], ds.get(i)["latent"])


def test_epochs_roll_over_covering_every_sample_once() -> None:
    sizes = [8, 8, 8]  # N = 24 = 4 global batches of 6
    src = FakeSource(sizes)
    it = MicroBatchIterator(
        src, global_batch_size=6, micro_batch_size=3, dp_rank=0, dp_size=1, seed=1
    )
    epochs = [sum(take(it, 4), []) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]
    assert it.epoch == 3 and it.consumed_samples == 72 and it.global_batches_produced == 12


def test_state_mid_global_batch_replays_the_partial_batch() -> None:
    src = FakeSource(SHARDS)
    kw = dict(global_batch_size=12, micro_batch_size=2, dp_rank=1, dp_size=2, seed=0, num_workers=2)
    it = MicroBatchIterator(src, **kw)
    take(it, 1)
    first_of_second = next(it)["index"].tolist()
    assert it.state_dict() == {"consumed_samples": 12} and it.global_batches_produced == 1
    it.load_state_dict(it.state_dict())  # drops prefetched work, restarts the batch
    assert next(it)["index"].tolist() == first_of_second
    it.load_state_dict({"consumed_samples": 0})
    again = MicroBatchIterator(src, **kw)
    assert take(it, 2) == take(again, 2)
    it.close()
    again.close()


def test_bad_sample_is_replaced_by_next_good_in_order() -> None:
    order = GlobalOrder(SHARDS, seed=2, shards_per_block=4)
    seq = order.indices(0, 16).tolist()
    bad = {seq[1], seq[2], seq[9]}  # two in a row, and one in the second batch
    src = FakeSource(SHARDS, bad=bad)
    it = MicroBatchIterator(
        src,
        global_batch_size=8,
        micro_batch_size=4,
        dp_rank=0,
        dp_size=2,
        seed=2,
        shards_per_block=4,
    )
    assert take(it, 2) == [
        [seq[0], seq[3], seq[3], seq[3]],  # positions 1, 2 -> next good in order (position 3)
        [seq[8], seq[10], seq[10], seq[11]],
    ]


def test_iterator_validates_batch_geometry() -> None:
    src = FakeSource(SHARDS)
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=10: must be a positive multiple of micro_batch_size \* dp_size = 2 \* 4",
    ):
        MicroBatchIterator(src, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        MicroBatchIterator(src, global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)


# ---- SampleRange: the training view of validation.holdout ----

HOLDOUT = 10  # the last 10 of N = 52: shards [8, 8, 8, 8, 5, 7, 8] -> head [8, 8, 8, 8, 5, 5]


def test_head_view_never_yields_the_tail_over_several_epochs() -> None:
    n = sum(SHARDS)
    bad = {n - HOLDOUT - 1, 3}  # the last head sample is bad: its stand-in must stay in the head
    src = FakeSource(SHARDS, bad=bad)
    head, tail = split_tail(src, HOLDOUT)
    assert len(head) == n - HOLDOUT and len(tail) == HOLDOUT
    assert head.shard_sizes.tolist() == [8, 8, 8, 8, 5, 5]
    assert tail.shard_sizes.tolist() == [2, 8]
    kw = dict(global_batch_size=6, micro_batch_size=3, seed=4, shards_per_block=2)
    batches = run_dp(head, dp_size=2, batches=21, **kw)  # 126 positions = 3 epochs of 42
    seen = sum(batches, [])
    assert max(seen) < n - HOLDOUT and max(src.reads) < n - HOLDOUT  # the tail is never read
    good = set(range(n - HOLDOUT)) - bad
    for e in range(3):  # every epoch is the head once (bad samples replaced inside it)
        epoch = seen[e * 42 : (e + 1) * 42]
        assert set(epoch) == good
    it = MicroBatchIterator(head, dp_rank=0, dp_size=1, consumed_samples=84, **kw)
    assert it.epoch == 2  # epochs are N - holdout samples long
    # The view re-indexes from 0; the tail's sample i is the base's sample n - HOLDOUT + i.
    assert [int(tail.get_or_none(i)["index"]) for i in range(HOLDOUT)] == list(
        range(n - HOLDOUT, n)
    )
    with pytest.raises(IndexError):
        head.get_or_none(n - HOLDOUT)
    with pytest.raises(ValueError, match=r"holdout=52: need 0 < holdout < 52"):
        split_tail(src, n)


@pytest.mark.parametrize("resume_dp", [1, 3])
def test_head_view_resumes_at_another_dp_size_exactly(resume_dp: int) -> None:
    head, _ = split_tail(FakeSource(SHARDS), HOLDOUT)
    kw = dict(global_batch_size=6, micro_batch_size=2, seed=9)
    reference = run_dp(head, dp_size=1, batches=12, **kw)  # 72 positions > one epoch of 42
    resumed = run_dp(head, dp_size=resume_dp, batches=7, consumed=30, **kw)
    assert resumed == reference[5:]
    # The same as the global order of the clipped shards: consumed_samples means what it did.
    order = GlobalOrder([8, 8, 8, 8, 5, 5], seed=9)
    assert sum(reference, []) == order.indices(0, 72).tolist()


def test_head_view_of_real_shards_maps_metadata_and_packs(small_dataset: Path) -> None:
    from lumos_mcore.data.packing import PackedMicroBatchIterator

    ds = open_dataset(small_dataset)  # N = 37, shards of 8
    head, tail = split_tail(ds, 7)
    assert head.shard_sizes.tolist() == [8, 8, 8, 6] and tail.shard_sizes.tolist() == [2, 5]
    assert [tail.key(i) for i in range(7)] == [ds.key(i) for i in range(30, 37)]
    assert tail.latent_shape(0) == ds.latent_shape(30)
    np.testing.assert_array_equal(tail.token_counts(2), ds.token_counts(2)[30:])
    assert torch.equal(tail.get(6)["latent"], ds.get(36)["latent"])
    assert head.cfg is ds.cfg and head.bad_counts is ds.bad_counts
    packed = PackedMicroBatchIterator(
        head, global_batch_size=6, dp_rank=0, dp_size=1, capacity=48, patch_size=2
    )
    seen: list[int] = []
    while len(seen) < 48:  # more than one epoch of 30
        seen += next(packed)["index"].tolist()
    packed.close()
    assert max(seen) < 30  # never the tail
    assert set(seen[:30]) == set(range(30))
