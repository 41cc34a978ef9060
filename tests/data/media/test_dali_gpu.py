"""DALI's GPU route (nvJPEG / NVDEC via ``device="mixed"``) inside the media pipeline: H.264 goes
to DALI instead of PyAV, outputs live on the GPU, and they match the CPU route to within the
decoders' colour-conversion differences. Skipped without CUDA (the CPU suite covers the rest)."""

from __future__ import annotations

import pytest
import torch

from lumos_mcore.data.media.buckets import Bucket, crop_roi
from lumos_mcore.data.media.dali_decode import DecodeRequest
from lumos_mcore.data.media.decode import decode_pyav
from lumos_mcore.data.media.synthetic import encode_jpeg, encode_video, render_clip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
LEVEL = 1 / 127.5


def _req(data, kind, codec, bucket, hw, start=0, stride=1) -> DecodeRequest:
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


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_gpu_video_route_matches_cpu_route(codec) -> None:
    pytest.importorskip("nvidia.dali")
    from lumos_mcore.data.media.decode import MediaDecoder

    clip = render_clip(3, 64, 96, 20, seed=0, jitter=0)
    data = encode_video(clip, codec)[0]
    dec = MediaDecoder(backend="dali", dali_device="gpu")
    req = _req(data, "video", codec, Bucket(48, 48, 6), (64, 96), start=2, stride=3)
    assert dec.route(req) == "dali"
    # Two requests with different crops and start frames: per-sample arguments on "mixed".
    other = _req(data, "video", codec, Bucket(32, 64, 4), (64, 96), start=5, stride=2)
    outs = dec.decode([req, other])
    # DALI decoded both (a DALI failure would have been retried by PyAV and moved to CUDA).
    assert dec.routes == {("video", codec, "dali"): 2}, dec.routes
    for r, out, shape in zip((req, other), outs, ((3, 6, 48, 48), (3, 4, 32, 64))):
        assert isinstance(out, torch.Tensor) and out.is_cuda and out.shape == shape
        diff = (out.cpu() - decode_pyav(r)).abs()
        assert diff.mean() < 2 * LEVEL, diff.mean() / LEVEL  # NVDEC's own YUV->RGB rounding


def test_gpu_image_route_matches_pillow() -> None:
    pytest.importorskip("nvidia.dali")
    from lumos_mcore.data.media.decode import MediaDecoder

    data = encode_jpeg(render_clip(1, 72, 100, 1, seed=0, jitter=0)[0])
    dec = MediaDecoder(backend="dali", dali_device="gpu")
    req = _req(data, "image", "jpeg", Bucket(64, 64, 1), (72, 100))
    out = dec.decode([req])[0]
    assert dec.routes == {("image", "jpeg", "dali"): 1}, dec.routes  # nvJPEG, not a retry
    assert out.is_cuda and out.shape == (3, 64, 64)
    assert (out.cpu() - decode_pyav(req)).abs().mean() < 2 * LEVEL  # nvJPEG IDCT / upsampling
