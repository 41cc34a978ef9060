"""Shard-writer overwrite safety and corrupt-header detection in ``lumos_mcore.data.tar_index``:
an interrupted rewrite must leave no dataset (not an old index over new bytes), a smaller
rewrite no stale shard, and a corrupt header mid-shard must be reported, not silently ignored."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.media.shards import build_media_index
from lumos_mcore.data.shards import FeatureShardWriter, build_index
from lumos_mcore.data.tar_index import scan_tar

from .conftest import open_dataset, write_random_dataset


def _write(out: Path, n: int, *, prefix: str = "b", overwrite: bool = True) -> None:
    rng = np.random.default_rng(1)
    with FeatureShardWriter(out, samples_per_shard=4, overwrite=overwrite) as w:
        for i in range(n):
            w.write(rng.normal(size=(4, 8, 8)), rng.normal(size=(1, 16)), key=f"{prefix}{i}")


def test_interrupted_overwrite_leaves_no_index(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_random_dataset(out, num_samples=8, samples_per_shard=4)  # old: 2 shards, keys s*
    rng = np.random.default_rng(1)
    with (
        pytest.raises(RuntimeError, match="killed"),
        FeatureShardWriter(out, samples_per_shard=4, overwrite=True) as w,
    ):
        for i in range(6):  # shard 0 replaced by new bytes, shard 1 in progress
            w.write(rng.normal(size=(4, 8, 8)), rng.normal(size=(1, 16)), key=f"b{i}")
        raise RuntimeError("killed mid-rewrite")
    # The old index would describe keys s0..s7 over b0..b3's bytes: it must be gone.
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match="no index.json found"):
        DataConfig(path=str(out))


def test_overwrite_that_replaces_nothing_keeps_the_old_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_random_dataset(out, num_samples=8, samples_per_shard=4)
    with pytest.raises(RuntimeError), FeatureShardWriter(out, overwrite=True) as w:
        w.write(np.zeros((4, 8, 8)), np.zeros((1, 16)), key="x")  # shard never finished
        raise RuntimeError("failed before any shard was replaced")
    ds = open_dataset(out)
    assert len(ds) == 8 and ds.key(0) == "s00000"


def test_smaller_overwrite_removes_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_random_dataset(out, num_samples=12, samples_per_shard=4)  # 3 shards
    (out / "notes-000009.tar").write_bytes(b"not ours")  # other names are left alone
    (out / "features-extra.tar").write_bytes(b"not ours either")
    _write(out, 5)  # 2 shards
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "features-000000.tar",
        "features-000001.tar",
        "features-extra.tar",
        "index.json",
        "notes-000009.tar",
    ]
    ds = open_dataset(out)
    assert [ds.key(i) for i in range(len(ds))] == [f"b{i}" for i in range(5)]
    for i in range(len(ds)):
        assert ds.get_or_none(i)["meta"]["key"] == ds.key(i)
    # Re-indexing the folder from its shards finds exactly the new dataset.
    assert build_index(out, pattern="features-*.tar", write=False).num_samples == 5


def _corrupt_middle_header(tar_path: Path, key_prefix: str) -> int:
    """Break the header checksum of the first member of ``key_prefix``; returns its offset."""
    with tarfile.open(tar_path) as t:
        victim = next(m for m in t.getmembers() if m.name.startswith(key_prefix))
    b = bytearray(tar_path.read_bytes())
    b[victim.offset + 148 : victim.offset + 156] = b"XXXXXXXX"  # header checksum field
    tar_path.write_bytes(bytes(b))
    return victim.offset


def test_corrupt_middle_header_is_reported(tmp_path: Path, caplog) -> None:
    out = tmp_path / "ds"
    write_random_dataset(out, num_samples=10, samples_per_shard=100)
    (out / "index.json").unlink()
    tar = out / "features-000000.tar"
    offset = _corrupt_middle_header(tar, "s00003.")
    damage: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.data.tar_index"):
        keys = {k for k, _, _ in scan_tar(tar, damage=damage)}
    assert keys == {"s00000", "s00001", "s00002"}
    assert damage == {"offset": offset, "lost_bytes": tar.stat().st_size - offset}
    assert any(
        str(tar) in r.getMessage() and f"byte {offset}" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.data.tar_index"):
        index = build_index(out, write=False)
    assert index.num_samples == 3
    assert any(f"byte {offset}" in r.getMessage() for r in caplog.records)
    lost = {"offset": offset, "lost_bytes": tar.stat().st_size - offset}
    assert index.extra["damaged_shards"] == {tar.name: lost}  # recorded in index.json


def test_corrupt_middle_header_of_media_shard_is_reported(tmp_path: Path, caplog) -> None:
    from .media.helpers import jpeg, write_tar

    tar = write_tar(tmp_path / "part-000.tar", [(f"k{i}.jpg", jpeg(seed=i)) for i in range(5)])
    offset = _corrupt_middle_header(tar, "k2.")
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.data.tar_index"):
        index = build_media_index(tmp_path, write=False)
    assert index.shards[0].keys == ["k0", "k1"]
    lost = {"offset": offset, "lost_bytes": tar.stat().st_size - offset}
    assert index.extra["damaged_shards"] == {tar.name: lost}
    assert any(
        str(tar) in r.getMessage() and f"byte {offset}" in r.getMessage() for r in caplog.records
    )
    # Through a file object (as build_media_index scans) the region is measured the same way.
    damage: dict[str, int] = {}
    with open(tar, "rb") as f:
        list(scan_tar(f, damage=damage))
    assert damage == {"offset": offset, "lost_bytes": tar.stat().st_size - offset}


@pytest.mark.parametrize("tail", [0, 1, 7])
def test_clean_tars_report_no_damage(tmp_path: Path, caplog, tail: int) -> None:
    """End-of-archive zero blocks and record padding (any amount) are not damage."""
    path = tmp_path / "a.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = 5
            t.addfile(info, io.BytesIO(b"hello"))
    path.write_bytes(buf.getvalue() + bytes(512 * tail))
    damage: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.data.tar_index"):
        assert len(list(scan_tar(path, damage=damage))) == 3
    assert damage == {} and not caplog.records
    write_random_dataset(tmp_path / "w", num_samples=3, samples_per_shard=4)
    assert len(list(scan_tar(tmp_path / "w" / "features-000000.tar", damage=damage))) == 9
    assert damage == {}
