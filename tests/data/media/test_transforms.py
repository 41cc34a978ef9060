"""Resampling and YUV conversion of the CPU route against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lumos_mcore.data.media.transforms import resample_taps, resize_crop, yuv_to_rgb

from .helpers import rng_image

CASES = [
    ((0.0, 0.0, 37.0, 53.0), (12, 17)),  # downscale ~3x
    ((2.0, 5.0, 35.0, 48.0), (20, 24)),  # crop + downscale
    ((0.0, 7.3, 37.0, 45.7), (16, 16)),  # sub-pixel crop
    ((0.0, 0.0, 37.0, 53.0), (74, 106)),  # upscale 2x
    ((1.5, 0.25, 36.5, 52.75), (40, 60)),  # mild upscale, fractional ROI
]


def _torch_resize(img: np.ndarray, roi, size, antialias: bool) -> torch.Tensor:
    y0, x0, y1, x1 = (int(v) for v in roi)
    t = torch.from_numpy(img).permute(2, 0, 1)[None, :, y0:y1, x0:x1].float()
    out = F.interpolate(t, size=size, mode="bilinear", antialias=antialias, align_corners=False)
    return out[0] / 127.5 - 1.0  # [3, H', W']


def test_identity_keeps_pixels_exactly() -> None:
    img = rng_image(21, 30)
    out = resize_crop(img, (0.0, 0.0, 21.0, 30.0), (21, 30))
    ref = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_upscale_equals_bilinear() -> None:
    """Upscaling is plain bilinear with edge clamping: torch's align_corners=False exactly."""
    img = rng_image(37, 53, seed=1)
    out = resize_crop(img, (0.0, 0.0, 37.0, 53.0), (74, 106))
    ref = _torch_resize(img, (0, 0, 37, 53), (74, 106), antialias=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_downscale_matches_antialiased_interior() -> None:
    """Antialiased downscale: triangle filter of radius = scale. torch renormalises at the
    border while DALI clamps, so the two agree away from the outermost row/column."""
    img = rng_image(48, 60, seed=2)
    out = resize_crop(img, (0.0, 0.0, 48.0, 60.0), (12, 20))
    ref = _torch_resize(img, (0, 0, 48, 60), (12, 20), antialias=True)
    torch.testing.assert_close(out[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=2e-5, rtol=0)
    assert (out - ref).abs().amax() > 1e-3  # the borders do differ (edge clamp vs renormalise)


def test_taps_are_normalised_and_clamped() -> None:
    idx, w = resample_taps(10, 3, 0.0, 10.0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert idx.min() >= 0 and idx.max() <= 9
    with pytest.raises(ValueError, match="invalid"):
        resample_taps(10, 3, 5.0, 5.0)


def test_video_frames_resized_independently() -> None:
    frames = np.stack([rng_image(30, 40, seed=s) for s in range(3)])  # [T, H, W, 3]
    roi, size = (3.0, 0.0, 27.0, 40.0), (16, 24)
    out = resize_crop(frames, roi, size)  # [3, T, H', W']
    assert out.shape == (3, 3, 16, 24)
    for t in range(3):
        torch.testing.assert_close(out[:, t], resize_crop(frames[t], roi, size), atol=0, rtol=0)


@pytest.mark.parametrize(("roi", "size"), CASES)
def test_resize_crop_matches_dali(roi, size) -> None:
    """The CPU route reproduces DALI's fn.resize (ROI, linear, antialias) to float rounding."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    img = rng_image(37, 53, seed=7)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        x = fn.external_source(name="x", dtype=types.UINT8, ndim=3, layout="HWC")
        return fn.resize(
            x,
            size=list(size),
            roi_start=list(roi[:2]),
            roi_end=list(roi[2:]),
            interp_type=types.INTERP_LINEAR,
            antialias=True,
            dtype=types.FLOAT,
        )

    p = pipe()
    p.build()
    p.feed_input("x", [img])
    (out,) = p.run()
    dali = torch.from_numpy(np.array(out[0])).permute(2, 0, 1) / 127.5 - 1.0
    ours = resize_crop(img, roi, size)
    assert (ours - dali).abs().amax() < 2e-5 * 127.5  # < 0.003 levels of 255


def test_yuv_limited_range_reference_colours() -> None:
    """BT.601 limited-range test colours (ITU-R BT.601 75%/100% bars): black, white, red, blue."""
    cases = {
        (16, 128, 128): (0, 0, 0),
        (235, 128, 128): (255, 255, 255),
        (81, 90, 240): (255, 0, 0),
        (41, 240, 110): (0, 0, 255),
    }
    for (yv, uv, vv), rgb in cases.items():
        y = np.full((4, 6), yv, np.uint8)
        u = np.full((2, 3), uv, np.uint8)
        v = np.full((2, 3), vv, np.uint8)
        out = yuv_to_rgb(y, u, v, full_range=False)
        np.testing.assert_allclose(out.reshape(-1, 3).astype(int), [rgb] * 24, atol=2)


def test_yuv_full_range_444_matches_pillow() -> None:
    """JPEG-style full-range YCbCr (no subsampling) against Pillow's own conversion."""
    ycc = rng_image(16, 20, seed=4)
    ref = np.asarray(Image.fromarray(ycc, mode="YCbCr").convert("RGB")).astype(int)
    out = yuv_to_rgb(ycc[..., 0], ycc[..., 1], ycc[..., 2], full_range=True).astype(int)
    assert np.abs(out - ref).max() <= 1


def test_chroma_upsampling_is_centred_bilinear() -> None:
    """4:2:0 chroma is upsampled like torch's bilinear (align_corners=False)."""
    rng = np.random.default_rng(5)
    u = rng.integers(60, 200, (5, 7), dtype=np.uint8)
    y = np.full((10, 14), 128, np.uint8)
    v = np.full((5, 7), 128, np.uint8)
    out = yuv_to_rgb(y, u, v, full_range=True).astype(np.float64)
    up = F.interpolate(
        torch.from_numpy(u).double()[None, None],
        size=(10, 14),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    expected_b = np.clip(np.rint(128 + 1.772 * (up - 128)), 0, 255)  # B = Y + 2(1-kb) Cb
    np.testing.assert_allclose(out[..., 2], expected_b, atol=1)
