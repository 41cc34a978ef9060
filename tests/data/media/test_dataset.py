"""Raw-media dataset through MicroBatchIterator: DP sharding, resume, buckets, prefetch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumos_mcore.data.media.decode import decode_pyav
from lumos_mcore.data.sampler import MicroBatchIterator

from .helpers import open_media

GB, MBS = 8, 2


def _image_ds(path, **kw):
    return open_media(path, modality="image", buckets=[[32, 32]], **kw)


def _global_batches(ds, dp: int, n: int, consumed: int = 0, **kw) -> list[dict]:
    """Each global batch as (keys, pixels) concatenated over ranks in rank order."""
    per_rank = []
    for r in range(dp):
        with MicroBatchIterator(
            ds, global_batch_size=GB, micro_batch_size=MBS, dp_rank=r, dp_size=dp,
            consumed_samples=consumed, **kw,
        ) as it:  # fmt: skip
            per_rank.append([it.next_global_batch() for _ in range(n)])
            assert it.consumed_samples == consumed + n * GB
    out = []
    for b in range(n):
        mbs = [mb for r in range(dp) for mb in per_rank[r][b]]
        out.append(
            {
                "key": sum((mb["key"] for mb in mbs), []),
                "pixels": torch.cat([mb["pixels"] for mb in mbs]),
                "rank_keys": [sum((mb["key"] for mb in per_rank[r][b]), []) for r in range(dp)],
            }
        )
    return out


def test_dp_ranks_read_disjoint_slices_of_the_same_global_batch(synth_media) -> None:
    ds = _image_ds(synth_media)
    ref = _global_batches(ds, 1, 3)
    for dp in (2, 4):
        got = _global_batches(ds, dp, 3)
        for a, b in zip(ref, got):
            assert a["key"] == b["key"]
            torch.testing.assert_close(a["pixels"], b["pixels"], atol=0, rtol=0)
            flat = [k for keys in b["rank_keys"] for k in keys]
            assert len(set(flat)) == len(flat) == GB  # each sample read by exactly one rank


def test_resume_at_another_dp_size_continues_exactly(synth_media) -> None:
    ds = _image_ds(synth_media)
    uninterrupted = _global_batches(ds, 1, 7)  # 56 positions: crosses the epoch boundary (24)
    with MicroBatchIterator(
        ds, global_batch_size=GB, micro_batch_size=MBS, dp_rank=0, dp_size=1
    ) as it:
        for _ in range(4):
            it.next_global_batch()
        state = it.state_dict()  # what a checkpoint stores
    assert state == {"consumed_samples": 4 * GB}
    resumed = _global_batches(ds, 2, 3, consumed=state["consumed_samples"])
    for a, b in zip(uninterrupted[4:], resumed):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["pixels"], b["pixels"], atol=0, rtol=0)


def test_prefetch_threads_give_the_same_stream(synth_media) -> None:
    ds = _image_ds(synth_media)
    a = _global_batches(ds, 2, 3, num_workers=0)
    b = _global_batches(ds, 2, 3, num_workers=2, prefetch=2)
    assert [x["key"] for x in a] == [x["key"] for x in b]


def test_aspect_buckets_give_one_shape_per_micro_batch(synth_media) -> None:
    ds = open_media(synth_media, modality="image", buckets=[[32, 32], [32, 48]], bucket_chunk=4)
    assert len(ds.buckets) == 2 and len(ds) % 4 == 0
    it = ds.iterator(global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    seen = set()
    for _ in range(len(ds) // 2):  # one epoch
        batch = next(it)
        shapes = {tuple(p.shape) for p in batch["pixels"]}
        assert len(shapes) == 1
        h, w = batch["pixels"].shape[-2:]
        for (src_h, src_w), key in zip(batch["resolution"].tolist(), batch["key"]):
            # the bucket whose log-aspect is nearest the source's
            aspect = np.log(src_h / src_w)
            wide = abs(aspect - np.log(32 / 48)) < abs(aspect)
            assert (h, w) == ((32, 48) if wide else (32, 32)), key
            seen.add(key)
        torch.testing.assert_close(batch["aspect_ratio"], torch.full((2, 1), h / w))
    it.close()
    assert len(seen) == 24 - ds.num_bad  # every usable image appears in one epoch
    with pytest.raises(ValueError, match="media.bucket_chunk=4: must be a multiple of"):
        ds.iterator(global_batch_size=6, micro_batch_size=3, dp_rank=0, dp_size=1)


def test_video_clips_sampled_at_stride(synth_media) -> None:
    ds = open_media(
        synth_media,
        modality="video",
        buckets=[[32, 32]],
        num_frames=[8, 4],
        frame_stride=3,
        seed=5,
    )
    # 20-frame clips: 8 frames at stride 3 need 22 -> the 4-frame duration bucket (10 frames).
    assert {ds.bucket_of(i).frames for i in range(len(ds))} == {4}
    plans = [ds.get_or_none(i) for i in range(len(ds))]
    starts = [p["request"].start for p in plans]
    assert all(0 <= s <= 10 for s in starts) and len(set(starts)) > 1
    assert starts == [ds.get_or_none(i)["request"].start for i in range(len(ds))]
    batch = ds.collate(plans[:3])
    assert batch["pixels"].shape == (3, 3, 4, 32, 32)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert batch["camera_pose"].shape == (3, 12)
    assert all(c.startswith("a ") for c in batch["caption"])
    # Same tensors as the CPU reference route, whichever decoder the router picked.
    for plan, pixels in zip(plans[:3], batch["pixels"]):
        assert (pixels - decode_pyav(plan["request"])).abs().max() <= 1.01 / 127.5


def test_build_dataset_dispatches_on_the_config_type(synth_media, tmp_path) -> None:
    from lumos_mcore.config.data import DataConfig
    from lumos_mcore.config.media import MediaDataConfig
    from lumos_mcore.data import build_dataset
    from lumos_mcore.data.features import FeatureDataset
    from lumos_mcore.data.media.dataset import MediaDataset
    from lumos_mcore.data.synthetic import write_synthetic_feature_shards

    media = build_dataset(MediaDataConfig(path=str(synth_media), buckets=[[32, 32]]))
    assert isinstance(media, MediaDataset) and len(media) == 24
    feats = write_synthetic_feature_shards(tmp_path / "f", num_samples=4, cond_dim=8)
    assert isinstance(build_dataset(DataConfig(path=str(feats))), FeatureDataset)
