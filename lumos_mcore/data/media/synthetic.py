"""Synthetic raw media: procedural moving shapes, encoded as real JPEG images and real videos.

Each sample has a class id that fixes its background gradient, shape kinds, colours and motion;
per-sample jitter varies positions and phases. Videos are encoded as VP9 in WebM (DALI's CPU
decoder handles it) and as H.264 in MP4 (DALI needs the GPU for it; on CPU it goes to PyAV), so
both decode routes are exercised. Captions describe the class; optional camera poses are random
rotations + translations (NVS-style metadata).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lumos_mcore.data.media.shards import MediaShardWriter

VIDEO_CODECS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}
_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
_SHAPES = ("circle", "square", "ring")


def _class_params(class_id: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 0x5AFE, class_id])
    names = list(_COLORS)
    return {
        "bg0": rng.integers(0, 256, 3),
        "bg1": rng.integers(0, 256, 3),
        "shape": _SHAPES[int(rng.integers(len(_SHAPES)))],
        "color": names[int(rng.integers(len(names)))],
        "velocity": rng.uniform(-0.04, 0.04, 2),
        "radius": rng.uniform(0.12, 0.25),
    }


def render_clip(
    class_id: int, height: int, width: int, frames: int, *, seed: int, jitter: int
) -> np.ndarray:
    """RGB uint8 [T, H, W, 3]: a gradient background and one shape moving at the class velocity."""
    p = _class_params(class_id, seed)
    rng = np.random.default_rng([seed, 0x1177, class_id, jitter])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / max(width - 1, 1) * 0.6 + yy / max(height - 1, 1) * 0.4)[..., None]  # [H, W, 1]
    bg = p["bg0"] * (1 - ramp) + p["bg1"] * ramp  # [H, W, 3]
    center = rng.uniform(0.3, 0.7, 2)
    side = min(height, width)
    r = p["radius"] * side
    color = np.asarray(_COLORS[p["color"]], dtype=np.float32)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        cy = (center[0] + p["velocity"][0] * t) % 1.0 * height
        cx = (center[1] + p["velocity"][1] * t) % 1.0 * width
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        if p["shape"] == "circle":
            mask = d < r
        elif p["shape"] == "square":
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        else:
            mask = (d < r) & (d > 0.55 * r)
        frame = np.where(mask[..., None], color, bg)
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def caption_for(class_id: int, seed: int) -> str:
    p = _class_params(class_id, seed)
    vy, vx = p["velocity"]
    horizontal = "right" if vx > 0 else "left"
    vertical = "down" if vy > 0 else "up"
    return f"a {p['color']} {p['shape']} drifting {vertical} and {horizontal} over a gradient"


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_video(frames: np.ndarray, codec: str = "vp9", fps: int = 8) -> tuple[bytes, str]:
    """Encode RGB uint8 [T, H, W, 3] (even H, W) with PyAV; returns (bytes, file extension)."""
    import av

    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec={codec!r}: choose one of {tuple(VIDEO_CODECS)}")
    encoder, container_fmt = VIDEO_CODECS[codec]
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"video size {h}x{w}: yuv420p needs even height and width")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "vp9":
            stream.options = {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:
            stream.options = {"crf": "20", "preset": "ultrafast", "bf": "0"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue(), container_fmt


def random_camera(rng: np.random.Generator) -> np.ndarray:
    """A camera-to-world pose [3, 4]: random rotation (QR of a Gaussian) + translation."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return np.concatenate([q, rng.normal(size=(3, 1))], axis=1)


def synthetic_media(
    *,
    num_images: int,
    num_videos: int,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    frames: int = 20,
    fps: int = 8,
    codecs: Sequence[str] = ("vp9", "h264"),
    num_classes: int = 8,
    seed: int = 0,
    camera: bool = False,
) -> Iterator[dict]:
    """Yield samples ``{key, data, ext, caption, camera?, class_id}``; videos alternate codecs."""
    rng = np.random.default_rng([seed, 0xED1A])
    for i in range(num_images + num_videos):
        video = i >= num_images
        cls = int(rng.integers(num_classes))
        h, w = sizes[int(rng.integers(len(sizes)))]
        clip = render_clip(cls, h, w, frames if video else 1, seed=seed, jitter=i)
        if video:
            data, ext = encode_video(clip, codecs[(i - num_images) % len(codecs)], fps)
        else:
            data, ext = encode_jpeg(clip[0]), "jpg"
        sample = {
            "key": f"{'vid' if video else 'img'}{i:07d}",
            "data": data,
            "ext": ext,
            "caption": caption_for(cls, seed),
            "class_id": cls,
        }
        if camera:
            sample["camera"] = random_camera(rng)
        yield sample


def write_synthetic_media(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 0,
    num_videos: int = 0,
    samples_per_shard: int = 64,
    overwrite: bool = False,
    **kwargs,
) -> Path:
    """Write ``synthetic_media(...)`` samples as media shards; returns ``out_dir`` (media.path)."""
    if num_images < 0 or num_videos < 0 or num_images + num_videos < 1:
        raise ValueError(f"num_images={num_images}, num_videos={num_videos}: need >= 1 sample")
    extra = {
        "synthetic": {
            "num_images": num_images,
            "num_videos": num_videos,
            **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()},
        }
    }
    with MediaShardWriter(
        out_dir, samples_per_shard=samples_per_shard, overwrite=overwrite, extra=extra
    ) as writer:
        for s in synthetic_media(num_images=num_images, num_videos=num_videos, **kwargs):
            writer.write(
                s["data"],
                s["ext"],
                key=s["key"],
                caption=s["caption"],
                camera=s.get("camera"),
                meta={"class_id": s["class_id"]},
            )
    return Path(out_dir)
