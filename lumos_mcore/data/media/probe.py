"""Cheap facts about an encoded image or video (size, frame count, codec) without decoding it.

Shard writers record these facts in the index so the reader can bucket samples and reject
too-small images or too-short clips before reading a byte of them; the reader also uses them to
route each video to a decoder that supports its codec.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS

# Decoder implementation names -> the codec they decode.
_CODEC_ALIASES = {
    "libdav1d": "av1",
    "libaom-av1": "av1",
    "av1_cuvid": "av1",
    "libvpx-vp9": "vp9",
    "libvpx": "vp8",
    "h264_cuvid": "h264",
    "hevc_cuvid": "hevc",
}


class ProbeError(ValueError):
    """The bytes are not a readable image/video (``reason`` is a bad-sample reason)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class MediaInfo:
    """What the index records per sample (-1 / "" where unknown)."""

    kind: str  # "image" | "video"
    width: int
    height: int
    num_frames: int  # 1 for images
    fps: float  # 0 for images
    codec: str  # video codec (vp9, h264, ...) or image format (jpeg, png, ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def media_kind(ext: str) -> str | None:
    """``"image"``, ``"video"`` or None for a member extension (case-insensitive)."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def normalize_codec(name: str) -> str:
    name = name.lower()
    return _CODEC_ALIASES.get(name, name)


def probe_image(data: bytes) -> MediaInfo:
    """Size after EXIF orientation (what decoders return) and format, from the header only."""
    from PIL import Image

    if not data:
        raise ProbeError("empty", "zero-length image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = (im.format or "").lower()
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise ProbeError("undecodable", f"{type(e).__name__}: {e}") from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        w, h = h, w
    return MediaInfo("image", int(w), int(h), 1, 0.0, "jpeg" if fmt == "mpo" else fmt)


def probe_video(data: bytes) -> MediaInfo:
    """Codec, size, fps and frame count; frames are counted by demuxing (no decoding)."""
    import av

    if not data:
        raise ProbeError("empty", "zero-length video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ProbeError("undecodable", "no video stream")
            stream = container.streams.video[0]
            cc = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            frames = 0
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
            return MediaInfo(
                "video", int(cc.width), int(cc.height), frames, fps, normalize_codec(cc.name)
            )
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError("undecodable", f"{type(e).__name__}: {e}") from None


def probe_media(data: bytes, ext: str) -> MediaInfo:
    """Probe by member extension; raises ``ProbeError`` for empty/unreadable/unknown input."""
    kind = media_kind(ext)
    if kind is None:
        raise ProbeError(
            "unsupported", f"extension {ext!r} is neither {IMAGE_EXTS} nor {VIDEO_EXTS}"
        )
    return probe_image(data) if kind == "image" else probe_video(data)
