"""DALI GPU decoding (nvJPEG, NVDEC): images and H.264 video decoded on the GPU match a CPU
decode of the same bytes (PIL / PyAV) to within colour-conversion rounding."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.gpu.helpers import requires_cuda, requires_package

pytestmark = [requires_cuda, requires_package("nvidia.dali", "nvidia-dali-cuda120/130")]


def _smooth_rgb(h, w, phase=0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [(xx * 2 + phase * 8) % 256, (yy * 3) % 256, (xx + yy + phase * 16) % 256], -1
    ).astype(np.uint8)


def _run_pipeline(decode, data: list[bytes]):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(data), num_threads=2, device_id=0)
    def pipe():
        enc = fn.external_source(
            source=lambda: [np.frombuffer(d, dtype=np.uint8) for d in data],
            batch=True,
            dtype=types.UINT8,
        )
        return decode(enc)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu()
    return [np.asarray(out.at(i)) for i in range(len(data))]


def test_mixed_image_decode_matches_pil():
    from nvidia.dali import fn, types
    from PIL import Image

    blobs, refs = [], []
    for i, (h, w) in enumerate([(64, 96), (128, 80)]):
        buf = io.BytesIO()
        Image.fromarray(_smooth_rgb(h, w, i)).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
        refs.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    outs = _run_pipeline(
        lambda e: fn.decoders.image(e, device="mixed", output_type=types.RGB), blobs
    )
    for got, want in zip(outs, refs):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 2.0  # IDCT / upsampling differences


def test_mixed_h264_decode_matches_pyav():
    av = pytest.importorskip("av", reason="missing package: av (PyAV)")
    from nvidia.dali import fn

    frames, h, w = 8, 64, 96
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            for pkt in s.encode(av.VideoFrame.from_ndarray(_smooth_rgb(h, w, i), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    data = buf.getvalue()
    ref = np.stack(
        [f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(data)).decode(video=0)]
    )
    decoders = getattr(fn, "decoders", None)
    video = getattr(decoders, "video", None) or fn.experimental.decoders.video
    (got,) = _run_pipeline(lambda e: video(e, device="mixed"), [data])
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.abs(got.astype(int) - ref).mean() < 3.0  # YUV -> RGB conversion differences
