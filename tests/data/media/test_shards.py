"""Media shard writer, index, foreign-shard indexing and webdataset compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from lumos_mcore.data.media.probe import ProbeError, probe_media
from lumos_mcore.data.media.shards import MediaIndex, MediaShardWriter, build_media_index

from .helpers import jpeg, meta, open_media, video, write_tar


@pytest.fixture(scope="module")
def media_bytes() -> dict[str, tuple[bytes, str]]:
    return {
        "a": (jpeg(64, 96, cls=1), "jpg"),
        "b": video("vp9", 48, 64, frames=12, cls=2),
        "c": video("h264", 32, 48, frames=9, cls=3),
    }


def test_probe_facts(media_bytes) -> None:
    a, b, c = (probe_media(d, e) for d, e in media_bytes.values())
    assert (a.kind, a.width, a.height, a.num_frames, a.codec) == ("image", 96, 64, 1, "jpeg")
    assert (b.kind, b.width, b.height, b.num_frames, b.codec) == ("video", 64, 48, 12, "vp9")
    assert (c.width, c.height, c.num_frames, c.codec, c.fps) == (48, 32, 9, "h264", 8.0)
    with pytest.raises(ProbeError, match="empty"):
        probe_media(b"", "mp4")
    with pytest.raises(ProbeError, match="undecodable"):
        probe_media(b"\x00" * 100, "jpg")
    with pytest.raises(ProbeError, match="unsupported"):
        probe_media(b"abc", "gif")


def test_writer_roundtrip_and_webdataset_reads_it(tmp_path: Path, media_bytes) -> None:
    out = tmp_path / "ds"
    cam = np.arange(12.0).reshape(3, 4)
    with MediaShardWriter(out, samples_per_shard=2) as w:
        for k, (data, ext) in media_bytes.items():
            w.write(data, ext, key=k, caption=f"caption {k}", camera=cam if k == "b" else None)
    index = MediaIndex.load(out)
    assert [s.name for s in index.shards] == ["media-000000.tar", "media-000001.tar"]
    assert [k for s in index.shards for k in s.keys] == ["a", "b", "c"]
    assert [c for s in index.shards for c in s.codecs] == ["jpeg", "vp9", "h264"]
    assert [int(f) for s in index.shards for f in s.num_frames] == [1, 12, 9]
    # Plain webdataset sees the same samples and bytes.
    got = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            ext = next(e for e in ("jpg", "webm", "mp4") if e in sample)
            got[sample["__key__"]] = (sample[ext], json.loads(sample["json"]))
    for k, (data, _) in media_bytes.items():
        assert got[k][0] == data
        assert got[k][1]["caption"] == f"caption {k}"
    assert got["b"][1]["camera"] == cam.tolist()


def test_writer_refuses_bad_input_and_aborts_cleanly(tmp_path: Path, media_bytes) -> None:
    out = tmp_path / "ds"
    with MediaShardWriter(out) as w:
        w.write(*media_bytes["a"], key="a")
        with pytest.raises(ProbeError, match="empty"):
            w.write(b"", "jpg", key="e")
        with pytest.raises(ValueError, match="written twice"):
            w.write(*media_bytes["a"], key="a")
        with pytest.raises(ValueError, match="must be non-empty"):
            w.write(*media_bytes["a"], key="x.y")
    assert (out / "index.json").is_file()
    with pytest.raises(FileExistsError):
        MediaShardWriter(out)
    with pytest.raises(RuntimeError), MediaShardWriter(tmp_path / "b") as w:
        w.write(*media_bytes["a"])
        raise RuntimeError("interrupted")
    assert not (tmp_path / "b" / "index.json").exists()
    assert not list((tmp_path / "b").iterdir())  # the partial shard was removed


def test_foreign_shards_indexed_like_our_own(tmp_path: Path, media_bytes) -> None:
    """img2dataset / video2dataset layout: media + .txt caption + .json metadata."""
    root = tmp_path / "foreign"
    root.mkdir()
    members = []
    for k, (data, ext) in media_bytes.items():
        members += [
            (f"{k}.{ext}", data),
            (f"{k}.txt", f"text {k}".encode()),
            (f"{k}.json", meta(k=k)),
        ]
    write_tar(root / "part-00000.tar", members)
    index = build_media_index(root)
    ours = MediaIndex.load(root)
    assert ours.num_samples == index.num_samples == 3
    s = ours.shards[0]
    assert s.keys == ["a", "b", "c"] and s.exts == ["jpg", "webm", "mp4"]
    assert s.widths.tolist() == [96, 64, 48] and s.num_frames.tolist() == [1, 12, 9]
    assert s.errors == ["", "", ""]
    ds = open_media(root, modality="image", buckets=[[32, 48]])
    plan = ds.get_or_none(0)
    assert plan["caption"] == "text a"  # the .txt member wins over json
    assert plan["meta"] == {"k": "a"}
