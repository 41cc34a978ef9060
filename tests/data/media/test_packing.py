"""Packing raw media (``media.pack=true``): token counts from each sample's bucket (no decoding),
packs within capacity that cover each step's window exactly once, equal pack counts over DP,
held-out samples never planned, exact resume, bad samples replaced by a sample of the same
bucket (counted), and the config errors naming the flag."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.media.shards import build_media_index
from lumos_mcore.data.packing import PackedMicroBatchIterator

from .helpers import jpeg, write_tar

BUCKETS = [[64, 64], [64, 96]]  # latents 8x8 / 8x12 -> 16 / 24 tokens at VAE 8, patch 2
TOKENS = {(64, 64): 16, (64, 96): 24}
CAPACITY = 48
GB = 8


def _cfg(path: Path, **kw) -> MediaDataConfig:
    kw.setdefault("buckets", BUCKETS)
    kw.setdefault("bucket_chunk", 2)
    kw.setdefault("shuffle_shards_per_block", 2)  # allowed with several buckets when packing
    kw.setdefault("max_bad_fraction", 1.0)  # synth_media also holds 48x64 images: too small
    return MediaDataConfig(
        path=str(path), modality="image", num_workers=0, pack=True, pack_capacity=CAPACITY, **kw
    )


def _it(ds: MediaDataset, *, dp_rank=0, dp_size=2, consumed=0, **kw) -> PackedMicroBatchIterator:
    kw.setdefault("capacity", CAPACITY)
    return PackedMicroBatchIterator(
        ds,
        global_batch_size=kw.pop("global_batch_size", GB),
        dp_rank=dp_rank,
        dp_size=dp_size,
        patch_size=2,
        consumed_samples=consumed,
        sizes=ds.pack_sizes(downsample=8, patch_size=2),
        collate=ds.collate_pack,
        **kw,
    )


def _tokens(ds: MediaDataset, index: int) -> int:
    b = ds.bucket_of(index)
    return TOKENS[(b.height, b.width)]


def test_packs_fit_cover_each_window_once_and_balance_dp(synth_media):
    ds = MediaDataset(_cfg(synth_media), holdout=4)
    held = {ds.holdout_view().physical_index(j) for j in range(4)}
    sizes = ds.pack_sizes(downsample=8, patch_size=2)
    assert [int(t) for t in sizes.token_counts()] == [_tokens(ds, i) for i in range(len(ds))]
    assert set(sizes.token_counts().tolist()) == {16, 24}  # both buckets are trained
    it0, it1 = _it(ds, dp_rank=0), _it(ds, dp_rank=1)
    n = len(ds)
    steps = -(-2 * n // GB)  # two epochs
    mixed = 0
    for step in range(steps):
        start = step * GB
        plan = it0.plan(start)
        assert plan.packs == it1.plan(start).packs  # every rank plans the same step
        assert len(plan.packs) == 2 and len(plan.packs[0]) == len(plan.packs[1])  # equal counts
        assert not plan.spare
        members = [m for rank in plan.packs for pack in rank for m in pack]
        # Every position of the window exactly once, each with the sample the order puts there.
        assert sorted(p for p, _ in members) == list(range(start, start + GB))
        order = it0.order.indices(start, GB).tolist()
        assert all(order[p - start] == i for p, i in members)
        for rank in plan.packs:
            for pack in rank:
                assert sum(_tokens(ds, i) for _, i in pack) <= CAPACITY
                mixed += len({_tokens(ds, i) for _, i in pack}) > 1
        assert not {ds.physical_index(i) for _, i in members} & held
        # The trainer's tokens/FLOPs accounting: the planned samples' own sizes.
        assert sorted(it0.step_sample_sizes(start)) == sorted((_tokens(ds, i), 1) for i in order)
    assert mixed  # packs do mix the two buckets
    # Within an epoch each training sample is planned exactly once.
    epoch = [i for s in range(n // GB) for r in it0.plan(s * GB).packs for pk in r for _, i in pk]
    assert max(Counter(epoch).values()) == 1

    # Loading: a pack's pixels have each sample's own bucket shape, in plan order.
    pack = next(it1)
    planned = it1.plan(0).packs[1][0]
    assert pack["position"].tolist() == [p for p, _ in planned]
    assert pack["index"].tolist() == [i for _, i in planned]
    for x, i in zip(pack["pixels"], pack["index"].tolist()):
        b = ds.bucket_of(i)
        assert tuple(x.shape) == (3, b.height, b.width)
    assert pack["loss_scale"] == pytest.approx(2 * len(it1.plan(0).packs[1]) / GB)
    it0.close()
    it1.close()


def test_resume_mid_run_gives_identical_packs(synth_media):
    ds = MediaDataset(_cfg(synth_media))
    run = _it(ds, dp_rank=1, num_workers=1)  # with a prefetch thread
    steps = [run.next_global_batch() for _ in range(3)]
    run.close()
    resumed = _it(ds, dp_rank=1, consumed=GB, num_workers=1)
    again = [resumed.next_global_batch() for _ in range(2)]
    assert resumed.consumed_samples == 3 * GB
    resumed.close()
    for want, got in zip(steps[1:], again):
        assert [b["position"].tolist() for b in got] == [b["position"].tolist() for b in want]
        assert [b["key"] for b in got] == [b["key"] for b in want]
        for a, b in zip(got, want):
            assert all((x == y).all() for x, y in zip(a["pixels"], b["pixels"]))


def test_bad_samples_are_replaced_by_their_bucket_and_counted(tmp_path):
    root = tmp_path / "bad"
    good = jpeg(64, 64, cls=1)
    members = []
    for i in range(6):
        members.append((f"sq{i}.jpg", jpeg(64, 64, cls=i, seed=i)))
        members.append((f"wide{i}.jpg", jpeg(64, 96, cls=i, seed=i)))
    members.append(("trunc.jpg", good[: len(good) // 2]))  # probes, fails to decode
    members += [("meta.jpg", jpeg(64, 64, cls=2)), ("meta.json", b"{not json")]
    root.mkdir()
    write_tar(root / "part-000.tar", members)
    build_media_index(root)
    ds = MediaDataset(_cfg(root, bucket_chunk=4, max_bad_fraction=0.5))  # 2 good per chunk
    it = _it(ds, dp_size=1, global_batch_size=len(ds))  # one step covers every sample
    plan = it.plan(0).packs[0]
    packs = it.next_global_batch()
    assert len(packs) == len(plan)
    for pack, planned in zip(packs, plan):
        assert pack["position"].tolist() == [p for p, _ in planned]  # slots kept
        for key, x, (_, i) in zip(pack["key"], pack["pixels"], planned):
            b = ds.bucket_of(i)
            assert tuple(x.shape) == (3, b.height, b.width)  # the planned bucket's shape
            assert key.startswith("sq" if b.width == 64 else "wide")  # a good sample of it
    assert ds.bad_counts["truncated"] == 1 and ds.bad_counts["bad_meta"] == 1
    it.close()


def test_media_pack_config_errors_name_the_flag(synth_media, tmp_path):
    from lumos_mcore.config.job import JobConfig
    from lumos_mcore.config.train import TrainConfig

    with pytest.raises(ValueError, match="media.pack_capacity=None"):
        MediaDataConfig(path=str(synth_media), pack=True)
    with pytest.raises(ValueError, match="media.pack_capacity=0"):
        MediaDataConfig(path=str(synth_media), pack=True, pack_capacity=0)
    with pytest.raises(ValueError, match="media.pack_cost='flops'"):
        MediaDataConfig(path=str(synth_media), pack=True, pack_capacity=64, pack_cost="flops")
    # Without packing several buckets still refuse mixed shuffle units.
    with pytest.raises(ValueError, match="media.shuffle_shards_per_block"):
        MediaDataConfig(path=str(synth_media), buckets=BUCKETS, shuffle_shards_per_block=2)
    for name in ("vae", "dino"):  # the job check wants the folders, not real weights
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    media = _cfg(synth_media)
    media.encoders = EncodersConfig(vae=str(tmp_path / "vae"), dino=str(tmp_path / "dino"))
    with pytest.raises(ValueError, match="train.micro_batch_size=2.*media.pack=true"):
        JobConfig(media=media, train=TrainConfig(micro_batch_size=2, global_batch_size=4))
    JobConfig(media=media, train=TrainConfig(micro_batch_size=1, global_batch_size=4))
    # The capacity must hold the largest bucket's sample (64x96: 24 tokens), checked at start.
    ds = MediaDataset(_cfg(synth_media))
    with pytest.raises(ValueError, match=r"media.pack_capacity=20: bucket 64x96.*at least 24"):
        _it(ds, capacity=20)
    with pytest.raises(ValueError, match="media.pack_capacity=48: larger than"):
        _it(ds, pack_length=32)
    with pytest.raises(ValueError, match="media.buckets: bucket 64x96"):
        ds.pack_sizes(downsample=8, patch_size=8)  # 96 px is not a multiple of 8 x 8
