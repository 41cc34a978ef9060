"""Bad input reaching the media tools is skipped and counted, never aborts the run: bad camera
or sidecar metadata in ``make_media_shards``, and a sample that probes but fails to decode in
``encode_features`` (its in-batch replacement must not break the key -> metadata mapping)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.data.features import FeatureDataset
from lumos_mcore.data.media.shards import MediaIndex, build_media_index

from .helpers import jpeg, write_tar
from .helpers import meta as meta_json

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import encode_features  # noqa: E402
import make_media_shards  # noqa: E402


def _images(folder: Path, n: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img{i}.jpg").write_bytes(jpeg(32, 32, seed=i))


@pytest.mark.parametrize(
    "camera",
    [[1, 0, 0, None], "nan 0 0", {"R": 1}],
    ids=["null_entry", "nan_string", "dict"],
)
def test_bad_camera_is_skipped_as_bad_meta(tmp_path: Path, camera) -> None:
    _images(tmp_path / "in")
    good = [float(v) for v in range(12)]
    rows = [{"path": f"img{i}.jpg", "camera": camera if i == 2 else good} for i in range(5)]
    (tmp_path / "in" / "list.json").write_text(json.dumps(rows))
    report = make_media_shards.make_shards(
        make_media_shards.list_file(tmp_path / "in" / "list.json"),
        tmp_path / "out",
        samples_per_shard=2,
        workers=1,
    )
    assert report["written"] == 4 and report["skipped"] == {"bad_meta": 1}
    assert "img2.jpg" in report["examples"]["bad_meta"]
    index = MediaIndex.load(tmp_path / "out")
    assert index.num_samples == 4
    sources = {Path(s).name for s in _sources(tmp_path / "out")}
    assert sources == {"img0.jpg", "img1.jpg", "img3.jpg", "img4.jpg"}


def _sources(root: Path) -> list[str]:
    """The ``source`` of every sample's stored metadata, read back from the shards."""
    out = []
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.load(t.extractfile(m))["source"])
    return out


def test_malformed_sidecar_json_is_skipped_as_bad_meta(tmp_path: Path) -> None:
    _images(tmp_path / "in")
    (tmp_path / "in" / "img2.json").write_text("{not json")
    (tmp_path / "in" / "img3.json").write_text(json.dumps({"caption": "kept", "k": 1}))
    report = make_media_shards.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert report["written"] == 4 and report["skipped"] == {"bad_meta": 1}
    assert "img2.json" in report["examples"]["bad_meta"]
    assert MediaIndex.load(tmp_path / "o").num_samples == 4
    assert "img2.jpg" not in {Path(s).name for s in _sources(tmp_path / "o")}


def test_encode_survives_a_sample_that_fails_to_decode(tmp_path: Path) -> None:
    from lumos_mcore.encoders.tiny import save_tiny_encoders

    good = jpeg(64, 64, cls=1)
    members = []
    for i in range(6):  # each sample's own caption, to check the metadata written is its own
        members += [
            (f"good{i:02d}.jpg", jpeg(64, 64, cls=i % 4, seed=i)),
            (f"good{i:02d}.json", meta_json(caption=f"caption of good{i:02d}", class_id=i)),
        ]
    # Probes fine (intact header) but fails to decode; last of the first batch of 4, so its
    # replacement is the next batch's first sample, not one of the batch's own plans.
    members.insert(6, ("trunc.jpg", good[: len(good) // 2]))
    write_tar(tmp_path / "part-000.tar", members)
    build_media_index(tmp_path)
    enc = save_tiny_encoders(tmp_path / "enc")
    cfg = MediaDataConfig(
        path=str(tmp_path),
        modality="image",
        buckets=[[32, 32]],
        num_workers=0,
        max_bad_fraction=0.9,
        encoders=EncodersConfig(vae=str(enc["vae"]), dino=str(enc["dino"]), dino_image_size=32),
    )
    out = tmp_path / "feats"
    report = encode_features.encode_dataset(cfg, str(out), batch_size=4)
    assert report["written"] == 6
    assert sum(report["bad"].values()) == 1  # the truncated sample, counted
    ds = FeatureDataset(DataConfig(path=str(out), num_workers=0))
    keys = [ds.key(i) for i in range(len(ds))]
    assert sorted(keys) == [f"good{i:02d}" for i in range(6)]
    for i in range(len(ds)):
        meta = ds.get_or_none(i)["meta"]
        assert meta["key"] == ds.key(i)
        assert meta["caption"] == f"caption of {ds.key(i)}"
        assert meta["class_id"] == int(ds.key(i)[-2:])
        assert meta["bucket"] == [32, 32]
