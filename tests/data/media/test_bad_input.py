"""Every kind of bad input is skipped, counted per reason, logged once, and never kills a run;
too much of it is a clear error. All broken files are real files built here."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from lumos_mcore.data.features import BadDataError
from lumos_mcore.data.media.dataset import MEDIA_BAD_REASONS
from lumos_mcore.data.media.probe import probe_media
from lumos_mcore.data.media.shards import MediaIndex, MediaShardWriter, build_media_index

from .helpers import epoch_keys, jpeg, open_media, video, write_tar

LOGGER = "lumos_mcore.data.media.dataset"


def _counts(ds) -> dict[str, int]:
    return {k: v for k, v in ds.bad_counts.items() if v}


def _garbage(n: int, head: bytes = b"") -> bytes:
    return head + np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def broken_images(tmp_path_factory) -> Path:
    """Foreign webdataset shards (indexed with build_media_index) with broken images."""
    root = tmp_path_factory.mktemp("bad_img")
    good = jpeg(64, 64, cls=1)
    members = [(f"good{i:02d}.jpg", jpeg(64, 64, cls=i, seed=i)) for i in range(10)]
    members += [
        ("trunc.jpg", good[: len(good) // 2]),  # header intact: probes, fails to decode
        ("corrupt.jpg", good[:2] + _garbage(200) + good[202:]),  # scrambled header, full length
        ("zero.jpg", b""),  # zero-length file
        ("nomedia.json", b'{"caption": "the image went missing"}'),  # missing key
        ("small.jpg", jpeg(24, 40)),  # smaller than the 32x32 bucket
        ("badmeta.jpg", jpeg(64, 64, cls=3)),
        ("badmeta.json", b"{not json"),  # unreadable metadata
    ]
    write_tar(root / "part-000.tar", members[:9])
    write_tar(root / "part-001.tar", members[9:])
    build_media_index(root)
    return root


def test_every_bad_image_is_skipped_counted_and_logged(broken_images, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = open_media(broken_images, modality="image", buckets=[[32, 32]], max_bad_fraction=0.9)
        # Known from the index: no media member, zero length, unreadable header, too small.
        assert _counts(ds) == {"missing_member": 1, "empty": 1, "undecodable": 1, "too_small": 1}
        keys = epoch_keys(ds)  # decode everything once, as training would
    assert sorted(set(keys)) == [f"good{i:02d}" for i in range(10)]
    assert _counts(ds) == {
        "missing_member": 1,
        "empty": 1,
        "undecodable": 1,
        "too_small": 1,
        "truncated": 1,  # found when decoding
        "bad_meta": 1,  # found when reading the json
    }
    assert ds.num_bad == 6 and set(ds.bad_counts) == set(MEDIA_BAD_REASONS)
    # Never silent: one warning per reason naming the sample, further ones counted silently.
    text = caplog.text
    for reason, key in [("truncated", "trunc"), ("bad_meta", "badmeta"), ("too_small", "small")]:
        assert f"'{reason}' samples are counted silently" in text and f"'{key}'" in text
    assert "unusable" in text  # the summary when the dataset opens
    # A second pass reads nothing new and counts nothing twice.
    epoch_keys(ds)
    assert ds.num_bad == 6


def test_bad_samples_are_replaced_inside_their_micro_batch(broken_images) -> None:
    ds = open_media(broken_images, modality="image", buckets=[[32, 32]], max_bad_fraction=0.9)
    it = ds.iterator(global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1)
    for _ in range(5):  # more than an epoch: every micro-batch is full and readable
        batch = next(it)
        assert batch["pixels"].shape == (4, 3, 32, 32)
        assert all(k.startswith("good") for k in batch["key"])
    it.close()


@pytest.fixture(scope="module")
def broken_videos(tmp_path_factory) -> Path:
    """Media damaged after indexing: the index records the intact file's facts."""
    root = tmp_path_factory.mktemp("bad_vid")
    vp9, _ = video("vp9", 32, 32, frames=20, cls=1)
    h264, _ = video("h264", 32, 32, frames=20, cls=2)
    with MediaShardWriter(root, samples_per_shard=6) as w:
        for i in range(6):
            data, ext = video(("vp9", "h264")[i % 2], 32, 32, frames=20, cls=i, seed=i)
            w.write(data, ext, key=f"good{i}")
        w.write(vp9[: len(vp9) * 6 // 10], "webm", key="trunc_webm", info=probe_media(vp9, "webm"))
        w.write(h264[: len(h264) // 2], "mp4", key="trunc_mp4", info=probe_media(h264, "mp4"))
        bad_head = _garbage(64) + h264[64:]  # corrupt container header
        w.write(bad_head, "mp4", key="corrupt_mp4", info=probe_media(h264, "mp4"))
        short, _ = video("vp9", 32, 32, frames=7)  # 7 < (4 - 1) * 3 + 1 = 10 frames
        w.write(short, "webm", key="short")
        w.write(b"", "mp4", key="zero_mp4", info=probe_media(h264, "mp4"))
        w.write(vp9, "webm", key="good6")
    return root


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_every_bad_video_is_skipped_and_counted(broken_videos, decoder) -> None:
    if decoder == "auto":
        pytest.importorskip("nvidia.dali")
    ds = open_media(
        broken_videos,
        modality="video",
        buckets=[[32, 32]],
        num_frames=[4],
        frame_stride=3,
        decoder=decoder,
        max_bad_fraction=0.9,
    )
    assert _counts(ds) == {"too_short": 1, "empty": 1}
    keys = epoch_keys(ds)
    assert sorted(set(keys)) == [f"good{i}" for i in range(7)]
    assert _counts(ds) == {"too_short": 1, "empty": 1, "truncated": 2, "undecodable": 1}
    batch = ds.collate([ds.get_or_none(i) for i in range(3)])
    assert batch["pixels"].shape == (3, 3, 4, 32, 32)


def test_truncated_shard_file(tmp_path: Path) -> None:
    """A shard cut short on disk: samples past the cut are bad, the ones before it are read."""
    root = tmp_path / "ds"
    with MediaShardWriter(root, samples_per_shard=100) as w:
        for i in range(12):
            w.write(jpeg(32, 32, cls=i, seed=i), "jpg", key=f"s{i:02d}")
    info = MediaIndex.load(root).shards[0]
    cut = int(info.offsets[8, 0] + info.sizes[8, 0] // 2)  # inside sample s08's image
    with open(root / info.name, "r+b") as f:
        f.truncate(cut)
    ds = open_media(root, modality="image", buckets=[[32, 32]], max_bad_fraction=0.5)
    assert _counts(ds) == {"truncated": 4}  # s08 (cut) and s09..s11 (past the end)
    assert sorted(set(epoch_keys(ds))) == [f"s{i:02d}" for i in range(8)]


def test_media_shard_rewritten_after_opening_stops_the_run(tmp_path: Path) -> None:
    """The media reader shares the feature reader's check: a replaced shard is refused."""
    from lumos_mcore.data.shard_files import ShardChangedError

    root = tmp_path / "ds"
    for seed in (0, 1):
        with MediaShardWriter(root, samples_per_shard=100, overwrite=bool(seed)) as w:
            for i in range(4):
                w.write(jpeg(32, 32, cls=i, seed=seed * 10 + i), "jpg", key=f"s{i:02d}")
        if seed == 0:
            ds = open_media(root, modality="image", buckets=[[32, 32]])
    with pytest.raises(ShardChangedError, match="changed after its index"):
        epoch_keys(ds)
    assert ds.num_bad == 0


def test_missing_caption_is_a_missing_key_when_t5_needs_it(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with MediaShardWriter(root) as w:
        w.write(jpeg(), "jpg", key="with", caption="a red circle")
        w.write(jpeg(), "jpg", key="without")
    ds = open_media(root, buckets=[[32, 32]], max_bad_fraction=0.9)
    ds.need_caption = True  # what encoders.cond=t5 sets
    assert epoch_keys(ds) == ["with", "with"]  # the bad one is replaced within its chunk
    assert _counts(ds) == {"missing_member": 1}


def test_too_much_bad_data_is_a_clear_error(broken_images, broken_videos) -> None:
    # Known from the index: raised when the dataset opens.
    with pytest.raises(
        BadDataError,
        match=r"media.max_bad_fraction=0.1 exceeded in shard .*part-001.tar: 4 of 7 samples bad",
    ):
        open_media(broken_images, modality="image", buckets=[[32, 32]], max_bad_fraction=0.1)
    # Found while decoding: raised from the iterator, naming the shard and the latest reason.
    ds = open_media(
        broken_videos,
        modality="video",
        buckets=[[32, 32]],
        num_frames=[4],
        frame_stride=3,
        decoder="pyav",
        max_bad_fraction=0.4,  # 2 of 6 known bad in that shard pass; the 3rd found stops
    )
    with pytest.raises(BadDataError, match=r"exceeded in shard .*media-000001.tar.*latest"):
        epoch_keys(ds)


def test_dataset_with_nothing_usable(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    write_tar(root / "a.tar", [("x.jpg", b""), ("y.jpg", jpeg(16, 16))])
    build_media_index(root)
    with pytest.raises(BadDataError, match="no usable image samples"):
        open_media(root, buckets=[[32, 32]], max_bad_fraction=1.0)
    assert os.path.isfile(root / "index.json")
