"""The media tools: shard packing (folder / CSV / JSON / index-only), the synthetic generator,
offline encoding into feature shards, the decode benchmark; and online encoding feeding the
training step."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.data.features import FeatureDataset
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.media.shards import MediaIndex

from .helpers import jpeg, open_media, video, write_tar

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import benchmark_decode  # noqa: E402
import encode_features  # noqa: E402
import make_media_shards  # noqa: E402
import make_synthetic_media  # noqa: E402


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    from lumos_mcore.encoders.tiny import save_tiny_encoders

    return save_tiny_encoders(tmp_path_factory.mktemp("enc"))


def test_pack_a_folder_with_sidecars_skipping_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(jpeg(40, 48, cls=1))
    (src / "a.txt").write_text("a photo of a ring\n")
    data, ext = video("h264", 32, 32, frames=9)
    (src / "sub" / "b.mp4").write_bytes(data)
    cam = np.eye(4)[:3].tolist()
    (src / "sub" / "b.json").write_text(json.dumps({"caption": "a clip", "camera": cam, "k": 1}))
    (src / "empty.png").write_bytes(b"")
    (src / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(100))
    (src / "notes.md").write_text("ignored: not media")
    report = make_media_shards.main(["--input", str(src), "--out", str(tmp_path / "out")])
    assert report["written"] == 2
    assert report["skipped"] == {"empty": 1, "undecodable": 1}
    assert set(report["examples"]) == {"empty", "undecodable"}
    index = MediaIndex.load(tmp_path / "out")
    s = index.shards[0]
    assert s.kinds == ["image", "video"] and s.codecs == ["jpeg", "h264"]
    ds = open_media(tmp_path / "out", buckets=[[32, 32]])
    plan = ds.get_or_none(0)
    assert plan["caption"] == "a photo of a ring" and plan["meta"]["source"].endswith("a.jpg")
    vds = open_media(tmp_path / "out", modality="video", buckets=[[32, 32]], num_frames=[3])
    vplan = vds.get_or_none(0)
    assert vplan["caption"] == "a clip" and vplan["meta"]["k"] == 1
    np.testing.assert_array_equal(vplan["camera"], np.asarray(cam, np.float32).reshape(-1))
    with pytest.raises(ValueError, match="--max-bad-fraction=0.1 exceeded"):
        make_media_shards.main(
            ["--input", str(src), "--out", str(tmp_path / "o2"), "--max-bad-fraction", "0.1"]
        )


def test_pack_csv_and_json_lists(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(jpeg(32, 32))
    data, _ = video("vp9", 32, 32, frames=8)
    (tmp_path / "y.webm").write_bytes(data)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption", "camera", "source_id"])
        w.writeheader()
        w.writerow({"path": "x.jpg", "caption": "cap x", "camera": "", "source_id": "7"})
        w.writerow({"path": "y.webm", "caption": "cap y", "camera": " ".join(["0.5"] * 12)})
    make_media_shards.main(["--input", str(tmp_path / "list.csv"), "--out", str(tmp_path / "c")])
    rows = [
        {"path": str(tmp_path / "x.jpg"), "caption": "j"},
        {"path": "y.webm", "camera": [[1, 2, 3, 4]] * 3},
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    make_media_shards.main(["--input", str(tmp_path / "list.json"), "--out", str(tmp_path / "j")])
    c = open_media(tmp_path / "c", buckets=[[32, 32]]).get_or_none(0)
    assert c["caption"] == "cap x" and c["meta"]["source_id"] == "7" and c["camera"] is None
    v = open_media(tmp_path / "j", modality="video", buckets=[[32, 32]], num_frames=[2])
    assert v.get_or_none(0)["camera"].tolist() == [1, 2, 3, 4] * 3
    cv = open_media(tmp_path / "c", modality="video", buckets=[[32, 32]], num_frames=[2])
    assert cv.get_or_none(0)["camera"].tolist() == [0.5] * 12


def test_index_only_for_foreign_shards(tmp_path: Path) -> None:
    write_tar(tmp_path / "p0.tar", [("k1.jpg", jpeg()), ("k1.txt", b"hello")])
    report = make_media_shards.main(["--index-only", str(tmp_path)])
    assert report["indexed"] == 1 and report["kinds"] == {"image": 1}
    assert open_media(tmp_path, buckets=[[32, 32]]).get_or_none(0)["caption"] == "hello"


def test_synthetic_media_cli(tmp_path: Path) -> None:
    out = make_synthetic_media.main(
        ["--out", str(tmp_path / "s"), "--num-images", "3", "--num-videos", "2", "--sizes",
         "32x32", "--frames", "6", "--camera", "--samples-per-shard", "2"]
    )  # fmt: skip
    index = MediaIndex.load(out)
    assert index.num_samples == 5 and len(index.shards) == 3
    codecs = [c for s in index.shards for c in s.codecs]
    assert codecs == ["jpeg"] * 3 + ["vp9", "h264"]  # both video routes are exercised


def test_offline_features_equal_online_encoding(synth_media, tiny_encoders, tmp_path: Path) -> None:
    enc_args = [
        f"encoders.vae={tiny_encoders['vae']}",
        f"encoders.dino={tiny_encoders['dino']}",
        "encoders.dino_image_size=32",
    ]
    out = tmp_path / "feats"
    report = encode_features.main(
        ["--out", str(out), "--batch-size", "5", "--storage-dtype", "float32",
         f"path={synth_media}", "buckets=[[32,32]]", *enc_args]
    )  # fmt: skip
    assert report["written"] == 24 and report["cond_tokens"] == 1
    feats = FeatureDataset(DataConfig(path=str(out), num_workers=0))
    assert len(feats) == 24 and feats.latent_channels == 4 and feats.cond_dim == 32
    # Online: the same sample through the media dataset + encoders.
    cfg = encode_features.load_media_config(
        None, [f"path={synth_media}", "buckets=[[32,32]]", *enc_args]
    )
    media = MediaDataset(cfg)
    from lumos_mcore.encoders.frozen import FrozenEncoders

    online = FrozenEncoders(cfg.encoders).encode(media.collate([media.get_or_none(3)]))
    key = media.key(3)
    j = next(i for i in range(len(feats)) if feats.key(i) == key)
    sample = feats.get(j)
    torch.testing.assert_close(sample["latent"], online["latent"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample["cond"], online["cond"][0], atol=1e-5, rtol=1e-5)
    assert sample["meta"]["caption"].startswith("a ") and sample["meta"]["bucket"] == [32, 32]


def test_online_batches_train_a_lumos_model(synth_media, tiny_encoders) -> None:
    """Raw media -> DP-aware prefetching iterator -> frozen encoders -> a Lumos model's loss.

    The model is the pure-PyTorch Lumos reference class with the repo's flow objective; the
    encoders get no gradients, the model does, and steps on a fixed micro-batch cut the loss.
    """
    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.encoders.frozen import FrozenEncoders, OnlineEncodingIterator
    from lumos_mcore.hf.lumos_transformer_2d import LumosTransformer2DModel

    torch.manual_seed(0)
    cfg = MediaDataConfig(
        path=str(synth_media),
        buckets=[[32, 32]],
        num_workers=1,
        encoders=EncodersConfig(
            vae=str(tiny_encoders["vae"]), dino=str(tiny_encoders["dino"]), dino_image_size=32
        ),
    )
    media = MediaDataset(cfg)
    enc = FrozenEncoders(cfg.encoders)
    it = media.iterator(global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1)
    online = OnlineEncodingIterator(it, enc)
    batch = next(online)
    assert batch["latent"].shape == (4, 4, 4, 4) and batch["cond"].shape == (4, 1, 32)
    assert batch["cond_mask"].all() and batch["latent"].requires_grad is False
    assert online.consumed_samples == 4 and online.state_dict() == {"consumed_samples": 4}
    model = LumosTransformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4,
        cond_channels=32, cond_tokens=1, learn_sigma=False,
    )  # fmt: skip
    objective = build_objective(DiffusionConfig(objective="flow", learn_sigma=False))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        x0 = batch["latent"]
        t = objective.sample_timesteps(4, generator=g)  # [B]
        noise = torch.randn(x0.shape, generator=g)  # [B, C, H, W]
        x_t = objective.add_noise(x0, noise, t)
        out = model(x_t, objective.model_timesteps(t), batch["cond"], batch["cond_mask"]).sample
        loss = objective.loss_terms(out, x0=x0, x_t=x_t, noise=noise, t=t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert all(p.grad is None for p in enc.vae.vae.parameters())
    assert all(p.grad is None for p in enc.dino.model.parameters())
    assert next(online)["index"].shape == (4,) and online.consumed_samples == 8
    online.close()


def test_decode_benchmark_runs_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = benchmark_decode.main(
        ["--synthetic-videos", "4", "--size", "32x32", "--frames", "10", "--bucket", "32", "32",
         "--num-frames", "4", "--stride", "2", "--batch", "2", "--repeats", "1",
         "--stall-steps", "2", "--step-ms", "5", "--json", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["samples"] == 4 and saved["codec"] == "vp9"
    names = [r["decoder"] for r in saved["throughput"]]
    assert names[-1] == "pyav" and set(names) <= {"dali", "pyav"}
    for r in saved["throughput"]:
        assert r["frames_per_pass"] == 16 and r["passes"] == 1 and r["frames_per_s"] > 0
        assert r["routes"] == {f"video/vp9/{r['decoder']}": 4}
    assert all(0.0 <= s["stall_fraction"] <= 1.0 for s in res["stall"])
