"""CPU decoding without DALI: PyAV for every video codec, Pillow for images.

Video frames are converted from the decoder's YUV planes with ``transforms.yuv_to_rgb`` (DALI's
conversion, not swscale's), then resized/cropped with ``transforms.resize_crop`` (DALI's
resampling), so this route and DALI's produce the same tensors for the same clip.
"""

from __future__ import annotations

import io

import numpy as np

from lumos_mcore.data.media.transforms import yuv_to_rgb

_PLANAR_YUV = {
    "yuv420p",
    "yuvj420p",
    "yuv422p",
    "yuvj422p",
    "yuv444p",
    "yuvj444p",
    "yuv440p",
    "yuvj440p",
    "yuv411p",
    "yuvj411p",
}
_COLORSPACE_BT709 = 1  # AVCOL_SPC_BT709
_RANGE_JPEG = 2  # AVCOL_RANGE_JPEG (full range)


class DecodeError(Exception):
    """A sample that cannot be decoded; ``reason`` is a bad-sample reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _plane(plane) -> np.ndarray:
    # Rows are padded to line_size bytes; keep the visible width.
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


def frame_to_rgb(frame, color_matrix: str = "bt601") -> np.ndarray:
    """One decoded ``av.VideoFrame`` -> RGB uint8 [H, W, 3].

    ``color_matrix``: ``bt601`` always (what DALI's CPU decoder does) or ``auto`` (BT.709 when
    the stream is tagged so). Formats other than 8-bit planar YUV go through swscale.
    """
    fmt = frame.format.name
    if fmt not in _PLANAR_YUV:
        return frame.to_ndarray(format="rgb24")
    y, u, v = (_plane(p) for p in frame.planes[:3])
    full = fmt.startswith("yuvj") or frame.color_range == _RANGE_JPEG
    matrix = (
        "bt709" if color_matrix == "auto" and frame.colorspace == _COLORSPACE_BT709 else "bt601"
    )
    return yuv_to_rgb(y, u, v, full_range=full, matrix=matrix)


def decode_video_frames(
    data: bytes | memoryview,
    frame_ids: list[int],
    *,
    color_matrix: str = "bt601",
) -> tuple[np.ndarray, tuple[int, int]]:
    """Frames ``frame_ids`` (ascending, presentation order) as RGB uint8 [T, H, W, 3], plus the
    coded (H, W). Decodes from the first frame so indices never depend on timestamps; stops after
    the last wanted frame. Raises ``DecodeError``: ``undecodable`` (cannot open / decoder error),
    ``truncated`` (the stream ends before the last wanted frame)."""
    import av

    if len(data) == 0:
        raise DecodeError("empty", "zero-length video")
    wanted = sorted(set(frame_ids))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"frame_ids={frame_ids}: need non-negative indices")
    got: dict[int, np.ndarray] = {}
    hw = (0, 0)
    try:
        with av.open(io.BytesIO(bytes(data)), mode="r") as container:
            if not container.streams.video:
                raise DecodeError("undecodable", "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = wanted[-1]
            want = set(wanted)
            i = -1
            for frame in container.decode(stream):
                i += 1
                if i in want:
                    rgb = frame_to_rgb(frame, color_matrix)
                    got[i] = rgb
                    hw = rgb.shape[:2]
                if i >= last:
                    break
    except DecodeError:
        raise
    except Exception as e:  # av.error.* and anything a damaged stream provokes
        where = f"after frame {max(got)}" if got else "before the first wanted frame"
        raise DecodeError("undecodable", f"{where}: {type(e).__name__}: {e}") from None
    missing = [f for f in wanted if f not in got]
    if missing:
        raise DecodeError(
            "truncated", f"stream ended after {len(got)} wanted frames; frame {missing[0]} missing"
        )
    return np.stack([got[f] for f in frame_ids]), hw


def decode_image(data: bytes | memoryview) -> np.ndarray:
    """RGB uint8 [H, W, 3] with the EXIF orientation applied (as DALI's decoder does).

    A truncated file raises ``DecodeError('truncated')`` (Pillow refuses to pad it), anything
    unreadable ``DecodeError('undecodable')``.
    """
    from PIL import Image, ImageOps

    if len(data) == 0:
        raise DecodeError("empty", "zero-length image")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))  # writable copy
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "undecodable"
        raise DecodeError(reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise DecodeError("undecodable", f"{type(e).__name__}: {e}") from None


def looks_truncated(data: bytes | memoryview) -> bool:
    """True when the container structure says the file was cut short (JPEG without its end
    marker, PNG without IEND, an MP4/MOV box running past the end of the data). Used to name
    a decode failure ``truncated`` rather than ``undecodable``; other formats return False."""
    b = bytes(data[:16])
    n = len(data)
    if b[:2] == b"\xff\xd8":  # JPEG: must end with EOI (trailing padding zeros allowed)
        tail = bytes(data[-4096:]).rstrip(b"\x00")
        return not tail.endswith(b"\xff\xd9")
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return not bytes(data[-12:]).startswith(b"\x00\x00\x00\x00IEND")
    if b[4:8] == b"ftyp":  # ISO base media: walk the top-level boxes
        pos = 0
        while pos + 8 <= n:
            size = int.from_bytes(bytes(data[pos : pos + 4]), "big")
            if size == 1 and pos + 16 <= n:
                size = int.from_bytes(bytes(data[pos + 8 : pos + 16]), "big")
            elif size == 0:  # box runs to the end of the file
                return False
            if size < 8:
                return False  # not a sane box: corrupt rather than cut
            pos += size
        return pos > n
    return False
