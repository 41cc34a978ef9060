"""FeatureDataset: bad-sample handling on real broken files, collation, config validation."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.features import BadDataError, BadSampleError, MicroBatchIterator
from lumos_mcore.data.sampler import GlobalOrder
from lumos_mcore.data.shards import COND, LATENT, MEMBER_COLUMN, DatasetIndex, build_index

from .conftest import open_dataset, write_random_dataset


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(rng: np.random.Generator) -> dict[str, bytes]:
    return {
        "latent.npy": _npy(rng.normal(size=(4, 6, 6)).astype(np.float16)),
        "cond.npy": _npy(rng.normal(size=(1, 8)).astype(np.float16)),
        "meta.json": b"{}",
    }


def _broken_dataset(root: Path) -> dict[str, str]:
    """Three shards of 8 with one bad sample per kind; returns key -> expected reason."""
    root.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    shards: list[list[tuple[str, dict[str, bytes]]]] = [[], [], []]
    for s in range(3):
        for j in range(8):
            shards[s].append((f"k{s}_{j}", _good(rng)))

    def breaks(s: int, j: int, reason: str, **members: bytes | None) -> None:
        key, m = shards[s][j]
        for name, data in members.items():
            name = name.replace("_", ".", 1) if name != "cond_mask_npy" else "cond_mask.npy"
            if data is None:
                del m[name]
            else:
                m[name] = data
        expected[key] = reason

    # Missing member: no cond.npy at all.
    breaks(0, 2, "missing_member", cond_npy=None)
    # Undecodable: garbage bytes in latent.npy; a meta.json that is not JSON.
    breaks(0, 5, "undecodable", latent_npy=bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    breaks(1, 1, "undecodable", meta_json=b"{not json")
    # Wrong rank / shape: 2-D latent, cond with the wrong width, a mask of the wrong length.
    breaks(1, 3, "bad_shape", latent_npy=_npy(np.zeros((6, 6), np.float16)))
    breaks(1, 6, "bad_shape", cond_npy=_npy(np.zeros((1, 9), np.float16)))
    breaks(2, 0, "bad_shape", cond_mask_npy=_npy(np.ones(3, bool)))
    # NaN in a latent.
    nan = np.zeros((4, 6, 6), np.float16)
    nan[1, 2, 3] = np.nan
    breaks(2, 4, "non_finite", latent_npy=_npy(nan))
    for s in range(3):
        _write_tar(root / f"part-{s}.tar", shards[s])
    build_index(root)
    return expected


def test_each_bad_case_is_counted_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = _broken_dataset(tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds", max_bad_fraction=0.5, num_workers=2)
    for i in range(len(ds)):
        if ds.key(i) in expected:
            with pytest.raises(BadSampleError) as err:
                ds.get(i)
            assert err.value.reason == expected[ds.key(i)]
            assert ds.get_or_none(i) is None
        else:
            assert ds.get(i)["latent"].shape == (4, 6, 6)
    want = {"missing_member": 1, "truncated": 0, "undecodable": 2, "bad_shape": 3, "non_finite": 1}
    assert ds.bad_counts == want

    # Through the iterator: bad positions are filled with the next good sample in the order.
    caplog.set_level(logging.WARNING, logger="lumos_mcore.data.features")
    caplog.clear()
    ds = open_dataset(tmp_path / "ds", max_bad_fraction=0.5, num_workers=2, seed=4)
    with MicroBatchIterator(
        ds, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1
    ) as it:
        got = torch.cat([next(it)["index"] for _ in range(6)]).tolist()  # one epoch of 24
    bad = {i for i in range(len(ds)) if ds.key(i) in expected}
    order = GlobalOrder(ds.shard_sizes, seed=4, shards_per_block=ds.cfg.shuffle_shards_per_block)
    seq = order.indices(0, 30).tolist()
    ref = []
    for p in range(24):
        q = p
        while seq[q] in bad:
            q += 1
        ref.append(seq[q])
    assert got == ref
    assert ds.bad_counts == want
    warned = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(warned) == 4  # once per reason
    assert {w.split("'")[1] for w in warned} == {
        "missing_member",
        "undecodable",
        "bad_shape",
        "non_finite",
    }


def test_truncated_shard(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    written = write_random_dataset(root, num_samples=24, samples_per_shard=8)
    index = DatasetIndex.load(root)
    shard = index.shards[1]
    # Cut the file in the middle of the latent.npy of its 7th sample (interrupted copy).
    cut = int(shard.offsets[6, MEMBER_COLUMN[LATENT]]) + 40
    with open(root / shard.name, "r+b") as f:
        f.truncate(cut)
    ds = open_dataset(root, max_bad_fraction=0.25)
    for i in range(24):
        sample = ds.get_or_none(i)
        if i in (14, 15):
            assert sample is None
        else:
            np.testing.assert_array_equal(
                sample["latent"].numpy(), written[i]["latent"].astype(np.float16).astype(np.float32)
            )
    assert ds.bad_counts["truncated"] == 2 and ds.num_bad == 2


def test_max_bad_fraction_names_the_shard(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_random_dataset(root, num_samples=16, samples_per_shard=8)
    index = DatasetIndex.load(root)
    shard = index.shards[1]
    with open(root / shard.name, "r+b") as f:  # garbage over two cond.npy members of shard 1
        for row in (2, 5):
            f.seek(int(shard.offsets[row, MEMBER_COLUMN[COND]]))
            f.write(b"\xde\xad\xbe\xef" * 8)
    # Default 0.01: the first bad sample of an 8-sample shard is already too many.
    ds = open_dataset(root)
    msg = rf"data.max_bad_fraction=0.01 exceeded in shard .*{shard.name}: 1 of 8 samples bad"
    with pytest.raises(BadDataError, match=msg):
        ds.get(8 + 2)
    # 0.2 tolerates one (1 <= 1.6) but not two; the error reaches the consumer of the iterator.
    ds = open_dataset(root, max_bad_fraction=0.2, num_workers=2, shuffle=False)
    assert ds.get_or_none(10) is None and ds.bad_counts["undecodable"] == 1
    it = MicroBatchIterator(ds, global_batch_size=16, micro_batch_size=4, dp_rank=0, dp_size=1)
    for _ in range(3):  # positions 0..11; sample 10 is replaced by 11
        next(it)
    with pytest.raises(
        BadDataError, match=rf"{shard.name}: 2 of 8 samples bad \{{'undecodable': 2\}}"
    ):
        next(it)
    it.close()


def test_missing_or_rewritten_shard_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_random_dataset(root, num_samples=8, samples_per_shard=4)
    with open(root / "features-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="rewritten after indexing"):
        open_dataset(root)
    os.remove(root / "features-000001.tar")
    with pytest.raises(
        FileNotFoundError, match=r"shard .*features-000001.tar listed in index.json is missing"
    ):
        open_dataset(root)


def test_a_data_set_rewritten_during_the_run_stops_it(tmp_path: Path) -> None:
    """A shard replaced after the index was read is refused when opened (its offsets would
    read another data set's bytes), also from a pickled worker copy; a descriptor opened before
    the rewrite still reads the old bytes, which its index describes."""
    import pickle

    from lumos_mcore.data.shard_files import ShardChangedError

    root = tmp_path / "ds"
    old = write_random_dataset(root, num_samples=8, samples_per_shard=4)
    ds = open_dataset(root)
    clone = pickle.loads(pickle.dumps(ds))
    ds.get(0)  # shard 0 open in this thread
    os.remove(root / "index.json")  # what an overwrite does first, then it renames new shards
    write_random_dataset(root, num_samples=8, samples_per_shard=4, seed=1)
    got = ds.get(1)["latent"].numpy()
    np.testing.assert_array_equal(got, old[1]["latent"].astype(np.float16).astype(np.float32))
    with pytest.raises(ShardChangedError, match=r"features-000001.tar changed after its index"):
        ds.get(5)
    with pytest.raises(ShardChangedError, match="restart the job"):
        clone.get(0)
    ds.close()
    with pytest.raises(ShardChangedError):
        ds.get_or_none(0)  # not a bad sample: nothing is counted, the run stops
    assert ds.num_bad == 0
    assert open_dataset(root).get(5) is not None  # a fresh open reads the new data set


def test_mixed_latent_shapes_in_a_batch_name_the_sample(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    from lumos_mcore.data.shards import FeatureShardWriter

    with FeatureShardWriter(root, samples_per_shard=4) as w:
        for i in range(6):
            size = 8 if i != 3 else 12
            w.write(np.zeros((4, size, size)), np.zeros((1, 16)), key=f"img{i}")
    ds = open_dataset(root, shuffle=False, num_workers=1)
    it = MicroBatchIterator(ds, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1)
    next(it)
    with pytest.raises(
        ValueError, match=r"sample 'img3' has latent shape \(4, 12, 12\) but sample 'img2'"
    ):
        next(it)
    it.close()


def test_required_shape_skips_and_counts_odd_samples(tmp_path: Path) -> None:
    """What the trainer does for unpacked runs: a sample of another latent shape is a counted
    bad sample, replaced by the next good one (recorded shapes up front, unrecorded on read),
    so a stray resolution never stops the run."""
    from lumos_mcore.data.shards import FeatureShardWriter

    root = tmp_path / "ds"
    with FeatureShardWriter(root, samples_per_shard=8) as w:
        for i in range(16):
            size = 12 if i == 3 else 8
            w.write(np.zeros((4, size, size)), np.zeros((1, 16)), key=f"img{i}")
    ds = open_dataset(root, shuffle=False, max_bad_fraction=0.2)
    assert ds.require_latent_shape() == (4, 8, 8)
    assert ds.bad_counts["bad_shape"] == 1 and ds.is_known_bad(3)  # rejected without a read
    it = MicroBatchIterator(ds, global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1)
    batches = [next(it) for _ in range(4)]  # the whole epoch, no crash
    it.close()
    assert all(b["latent"].shape == (4, 4, 8, 8) for b in batches)
    seen = [i for b in batches for i in b["index"].tolist()]
    assert 3 not in seen and seen[:5] == [0, 1, 2, 4, 4]  # replaced by the next good sample
    # A shape index.json does not record is caught when the sample is read.
    fresh = open_dataset(root, shuffle=False, max_bad_fraction=0.2)
    fresh._latent_shapes[3] = -1  # as if index.json recorded no shape for it
    fresh.require_latent_shape((4, 8, 8))
    assert fresh.get_or_none(3) is None and fresh.bad_counts["bad_shape"] == 1


def test_required_shape_refuses_a_mixed_size_dataset(tmp_path: Path) -> None:
    from lumos_mcore.data.shards import FeatureShardWriter

    root = tmp_path / "ds"
    with FeatureShardWriter(root, samples_per_shard=8) as w:
        for i in range(16):
            w.write(np.zeros((4, 8, 8 + 4 * (i % 2))), np.zeros((1, 16)), key=f"img{i}")
    with pytest.raises(ValueError, match=r"several shapes.*data.pack=true"):
        open_dataset(root).require_latent_shape()


def test_video_latents_and_condition_padding(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    written = write_random_dataset(
        root,
        num_samples=6,
        samples_per_shard=6,
        latent_shape=(4, 3, 8, 8),
        cond_shape=(5, 16),
        with_mask=True,
    )
    ds = open_dataset(root, shuffle=False, cond_pad_to=7)
    it = MicroBatchIterator(ds, global_batch_size=6, micro_batch_size=3, dp_rank=0, dp_size=1)
    batch = next(it)
    assert batch["latent"].shape == (3, 4, 3, 8, 8)
    assert batch["cond"].shape == (3, 7, 16) and batch["cond_mask"].shape == (3, 7)
    for j in range(3):
        mask = written[j]["cond_mask"]
        np.testing.assert_array_equal(batch["cond_mask"][j, :5].numpy(), mask)
        assert not batch["cond_mask"][j, 5:].any()
        np.testing.assert_array_equal(
            batch["cond"][j, :5].numpy(), written[j]["cond"].astype(np.float16).astype(np.float32)
        )
        assert not batch["cond"][j, 5:].any()
    ds = open_dataset(root, shuffle=False, cond_pad_to=4)
    with pytest.raises(
        ValueError, match=r"sample 's00000' has 5 condition tokens > data.cond_pad_to=4"
    ):
        next(MicroBatchIterator(ds, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1))


def test_dataset_pickles_for_worker_processes(small_dataset: Path) -> None:
    import pickle

    ds = open_dataset(small_dataset)
    ds.get(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.get(5)["latent"], ds.get(5)["latent"])
    ds.close()
    assert torch.equal(ds.get(30)["cond"], clone.get(30)["cond"])  # reopens after close


def test_data_config_validation(small_dataset: Path, tmp_path: Path) -> None:
    ok = DataConfig(path=str(small_dataset))
    assert (ok.kind, ok.num_workers, ok.seed, ok.max_bad_fraction) == ("features", 1, 0, 0.01)
    cases = [
        (
            dict(path=str(tmp_path / "nope")),
            r"data.path=.*nope: no index.json found; run tools/make_synthetic_shards.py",
        ),
        (dict(path=""), "data.path='': required"),
        (
            dict(path=str(small_dataset), kind="videos"),
            r"data.kind='videos': unsupported; choose one of \('features',\)",
        ),
        (dict(path=str(small_dataset), num_workers=-1), "data.num_workers=-1"),
        (dict(path=str(small_dataset), prefetch=0), "data.prefetch=0"),
        (dict(path=str(small_dataset), seed=-2), "data.seed=-2"),
        (
            dict(path=str(small_dataset), max_bad_fraction=1.5),
            r"data.max_bad_fraction=1.5: must be in \[0, 1\]",
        ),
        (
            dict(path=str(small_dataset), shuffle_shards_per_block=0),
            "data.shuffle_shards_per_block=0",
        ),
        (dict(path=str(small_dataset), cond_pad_to=0), "data.cond_pad_to=0"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            DataConfig(**kwargs)
    # A corrupt index.json is reported with its path.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"index.json: not a lumos-features v1 index"):
        open_dataset(tmp_path / "bad")


def test_fast_npy_parser_matches_numpy() -> None:
    from lumos_mcore.data.features import _parse_npy

    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(4, 5, 6)).astype(np.float16),
        rng.normal(size=(3, 7)).astype(">f4"),  # big-endian
        np.asfortranarray(rng.normal(size=(5, 3))),  # Fortran order
        np.arange(7) % 2 == 0,
        np.float32(3.5).reshape(()),  # 0-d
        np.zeros((2, 0, 3), np.float32),  # empty
    ]
    for a in arrays:
        for version in ((1, 0), (2, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=version)
            raw = buf.getvalue()
            got = _parse_npy(memoryview(raw))
            ref = np.load(io.BytesIO(raw))
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
            with pytest.raises(ValueError, match="bytes, header"):
                if a.size:
                    _parse_npy(raw[:-1])
                else:
                    _parse_npy(raw + b"\0")
    with pytest.raises(ValueError, match="not an .npy file"):
        _parse_npy(b"garbage bytes here")
