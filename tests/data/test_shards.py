"""Shard writer / index: round trip, seekable offsets, webdataset compatibility, atomicity."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.shards import (
    INDEX_NAME,
    MEMBER_COLUMN,
    DatasetIndex,
    FeatureShardWriter,
    build_index,
)

from .conftest import open_dataset, write_random_dataset


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_round_trip_writer_reader(tmp_path: Path, storage_dtype: str) -> None:
    written = write_random_dataset(
        tmp_path / "ds",
        num_samples=21,
        samples_per_shard=5,
        cond_shape=(6, 12),
        storage_dtype=storage_dtype,
        with_mask=True,
    )
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 21
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.tar")) == [
        f"features-{i:06d}.tar" for i in range(5)
    ]
    for i, ref in enumerate(written):
        got = ds.get(i)
        # Reference: the writer's input rounded through the storage dtype, read back as float32.
        lat = ref["latent"].astype(storage_dtype).astype(np.float32)
        cond = ref["cond"].astype(storage_dtype).astype(np.float32)
        np.testing.assert_array_equal(got["latent"].numpy(), lat)
        np.testing.assert_array_equal(got["cond"].numpy(), cond)
        np.testing.assert_array_equal(got["cond_mask"].numpy(), ref["cond_mask"])
        assert str(got["latent"].dtype) == "torch.float32"
        assert got["key"] == ref["key"]
        assert got["meta"] == {**ref["meta"], "key": ref["key"]}
        assert int(got["index"]) == i
    if storage_dtype == "float16":
        # fp16 storage is lossy only at fp16 resolution.
        assert np.abs(ds.get(0)["latent"].numpy() - written[0]["latent"]).max() < 4e-3
    assert ds.bad_counts == dict.fromkeys(ds.bad_counts, 0)


def test_index_offsets_point_at_member_bytes(small_dataset: Path) -> None:
    """Independent check with tarfile: every indexed (offset, size) is the member's data."""
    index = DatasetIndex.load(small_dataset)
    assert index.num_samples == 37 and [s.num_samples for s in index.shards] == [8] * 4 + [5]
    for shard in index.shards:
        path = small_dataset / shard.name
        assert path.stat().st_size == shard.size_bytes
        blob = path.read_bytes()
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert len(members) == 3 * shard.num_samples  # latent, cond, meta (no mask)
            for row, key in enumerate(shard.keys):
                for name, col in MEMBER_COLUMN.items():
                    m = members.get(f"{key}.{name}")
                    if m is None:
                        assert shard.offsets[row, col] == -1
                        continue
                    assert shard.offsets[row, col] == m.offset_data
                    assert shard.sizes[row, col] == m.size
                    off = int(shard.offsets[row, col])
                    assert blob[off : off + m.size] == tar.extractfile(m).read()


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    written = write_random_dataset(
        tmp_path / "ds", num_samples=13, samples_per_shard=4, cond_shape=(3, 8), with_mask=True
    )
    urls = sorted(str(p) for p in (tmp_path / "ds").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [w["key"] for w in written]
    for s, ref in zip(samples, written):
        assert s["latent.npy"].dtype == np.float16
        np.testing.assert_array_equal(s["latent.npy"], ref["latent"].astype(np.float16))
        np.testing.assert_array_equal(s["cond.npy"], ref["cond"].astype(np.float16))
        np.testing.assert_array_equal(s["cond_mask.npy"], ref["cond_mask"])
        assert s["meta.json"]["caption"] == ref["meta"]["caption"]


def test_shards_are_byte_reproducible(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_random_dataset(tmp_path / name, num_samples=9, samples_per_shard=4, seed=3)
    for f in ["index.json"] + [f"features-{i:06d}.tar" for i in range(3)]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_interrupted_writer_leaves_no_final_name_for_partial_shard(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    rng = np.random.default_rng(0)
    with (
        pytest.raises(RuntimeError, match="simulated crash"),
        FeatureShardWriter(out, samples_per_shard=4) as w,
    ):
        for i in range(6):
            w.write(rng.normal(size=(4, 8, 8)), rng.normal(size=(1, 16)))
            if i == 5:  # shard 0 complete, shard 1 half written
                assert any(p.name.startswith(".features-000001.tar.tmp") for p in out.iterdir())
                raise RuntimeError("simulated crash")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["features-000000.tar"]  # complete shard kept; no partial, no temp, no index
    with tarfile.open(out / "features-000000.tar") as tar:
        assert len(tar.getmembers()) == 4 * 3
    with pytest.raises(
        ValueError, match=r"data.path=.*: no index.json found; run tools/make_synthetic_shards.py"
    ):
        DataConfig(path=str(out))


def test_writer_refuses_to_clobber_and_validates(tmp_path: Path) -> None:
    write_random_dataset(tmp_path / "ds", num_samples=2, samples_per_shard=4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        FeatureShardWriter(tmp_path / "ds")
    w = FeatureShardWriter(tmp_path / "new")
    w.write(np.zeros((4, 8, 8)), np.zeros((1, 16)), key="a")
    cases = [
        (dict(latent=np.zeros((3, 8, 8)), cond=np.zeros((1, 16))), "3 channels|4 channels"),
        (dict(latent=np.zeros((4, 8, 8)), cond=np.zeros((1, 15))), "cond dim 15"),
        (dict(latent=np.zeros((8, 8)), cond=np.zeros((1, 16))), r"expected \[C, H, W\]"),
        (dict(latent=np.zeros((4, 8, 8)), cond=np.zeros((1, 16)), key="a"), "written twice"),
        (dict(latent=np.zeros((4, 8, 8)), cond=np.zeros((1, 16)), key="x.y"), "no '.'"),
        (dict(latent=np.full((4, 8, 8), 1e6), cond=np.zeros((1, 16))), "overflows float16"),
        (
            dict(latent=np.zeros((4, 8, 8)), cond=np.zeros((2, 16)), cond_mask=np.ones(3, bool)),
            "cond_mask shape",
        ),
    ]
    for kwargs, msg in cases:
        latent, cond = kwargs.pop("latent"), kwargs.pop("cond")
        with pytest.raises(ValueError, match=msg):
            w.write(latent, cond, **kwargs)
    assert json.loads(w.close().read_text())["num_samples"] == 1


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_build_index_for_shards_from_another_pipeline(tmp_path: Path) -> None:
    """Shards written with webdataset's TarWriter (float32, an extra .txt member) get indexed."""
    out = tmp_path / "foreign"
    out.mkdir()
    rng = np.random.default_rng(1)
    ref = {}
    for s in range(2):
        with wds.TarWriter(str(out / f"part-{s:03d}.tar")) as tw:
            for j in range(5):
                key = f"img{s}_{j}"
                lat = rng.normal(size=(4, 6, 6)).astype(np.float32)
                cond = rng.normal(size=(2, 8)).astype(np.float32)
                ref[key] = (lat, cond)
                tw.write(
                    {
                        "__key__": key,
                        "latent.npy": _npy(lat),
                        "cond.npy": _npy(cond),
                        "txt": "a caption",
                    }
                )
    index = build_index(out)
    assert (out / INDEX_NAME).is_file()
    assert (index.latent_channels, index.latent_rank, index.cond_dim) == (4, 3, 8)
    assert index.storage_dtype == "float32"
    ds = open_dataset(out)
    assert len(ds) == 10
    for i in range(10):
        got = ds.get(i)
        lat, cond = ref[got["key"]]
        np.testing.assert_array_equal(got["latent"].numpy(), lat)
        np.testing.assert_array_equal(got["cond"].numpy(), cond)
        assert got["cond_mask"].all() and got["meta"] == {}


def test_build_index_matches_writer_index(small_dataset: Path) -> None:
    written = DatasetIndex.load(small_dataset)
    scanned = build_index(small_dataset, write=False)
    assert [s.name for s in scanned.shards] == [s.name for s in written.shards]
    for a, b in zip(scanned.shards, written.shards):
        assert a.keys == b.keys and a.size_bytes == b.size_bytes
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.sizes, b.sizes)
        assert a.latent_shapes == b.latent_shapes and a.cond_shapes == b.cond_shapes
    assert (scanned.latent_channels, scanned.cond_dim, scanned.storage_dtype) == (4, 16, "float16")
