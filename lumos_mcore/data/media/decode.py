"""Codec routing: each sample goes to DALI when DALI can decode it on this device, else to PyAV.

``backend="auto"`` uses DALI when it imports — images and the video codecs of its decoder for the
device (CPU: VP8/VP9/MJPEG; GPU: also H.264/HEVC/MPEG-4/AV1) — and PyAV/Pillow for the rest; a
sample DALI fails on is retried on PyAV before it is called bad, so a DALI-specific limitation
never drops data. Without DALI everything goes to PyAV. The first time a (kind, codec) pair is
routed, the chosen decoder is logged once.
"""

from __future__ import annotations

import collections
import logging
import threading

import torch

from lumos_mcore.data.media.dali_decode import (
    FORK_GUARD,
    DaliDecoder,
    DecodeRequest,
    dali_available,
)
from lumos_mcore.data.media.pyav_decode import (
    DecodeError,
    decode_image,
    decode_video_frames,
    looks_truncated,
)
from lumos_mcore.data.media.transforms import resize_crop

logger = logging.getLogger(__name__)

__all__ = ["DecodeError", "DecodeRequest", "MediaDecoder", "decode_pyav", "resolve_dali_device"]


def resolve_dali_device(device: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return device


def decode_pyav(req: DecodeRequest, *, color_matrix: str = "bt601") -> torch.Tensor:
    """Decode one request on the CPU route: pixels [3, (T,) H', W'] in [-1, 1]."""
    if req.kind == "image":
        rgb = decode_image(req.data)  # [H, W, 3]
        src = rgb.shape[:2]
    else:
        ids = [req.start + k * req.stride for k in range(req.count)]
        rgb, src = decode_video_frames(req.data, ids, color_matrix=color_matrix)  # [T, H, W, 3]
    if tuple(src) != tuple(req.source_hw):
        raise DecodeError(
            "bad_meta", f"decoded size {tuple(src)} differs from the indexed {req.source_hw}"
        )
    return resize_crop(rgb, req.roi, req.size)


class MediaDecoder:
    """Decodes lists of ``DecodeRequest``; results are tensors or ``DecodeError`` per request."""

    def __init__(
        self,
        *,
        backend: str = "auto",
        dali_device: str = "auto",
        dali_threads: int = 2,
        color_matrix: str = "bt601",
        max_batch: int = 32,
    ) -> None:
        if backend not in ("auto", "dali", "pyav"):
            raise ValueError(f"media.decoder={backend!r}: choose auto, dali or pyav")
        self.color_matrix = color_matrix
        self.dali: DaliDecoder | None = None
        if backend != "pyav":
            if dali_available():
                self.dali = DaliDecoder(
                    device=resolve_dali_device(dali_device),
                    threads=dali_threads,
                    max_batch=max_batch,
                )
            elif backend == "dali":
                raise ValueError(
                    "media.decoder='dali': nvidia.dali is not importable; install "
                    "nvidia-dali-cuda130 (or -cuda120), or set media.decoder=auto/pyav"
                )
            else:
                logger.warning(
                    "nvidia.dali is not importable: decoding everything with PyAV/Pillow"
                )
        self.backend = backend
        self.device = self.dali.device if self.dali is not None else "cpu"
        self.routes: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def route(self, req: DecodeRequest) -> str:
        """``"dali"`` or ``"pyav"`` for this request."""
        if self.dali is not None and self.dali.supports(req):
            return "dali"
        return "pyav"

    def _note(self, req: DecodeRequest, decoder: str) -> None:
        label = req.codec or "?"
        with self._lock:
            self.routes[(req.kind, label, decoder)] += 1
            first = (f"{req.kind}/{label}", decoder) not in self._logged
            self._logged.add((f"{req.kind}/{label}", decoder))
        if first:
            where = f"DALI ({self.device})" if decoder == "dali" else "PyAV/Pillow (CPU)"
            logger.info("decoding %s %s with %s", req.kind, label, where)

    def _note_fallback(self, req: DecodeRequest, err: DecodeError) -> None:
        """Warn once per kind / codec that DALI failed and PyAV decoded instead: the sample is
        kept, but a DALI set-up problem (no NVDEC, out of GPU memory) would otherwise move all
        decoding to the CPU unnoticed, seen only in ``routes``."""
        key = (f"{req.kind}/{req.codec or '?'}", "fallback")
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        if first:
            logger.warning(
                "DALI (%s) failed on %s %s (%s: %s); PyAV/Pillow decoded it instead -- further "
                "fallbacks are counted in the decoder's routes",
                self.device, req.kind, req.codec or "?", err.reason, err.detail,
            )  # fmt: skip

    def _pyav(self, req: DecodeRequest) -> torch.Tensor | DecodeError:
        try:
            out = decode_pyav(req, color_matrix=self.color_matrix)
        except DecodeError as e:
            return e
        if self.device == "gpu":
            out = out.to(torch.device("cuda", self.dali.device_id), non_blocking=True)  # type: ignore[union-attr]
        return out

    def decode(self, reqs: list[DecodeRequest]) -> list[torch.Tensor | DecodeError]:
        """Pixels [3, (T,) H', W'] in [-1, 1] per request, or the ``DecodeError`` explaining it."""
        with FORK_GUARD.running():  # no fork() while native decoder threads are busy
            return self._decode(reqs)

    def _decode(self, reqs: list[DecodeRequest]) -> list[torch.Tensor | DecodeError]:
        results: list[torch.Tensor | DecodeError | None] = [None] * len(reqs)
        to_dali = [i for i, r in enumerate(reqs) if self.route(r) == "dali"]
        if to_dali:
            assert self.dali is not None
            for i, out in zip(to_dali, self.dali.decode([reqs[i] for i in to_dali])):
                if isinstance(out, DecodeError) and out.reason != "bad_meta":
                    # DALI failed (or came back short): PyAV gets a chance before the sample
                    # is called bad, so a DALI-only limitation never drops data.
                    retry = self._pyav(reqs[i])
                    if not isinstance(retry, DecodeError):
                        self._note_fallback(reqs[i], out)
                        self._note(reqs[i], "pyav")
                        results[i] = retry
                        continue
                    out = retry
                self._note(reqs[i], "dali")
                results[i] = out
        for i, r in enumerate(reqs):
            if results[i] is None:
                self._note(r, "pyav")
                results[i] = self._pyav(r)
            out = results[i]
            if (
                isinstance(out, DecodeError)
                and out.reason == "undecodable"
                and looks_truncated(r.data)
            ):
                results[i] = DecodeError("truncated", f"file cut short ({out.detail})")
        return results  # type: ignore[return-value]
