"""NVIDIA DALI pipelines: decode, resize/crop to the bucket and normalise, a micro-batch at a time.

Encoded bytes and per-sample geometry enter through ``fn.external_source``; the pipelines run on
CPU (``device_id=None``) or, when CUDA is present, decode with ``device="mixed"`` (nvJPEG /
NVDEC) and resize on the GPU. DALI's CPU video decoder handles VP8, VP9 and MJPEG only; the mixed
decoder adds H.264, HEVC, MPEG-4 and AV1 (``codecs_for``). A failed run invalidates the pipeline
object (DALI's rule), so a failing batch is rebuilt and re-run one sample at a time to find the
culprits; every other sample of the batch still decodes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lumos_mcore.data.media.pyav_decode import DecodeError

logger = logging.getLogger(__name__)

DALI_CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_VIDEO_CODECS = DALI_CPU_VIDEO_CODECS | {"h264", "hevc", "mpeg4", "av1"}


class ForkGuard:
    """Keeps ``os.fork`` out of in-flight decodes.

    Checkpoint writers (megatron's dist_checkpointing) fork worker processes. A fork while a
    prefetch thread is inside DALI (or FFmpeg) copies locks those native threads hold — a
    malloc arena, the decoder's own — into a child that never releases them, and the child
    hangs. Decodes run under ``running()``; the before-fork hook waits for them to finish and
    holds new ones back until the fork is done (at most one micro-batch of decoding).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self.pipelines_made = False  # set when this process builds its first DALI pipeline

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def before_fork(self) -> None:
        # Collect the parent's garbage first: an unreachable DALI pipeline (a reference cycle,
        # e.g. one dropped after a failed run while its traceback is alive) would otherwise be
        # inherited and collected by the child's gc, whose Pipeline.__del__ then hangs or
        # aborts on DALI threads that do not exist there. Only once DALI was used here: a full
        # collection costs ~0.2 s in a trainer process.
        if self.pipelines_made:
            gc.collect()
        self._cond.acquire()
        while self._active:
            self._cond.wait()  # releases the lock while waiting; holds it when woken

    def after_fork_in_parent(self) -> None:
        self._cond.release()

    def after_fork_in_child(self) -> None:
        self._cond = threading.Condition()
        self._active = 0


FORK_GUARD = ForkGuard()
os.register_at_fork(
    before=FORK_GUARD.before_fork,
    after_in_parent=FORK_GUARD.after_fork_in_parent,
    after_in_child=FORK_GUARD.after_fork_in_child,
)

# A forked child must never destroy a pipeline it inherited: Pipeline.__del__ joins DALI worker
# threads that do not exist in the child and blocks forever. Decoders register here; the child
# keeps every inherited pipeline referenced until it exits (multiprocessing children leave
# through os._exit, which runs no finalisers).
_DECODERS: weakref.WeakSet[DaliDecoder] = weakref.WeakSet()
_CHILD_KEEPALIVE: list = []


def _keep_pipelines_in_child() -> None:
    for dec in list(_DECODERS):
        _CHILD_KEEPALIVE.append(dec._pipes)
        dec._pipes = {}
        dec._lock = threading.Lock()


os.register_at_fork(after_in_child=_keep_pipelines_in_child)


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (any CUDA flavour; CPU pipelines need no GPU)."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def codecs_for(device: str) -> frozenset[str]:
    """Video codecs DALI decodes on ``device`` ("cpu" or "gpu")."""
    return DALI_GPU_VIDEO_CODECS if device == "gpu" else DALI_CPU_VIDEO_CODECS


@dataclass
class DecodeRequest:
    """One sample to decode: bytes, expected source size, crop region, output bucket, frames."""

    data: bytes | memoryview
    kind: str  # "image" | "video"
    codec: str
    source_hw: tuple[int, int]
    roi: tuple[float, float, float, float]  # (y0, x0, y1, x1) in source pixels
    size: tuple[int, int]  # output (H, W)
    start: int = 0  # video: first frame
    count: int = 1  # video: frames
    stride: int = 1  # video: frame step


def _normalize(pixels, layout: str):
    """[0, 255] -> [-1, 1] and channels first, fused in one operator (separate arithmetic and
    transpose operators cost several times more on DALI's CPU backend)."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        pixels, mean=[127.5], std=[127.5], output_layout=layout, dtype=types.FLOAT
    )


def _pipeline_def(batch: int, threads: int, device_id: int | None):
    """``pipeline_def`` with the settings both pipelines share: one micro-batch per run,
    dynamic executor, no prefetching ahead of the caller."""
    from nvidia.dali import pipeline_def

    FORK_GUARD.pipelines_made = True  # from now on a fork first collects garbage pipelines
    return pipeline_def(
        batch_size=batch,
        num_threads=threads,
        device_id=device_id,
        exec_dynamic=True,
        prefetch_queue_depth=1,
    )


def _crop_inputs():
    """The per-sample crop region and output size, fed by name in ``DaliDecoder._run``."""
    from nvidia.dali import fn, types

    roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
    roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
    return roi_start, roi_end, size


def _crop_resize_normalize(pixels, crop, layout: str):
    """Crop ``crop``'s region, resize it to its size (antialiased bilinear), scale to [-1, 1]
    and lay channels out as ``layout``: the same for image [H, W, 3] and video [F, H, W, 3]."""
    from nvidia.dali import fn, types

    roi_start, roi_end, size = crop
    out = fn.resize(
        pixels,
        size=size,
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
        dtype=types.FLOAT,
    )  # [(F,) H', W', 3]
    return _normalize(out, layout)


def _image_pipeline(batch: int, threads: int, device: str, device_id: int | None):
    from nvidia.dali import fn, types

    @_pipeline_def(batch, threads, device_id)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        crop = _crop_inputs()
        shape = fn.peek_image_shape(enc)  # [H, W, C] from the header, on CPU
        img = fn.decoders.image(
            enc, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
        )  # [H, W, 3] uint8
        out = _crop_resize_normalize(img, crop, "CHW")  # [3, H', W']
        return out, shape

    return pipe()


def _video_pipeline(batch: int, threads: int, device: str, device_id: int | None):
    from nvidia.dali import fn, types

    @_pipeline_def(batch, threads, device_id)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
        count = fn.external_source(name="count", dtype=types.INT32, ndim=0)
        stride = fn.external_source(name="stride", dtype=types.INT32, ndim=0)
        crop = _crop_inputs()
        # pad_mode="none": a clip that ends early comes back short (checked by the caller)
        # instead of silently padded with black frames.
        frames = fn.decoders.video(
            enc,
            device="mixed" if device == "gpu" else "cpu",
            start_frame=start,
            sequence_length=count,
            stride=stride,
            pad_mode="none",
        )  # [F, H, W, 3] uint8
        shape = frames.shape()  # [F, H, W, 3], on CPU for either device
        out = _crop_resize_normalize(frames, crop, "CFHW")  # [3, F, H', W']
        return out, shape

    return pipe()


class DaliDecoder:
    """Thread-safe: each thread builds its own pipelines (DALI pipelines are not shareable)."""

    def __init__(self, *, device: str = "cpu", threads: int = 2, max_batch: int = 32) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device={device!r}: choose 'cpu' or 'gpu'")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("media.dali_device='gpu' but CUDA is not available")
        self.device = device
        self.threads = threads
        self.max_batch = max_batch
        self.device_id = torch.cuda.current_device() if device == "gpu" else None
        self.video_codecs = codecs_for(device)
        # Pipelines per thread id (DALI pipelines are not shareable between threads). A plain
        # dict, not threading.local: a fork discards other threads' locals, which would run
        # Pipeline.__del__ in the child (see _keep_pipelines_in_child).
        self._pipes: dict[int, dict[str, object]] = {}
        self._lock = threading.Lock()
        _DECODERS.add(self)

    def supports(self, req: DecodeRequest) -> bool:
        return req.kind == "image" or req.codec in self.video_codecs

    # ---- pipelines ----
    def _pipeline(self, kind: str):
        with self._lock:
            pipes = self._pipes.setdefault(threading.get_ident(), {})
        if kind not in pipes:
            make = _image_pipeline if kind == "image" else _video_pipeline
            pipe = make(self.max_batch, self.threads, self.device, self.device_id)
            pipe.build()
            pipes[kind] = pipe
        return pipes[kind]

    def _drop_pipeline(self, kind: str) -> None:
        with self._lock:
            self._pipes.get(threading.get_ident(), {}).pop(kind, None)

    def _to_torch(self, tensor) -> torch.Tensor:
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its output buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dev = torch.device("cuda", self.device_id)
        out = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=dev)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(dev))
        return out

    def _run(self, kind: str, reqs: list[DecodeRequest]) -> list[torch.Tensor]:
        pipe = self._pipeline(kind)
        feed = {
            "enc": [np.frombuffer(r.data, dtype=np.uint8) for r in reqs],
            "roi_start": [np.asarray(r.roi[:2], dtype=np.float32) for r in reqs],
            "roi_end": [np.asarray(r.roi[2:], dtype=np.float32) for r in reqs],
            "size": [np.asarray(r.size, dtype=np.float32) for r in reqs],
        }
        if kind == "video":
            feed["start"] = [np.asarray(r.start, dtype=np.int32) for r in reqs]
            feed["count"] = [np.asarray(r.count, dtype=np.int32) for r in reqs]
            feed["stride"] = [np.asarray(r.stride, dtype=np.int32) for r in reqs]
        try:
            for name, data in feed.items():
                pipe.feed_input(name, data)
            out, shapes = pipe.run()
        except Exception:
            self._drop_pipeline(kind)  # DALI: the pipeline object is no longer valid
            raise
        results = []
        for i, r in enumerate(reqs):
            shape = [int(s) for s in np.array(shapes[i])]
            if kind == "video" and shape[0] != r.count:
                results.append(
                    DecodeError(
                        "truncated",
                        f"stream ended early: {shape[0]} of {r.count} frames from frame {r.start}",
                    )
                )
                continue
            src = tuple(shape[1:3]) if kind == "video" else tuple(shape[:2])
            if src != tuple(r.source_hw):
                results.append(
                    DecodeError(
                        "bad_meta", f"decoded size {src} differs from the indexed {r.source_hw}"
                    )
                )
                continue
            results.append(self._to_torch(out[i]))
        return results

    def decode(self, reqs: list[DecodeRequest]) -> list[torch.Tensor | DecodeError]:
        """Pixels [3, (T,) H', W'] in [-1, 1] per request, or the ``DecodeError`` explaining it."""
        with FORK_GUARD.running():
            return self._decode(reqs)

    def _decode(self, reqs: list[DecodeRequest]) -> list[torch.Tensor | DecodeError]:
        results: list[torch.Tensor | DecodeError | None] = [None] * len(reqs)
        for kind in ("image", "video"):
            idx = [i for i, r in enumerate(reqs) if r.kind == kind]
            for b in range(0, len(idx), self.max_batch):
                part = idx[b : b + self.max_batch]
                try:
                    outs = self._run(kind, [reqs[i] for i in part])
                except Exception:
                    outs = [self._run_one(kind, reqs[i]) for i in part]
                for i, o in zip(part, outs):
                    results[i] = o
        return results  # type: ignore[return-value]

    def _run_one(self, kind: str, req: DecodeRequest) -> torch.Tensor | DecodeError:
        try:
            return self._run(kind, [req])[0]
        except Exception as e:
            lines = [x for x in str(e).splitlines() if x.strip()]
            detail = next(
                (x.strip() for x in lines if "rror" in x or "ailed" in x or "bounds" in x),
                lines[-1] if lines else type(e).__name__,
            )
            reason = (
                "truncated"
                if "out of bounds" in str(e) or "Premature end" in str(e)
                else "undecodable"
            )
            return DecodeError(reason, f"DALI: {detail[:300]}")
