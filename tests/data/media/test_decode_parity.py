"""DALI and PyAV produce the same tensors; codec routing; fallback without DALI."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import lumos_mcore.data.media.decode as decode_mod
from lumos_mcore.data.media.buckets import Bucket, crop_roi
from lumos_mcore.data.media.dali_decode import DecodeRequest, codecs_for
from lumos_mcore.data.media.decode import MediaDecoder, decode_pyav
from lumos_mcore.data.media.pyav_decode import decode_video_frames
from lumos_mcore.data.media.synthetic import encode_jpeg, encode_video, render_clip

H, W, T = 48, 64, 20
LEVEL = 1 / 127.5  # one 8-bit level in [-1, 1] units


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return render_clip(5, H, W, T, seed=1, jitter=0)  # [T, H, W, 3]


@pytest.fixture(scope="module")
def vp9(clip) -> bytes:
    return encode_video(clip, "vp9")[0]


def _req(data: bytes, kind: str, codec: str, bucket: Bucket, start=0, stride=1, hw=(H, W)):
    return DecodeRequest(
        data=data,
        kind=kind,
        codec=codec,
        source_hw=hw,
        roi=crop_roi(*hw, bucket),
        size=(bucket.height, bucket.width),
        start=start,
        count=bucket.frames,
        stride=stride,
    )


def test_pyav_returns_the_requested_frames(clip, vp9) -> None:
    """Frame k of the decode is closest to rendered frame k (the shape moves every frame)."""
    ids = [1, 4, 7, 10, 13]
    frames, hw = decode_video_frames(vp9, ids)
    assert frames.shape == (5, H, W, 3) and hw == (H, W)
    err = np.abs(frames[:, None].astype(int) - clip[None].astype(int)).mean((2, 3, 4))  # [5, T]
    assert err.argmin(1).tolist() == ids
    assert err.min(1).max() < 6  # VP9 at crf 24: a few levels


@pytest.mark.parametrize(
    ("bucket", "start", "stride"),
    [
        (Bucket(H, W, 6), 0, 1),  # no resize: the decoded frames themselves
        (Bucket(32, 32, 4), 3, 3),  # crop to square + downscale, stride 3 from frame 3
        (Bucket(64, 96, 5), 2, 2),  # upscale
    ],
)
def test_dali_and_pyav_agree_on_vp9(vp9, bucket, start, stride) -> None:
    pytest.importorskip("nvidia.dali")
    dec = MediaDecoder(backend="dali", dali_device="cpu")
    req = _req(vp9, "video", "vp9", bucket, start, stride)
    assert dec.route(req) == "dali"
    dali = dec.decode([req])[0]
    pyav = decode_pyav(req)
    assert isinstance(dali, torch.Tensor) and dali.shape == pyav.shape == bucket.shape
    diff = (dali - pyav).abs()
    # YUV->RGB rounding may differ by one level; resampling adds only float rounding.
    assert diff.max() <= 1.01 * LEVEL, diff.max() / LEVEL
    assert diff.mean() < 0.05 * LEVEL
    assert dec.routes[("video", "vp9", "dali")] == 1


def test_dali_and_pillow_agree_on_jpeg() -> None:
    pytest.importorskip("nvidia.dali")
    img = render_clip(2, 57, 83, 1, seed=0, jitter=1)[0]
    data = encode_jpeg(img)
    dec = MediaDecoder(backend="dali", dali_device="cpu")
    for bucket in (Bucket(32, 48, 1), Bucket(57, 83, 1), Bucket(64, 64, 1)):
        req = _req(data, "image", "jpeg", bucket, hw=(57, 83))
        dali, ref = dec.decode([req])[0], decode_pyav(req)
        assert (dali - ref).abs().max() < 1e-3 * LEVEL * 127.5  # same libjpeg-turbo decode


def test_codec_routing_and_log_once(caplog, clip, vp9) -> None:
    pytest.importorskip("nvidia.dali")
    h264 = encode_video(clip, "h264")[0]
    jpg = encode_jpeg(clip[0])
    dec = MediaDecoder(backend="auto", dali_device="cpu")
    b = Bucket(32, 32, 4)
    reqs = [
        _req(vp9, "video", "vp9", b),
        _req(h264, "video", "h264", b),
        _req(jpg, "image", "jpeg", Bucket(32, 32, 1)),
    ]
    assert [dec.route(r) for r in reqs] == ["dali", "pyav", "dali"]
    assert "h264" not in codecs_for("cpu") and "h264" in codecs_for("gpu")
    with caplog.at_level(logging.INFO, logger="lumos_mcore.data.media.decode"):
        for _ in range(3):
            outs = dec.decode(reqs)
    assert all(isinstance(o, torch.Tensor) for o in outs)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("decoding video h264 with PyAV/Pillow (CPU)") == 1
    assert msgs.count("decoding video vp9 with DALI (cpu)") == 1
    assert msgs.count("decoding image jpeg with DALI (cpu)") == 1
    assert dec.routes == {
        ("video", "vp9", "dali"): 3,
        ("video", "h264", "pyav"): 3,
        ("image", "jpeg", "dali"): 3,
    }
    # H.264 through PyAV equals its own reference decode (same route, same tensor).
    torch.testing.assert_close(outs[1], decode_pyav(reqs[1]), atol=0, rtol=0)


def test_dali_failure_falls_back_to_pyav_with_one_warning(monkeypatch, caplog, vp9) -> None:
    """A sample DALI cannot decode (here: its decoder reports an error) is decoded by PyAV, kept,
    counted as a PyAV route, and the switch is warned about once."""
    pytest.importorskip("nvidia.dali")
    from lumos_mcore.data.media.pyav_decode import DecodeError

    dec = MediaDecoder(backend="dali", dali_device="cpu")
    monkeypatch.setattr(
        dec.dali, "decode", lambda reqs: [DecodeError("undecodable", "NVDEC missing")] * len(reqs)
    )
    req = _req(vp9, "video", "vp9", Bucket(32, 32, 4))
    with caplog.at_level(logging.INFO, logger="lumos_mcore.data.media.decode"):
        outs = [dec.decode([req, req]) for _ in range(2)]
    for out in outs:
        for o in out:
            torch.testing.assert_close(o, decode_pyav(req), atol=0, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NVDEC missing" in warnings[0] and "vp9" in warnings[0]
    assert dec.routes == {("video", "vp9", "pyav"): 4}


def test_without_dali_everything_goes_to_pyav(monkeypatch, caplog, vp9) -> None:
    monkeypatch.setattr(decode_mod, "dali_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.data.media.decode"):
        dec = MediaDecoder(backend="auto")
    assert dec.dali is None and "not importable" in caplog.text
    req = _req(vp9, "video", "vp9", Bucket(32, 32, 4))
    assert dec.route(req) == "pyav"
    torch.testing.assert_close(dec.decode([req])[0], decode_pyav(req), atol=0, rtol=0)
    with pytest.raises(ValueError, match="media.decoder='dali'"):
        MediaDecoder(backend="dali")


def test_pyav_backend_never_builds_dali(vp9) -> None:
    dec = MediaDecoder(backend="pyav")
    assert dec.dali is None
    req = _req(vp9, "video", "vp9", Bucket(32, 32, 4))
    assert dec.route(req) == "pyav"
