"""Pixel transforms of the PyAV/Pillow route, written to give the same numbers as DALI's.

``resize_crop`` reproduces ``fn.resize(..., roi_start, roi_end, antialias=True,
interp_type=INTERP_LINEAR)``: output pixel centres map linearly into the source region of
interest, each output pixel is a triangle-filter average whose radius is the downscale factor
(plain bilinear when upscaling), and source taps past the image border are clamped to the edge
pixel. (torch's ``interpolate(antialias=True)`` renormalises at the border instead, which differs
from DALI by up to ~15/255 in the outermost row and column.) ``yuv_to_rgb`` reproduces the
YUV -> RGB conversion of DALI's CPU video decoder: BT.601 coefficients, bilinear centre-sited
chroma upsampling, range from the stream (limited unless tagged full / ``yuvj``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}


@functools.lru_cache(maxsize=256)
def resample_taps(n_in: int, n_out: int, start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [n_out, K] (edge-clamped) and float32 weights [n_out, K] for one axis."""
    if n_in < 1 or n_out < 1 or not end > start:
        raise ValueError(f"resample n_in={n_in}, n_out={n_out}, roi=[{start}, {end}): invalid")
    scale = (end - start) / n_out
    radius = max(scale, 1.0)
    x = start + (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5  # [n_out]
    taps = math.ceil(2 * radius) + 1
    j = np.floor(x - radius)[:, None] + 1 + np.arange(taps, dtype=np.float64)  # [n_out, K]
    w = np.clip(1.0 - np.abs(j - x[:, None]) / radius, 0.0, None)  # [n_out, K]
    w /= w.sum(1, keepdims=True)
    keep = w.any(0)  # taps that are zero for every output (e.g. at scale 1) cost time only
    idx = np.clip(j[:, keep], 0, n_in - 1).astype(np.int64)
    w = w[:, keep].astype(np.float32)
    idx.flags.writeable = w.flags.writeable = False  # shared through the cache
    return idx, w


def _resample_axis(x: np.ndarray, axis: int, n_out: int, start: float, end: float) -> np.ndarray:
    n_in = x.shape[axis]
    if n_out == n_in and start == 0 and end == n_in:
        return x  # identity: every output pixel is its own source pixel
    idx, w = resample_taps(n_in, n_out, float(start), float(end))
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.take(x, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):  # a sum over taps keeps memory at one output-sized array
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def resize_crop(
    pixels: np.ndarray,
    roi: tuple[float, float, float, float],
    size: tuple[int, int],
) -> torch.Tensor:
    """Resize the source region ``roi`` = (y0, x0, y1, x1) of uint8 ``[..., H, W, 3]`` pixels to
    ``size`` = (H', W') and normalise to [-1, 1]; returns float32 ``[3, ..., H', W']``.

    numpy, single-threaded on purpose: it runs in data-loader threads next to the training
    step, where torch's intra-op thread pool would compete for the same cores.
    """
    x = np.asarray(pixels)
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"pixels shape {tuple(x.shape)}: expected [H, W, 3] or [T, H, W, 3]")
    x = x.astype(np.float32)
    y0, x0, y1, x1 = roi
    h_out, w_out = size
    h_axis, w_axis = x.ndim - 3, x.ndim - 2
    # Reduce the axis that shrinks most first: the second pass then works on less data.
    if (y1 - y0) / h_out >= (x1 - x0) / w_out:
        x = _resample_axis(x, h_axis, h_out, y0, y1)
        x = _resample_axis(x, w_axis, w_out, x0, x1)
    else:
        x = _resample_axis(x, w_axis, w_out, x0, x1)
        x = _resample_axis(x, h_axis, h_out, y0, y1)
    x *= 1.0 / 127.5
    x -= 1.0
    perm = (2, 0, 1) if x.ndim == 3 else (3, 0, 1, 2)  # [3, H', W'] or [3, T, H', W']
    return torch.from_numpy(np.ascontiguousarray(x.transpose(perm)))


def yuv_to_rgb(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    *,
    full_range: bool,
    matrix: str = "bt601",
) -> np.ndarray:
    """Planar Y [H, W] + subsampled U/V planes (uint8) -> RGB uint8 [H, W, 3]."""
    if matrix not in _KR_KB:
        raise ValueError(f"matrix={matrix!r}: choose one of {tuple(_KR_KB)}")
    h, w = y.shape
    uv = np.stack([u, v]).astype(np.float32)  # [2, h_c, w_c]
    fy, fx = round(h / uv.shape[1]), round(w / uv.shape[2])
    # Centre-sited bilinear upsampling == the resampler at scale 1/f (edge-clamped).
    if fy != 1:
        uv = _resample_axis(uv, 1, uv.shape[1] * fy, 0.0, float(uv.shape[1]))
    if fx != 1:
        uv = _resample_axis(uv, 2, uv.shape[2] * fx, 0.0, float(uv.shape[2]))
    uv = uv[:, :h, :w] - 128.0  # [2, H, W]
    yf = y.astype(np.float32)
    if full_range:
        luma, cb, cr = yf, uv[0], uv[1]
    else:
        luma = (yf - 16.0) * np.float32(255.0 / 219.0)
        cb, cr = uv[0] * np.float32(255.0 / 224.0), uv[1] * np.float32(255.0 / 224.0)
    kr, kb = _KR_KB[matrix]
    r = luma + np.float32(2.0 * (1.0 - kr)) * cr
    b = luma + np.float32(2.0 * (1.0 - kb)) * cb
    g = (luma - np.float32(kr) * r - np.float32(kb) * b) * np.float32(1.0 / (1.0 - kr - kb))
    rgb = np.stack([r, g, b], -1)  # [H, W, 3]
    np.rint(rgb, out=rgb)
    return np.clip(rgb, 0, 255).astype(np.uint8)
