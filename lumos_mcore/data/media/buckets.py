"""Aspect-ratio and duration buckets, crop geometry and clip placement.

A bucket is an output shape (H, W[, T]). A sample goes to the spatial bucket whose aspect ratio
is closest to its own (in log space, so 1:2 and 2:1 are equally far from 1:1), is resized to
cover the bucket and centre-cropped; a clip goes to the longest duration bucket it can fill. Both
decoding routes take the same geometry from here, so they crop the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bad-sample reasons decided from the index facts alone.
TOO_SMALL, TOO_SHORT = "too_small", "too_short"


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int  # 1 for images

    @property
    def shape(self) -> tuple[int, ...]:
        """Pixel shape of one sample: [3, H, W] (image) or [3, T, H, W] (video)."""
        if self.frames == 1:
            return (3, self.height, self.width)
        return (3, self.frames, self.height, self.width)


def clip_span(frames: int, stride: int) -> int:
    """Source frames covered by ``frames`` frames taken ``stride`` apart: (N - 1) * s + 1."""
    return (frames - 1) * stride + 1


class BucketSpec:
    """Assigns samples to buckets; ``buckets`` lists spatial-major (size, then duration)."""

    def __init__(
        self,
        sizes: list[list[int]],
        *,
        frames: list[int] | None = None,
        stride: int = 1,
        max_upscale: float = 1.0,
    ) -> None:
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.frames = sorted(frames, reverse=True) if frames else [1]
        self.video = frames is not None
        self.stride = stride
        self.max_upscale = max_upscale
        self.buckets = [Bucket(h, w, t) for h, w in self.sizes for t in self.frames]
        self._log_aspect = np.log(np.asarray([h / w for h, w in self.sizes], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.buckets)

    def assign(
        self, widths: np.ndarray, heights: np.ndarray, num_frames: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bucket id per sample (-1 = none) and a reason code per sample.

        Reason codes: 0 ok, 1 ``too_small``, 2 ``too_short``, 3 unknown facts (decided at read
        time). Vectorised: millions of samples take well under a second.
        """
        w = np.asarray(widths, dtype=np.float64)
        h = np.asarray(heights, dtype=np.float64)
        t = np.asarray(num_frames, dtype=np.int64)
        n = len(w)
        unknown = (w <= 0) | (h <= 0) | ((t <= 0) if self.video else np.zeros(n, bool))
        safe_w, safe_h = np.where(unknown, 1.0, w), np.where(unknown, 1.0, h)
        aspect = np.log(safe_h / safe_w)  # [n]
        spatial = np.abs(aspect[:, None] - self._log_aspect[None, :]).argmin(1)  # [n]
        sizes = np.asarray(self.sizes, dtype=np.float64)  # [S, 2]
        scale = np.maximum(sizes[spatial, 0] / safe_h, sizes[spatial, 1] / safe_w)  # [n]
        too_small = scale > self.max_upscale * (1 + 1e-9)
        if self.video:
            spans = np.asarray([clip_span(f, self.stride) for f in self.frames])  # descending
            fits = t[:, None] >= spans[None, :]  # [n, D]
            duration = fits.argmax(1)  # first (= longest) duration that fits
            too_short = ~fits.any(1)
        else:
            duration = np.zeros(n, dtype=np.int64)
            too_short = np.zeros(n, dtype=bool)
        ids = spatial * len(self.frames) + duration
        reason = np.zeros(n, dtype=np.int8)
        reason[too_short] = 2
        reason[too_small] = 1
        reason[unknown] = 3
        ids = np.where(reason == 0, ids, -1)
        return ids.astype(np.int64), reason

    def assign_one(self, width: int, height: int, num_frames: int) -> tuple[int, str | None]:
        """Bucket id and bad reason (None when usable) of one sample with known facts."""
        ids, reason = self.assign(np.array([width]), np.array([height]), np.array([num_frames]))
        code = int(reason[0])
        if code == 3:
            return -1, "undecodable"
        return int(ids[0]), {0: None, 1: TOO_SMALL, 2: TOO_SHORT}[code]


def crop_roi(height: int, width: int, bucket: Bucket) -> tuple[float, float, float, float]:
    """Centre region (y0, x0, y1, x1) of a ``height x width`` source that, scaled by the cover
    factor ``max(H/height, W/width)``, becomes exactly the bucket (sub-pixel edges allowed)."""
    scale = max(bucket.height / height, bucket.width / width)
    rh, rw = bucket.height / scale, bucket.width / scale
    y0, x0 = (height - rh) / 2.0, (width - rw) / 2.0
    return (y0, x0, y0 + rh, x0 + rw)


def clip_start(num_frames: int, span: int, *, seed: int, index: int) -> int:
    """Seeded first frame of a clip: uniform over the placements that fit, fixed per sample."""
    room = num_frames - span
    if room <= 0:
        return 0
    return int(np.random.default_rng([seed, 0x51A27, index]).integers(0, room + 1))
