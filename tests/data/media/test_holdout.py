"""``validation.holdout`` on raw media: the last H usable samples leave the media layout before
bucketing, so no epoch, bucket chunk, padding or bad-sample replacement of training reaches
them, and ``MediaHoldout`` reads exactly them, each in its own bucket."""

from __future__ import annotations

import pytest
import torch

from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.sampler import MicroBatchIterator

from .helpers import jpeg, write_tar

TWO_BUCKETS = [[32, 32], [32, 48]]


def _open(path, holdout: int = 0, **kw) -> MediaDataset:
    kw.setdefault("num_workers", 0)
    kw.setdefault("modality", "image")
    return MediaDataset(MediaDataConfig(path=str(path), **kw), holdout=holdout)


def _usable_in_index_order(full: MediaDataset) -> list[int]:
    """Physical ids of the samples training could use (every one is in the virtual layout)."""
    return sorted({full.physical_index(i) for i in range(len(full))})


def _keys_of(full: MediaDataset) -> dict[int, str]:
    return {full.physical_index(i): full.key(i) for i in range(len(full))}


def test_held_out_tail_is_never_trained_in_any_bucket_or_epoch(synth_media) -> None:
    """Two aspect buckets in chunks of 4; the media index holds 24 images then 12 videos, so
    the tail is the last 6 *images* (the usable samples), spread over both buckets."""
    h = 6
    full = _open(synth_media, buckets=TWO_BUCKETS, bucket_chunk=4)
    ds = _open(synth_media, h, buckets=TWO_BUCKETS, bucket_chunk=4)
    usable = _usable_in_index_order(full)
    names = _keys_of(full)
    tail = [names[p] for p in usable[-h:]]
    train_keys = {names[p] for p in usable[:-h]}

    held = ds.holdout_view()
    assert len(held) == h
    assert [held.key(j) for j in range(h)] == tail
    assert [held.physical_index(j) for j in range(h)] == usable[-h:]
    assert len({held.bucket_of(j) for j in range(h)}) == 2  # the tail spans both buckets
    # The training layout holds no held-out sample, not even as bucket padding.
    layout = {ds.physical_index(i) for i in range(len(ds))}
    assert layout == set(usable[:-h])

    # Three epochs through the sampler: every training sample each epoch, never a held-out one,
    # one shape per micro-batch.
    epoch = len(ds)
    keys: list[str] = []
    with MicroBatchIterator(
        ds, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1
    ) as it:
        for _ in range(3 * epoch // 2):
            batch = next(it)
            assert len({tuple(p.shape) for p in batch["pixels"]}) == 1
            keys += batch["key"]
    assert len(keys) == 3 * epoch
    assert not set(keys) & set(tail)
    for e in range(3):
        assert set(keys[e * epoch : (e + 1) * epoch]) == train_keys
    # Resume mid-run (consumed_samples) continues with the same samples.
    with MicroBatchIterator(
        ds, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, consumed_samples=12
    ) as it:
        resumed = [k for _ in range(8) for k in next(it)["key"]]
    assert resumed == keys[12:28]

    # Held-out samples decode in their own bucket; the batch reports the index position.
    for j in range(h):
        sample = held.get_or_none(j)
        assert sample is not None and sample["key"] == tail[j]
        assert tuple(sample["pixels"].shape) == held.bucket_of(j).shape
        batch = held.collate([sample])
        assert batch["pixels"].shape == (1, *held.bucket_of(j).shape)
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["index"].tolist() == [usable[-h + j]] and batch["key"] == [tail[j]]
    mixed = [held.get_or_none(j) for j in range(h)]
    with pytest.raises(ValueError, match="one bucket per batch"):
        held.collate(mixed)
    assert ds.num_bad == full.num_bad == 0


def test_single_bucket_epoch_shrinks_by_exactly_h(synth_media) -> None:
    full = _open(synth_media, buckets=[[32, 32]])
    ds = _open(synth_media, 5, buckets=[[32, 32]])
    n = len(full)
    assert len(ds) == n - 5 and int(ds.shard_sizes.sum()) == n - 5
    # The rest of the layout (and so the sampler's shard blocks) is the full one, cut short.
    assert [ds.key(i) for i in range(len(ds))] == [full.key(i) for i in range(n - 5)]
    held = ds.holdout_view()
    assert [held.key(j) for j in range(5)] == [full.key(i) for i in range(n - 5, n)]
    # Without a holdout there is no view.
    with pytest.raises(ValueError, match="without a holdout"):
        full.holdout_view()


def test_holdout_must_leave_a_training_sample(synth_media) -> None:
    n = len(_open(synth_media, buckets=[[32, 32]]))  # 24 usable images (videos do not count)
    assert n == 24
    for h in (n, n + 1):
        with pytest.raises(
            ValueError,
            match=rf"validation.holdout={h}: media.path=.* has only 24 usable image samples",
        ):
            _open(synth_media, h, buckets=[[32, 32]])
    assert len(_open(synth_media, n - 1, buckets=[[32, 32]])) == 1


def test_bad_held_out_sample_is_skipped_and_counted(tmp_path) -> None:
    """A truncated JPEG in the tail probes fine and fails to decode: ``None``, counted once."""
    good = jpeg(64, 64, cls=1)
    members = [(f"good{i:02d}.jpg", jpeg(64, 64, cls=i, seed=i)) for i in range(10)]
    members += [("trunc.jpg", good[: len(good) // 2]), ("last.jpg", jpeg(64, 64, cls=2))]
    write_tar(tmp_path / "part-000.tar", members)
    from lumos_mcore.data.media.shards import build_media_index

    build_media_index(tmp_path)
    ds = _open(tmp_path, 3, buckets=[[32, 32]], max_bad_fraction=0.5)
    held = ds.holdout_view()
    assert [held.key(j) for j in range(3)] == ["good09", "trunc", "last"]
    assert held.get_or_none(1) is None
    assert ds.bad_counts["truncated"] == 1 and held.num_bad == 1
    assert held.get_or_none(1) is None and ds.num_bad == 1  # known bad: not counted twice
    pixels = torch.stack([held.get_or_none(j)["pixels"] for j in (0, 2)])
    assert pixels.shape == (2, 3, 32, 32)
    # Training never replaces a bad sample with a held-out one: its layout ends at good08.
    assert {ds.key(i) for i in range(len(ds))} == {f"good{i:02d}" for i in range(9)}
