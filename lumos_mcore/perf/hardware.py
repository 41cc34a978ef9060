"""What the machine can do and what a run used: matmul peak, spec peaks, memory, communication.

MFU needs a denominator. On GPUs it is the vendor's dense peak (:data:`GPU_PEAK_TFLOPS`; H100
SXM: 989 TFLOP/s bf16, 1979 FP8). On CPU there is no meaningful spec number, so the denominator
is the fp32 matmul FLOP/s measured on the same machine in the same run, with the same threads
per rank, so an MFU of 1.0 means "as fast as a large GEMM".
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
import torch.distributed as dist

__all__ = [
    "CommTimer",
    "GPU_PEAK_TFLOPS",
    "MemorySampler",
    "time_calls",
    "PeakSpec",
    "cpu_cores",
    "device_name",
    "gpu_peak",
    "measure_matmul_flops",
    "rank_peak",
]

# Dense (no sparsity) peak TFLOP/s by device-name fragment, per dtype: half the datasheets'
# "with sparsity" numbers. The first fragment found in the name wins, so the specific parts
# come before the generic ones ("GB200" contains "B200", "GH200" and "H200 NVL" contain "H200").
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 NVL": {"bf16": 835.0, "fp8": 1670.0},
    "H200 NVL": {"bf16": 835.0, "fp8": 1670.0},
    "GH200": {"bf16": 989.0, "fp8": 1979.0},
    "GB200": {"bf16": 2500.0, "fp8": 5000.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100 SXM": {"bf16": 989.0, "fp8": 1979.0},
    "H100 80GB HBM3": {"bf16": 989.0, "fp8": 1979.0},  # how SXM parts report themselves
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0},
}


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_name() -> str:
    """Human-readable accelerator (or CPU) name."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_cores()} cores, {torch.get_num_threads()} threads/rank)"


@dataclass(frozen=True)
class PeakSpec:
    """The MFU denominator of one rank and where it came from."""

    tflops: float
    source: str  # e.g. "spec: H100 SXM bf16" or "measured fp32 matmul"


def gpu_peak(name: str, dtype: str = "bf16") -> PeakSpec | None:
    """Vendor peak for a GPU name (first matching fragment), or None if unknown."""
    for fragment, table in GPU_PEAK_TFLOPS.items():
        if fragment in name and dtype in table:
            return PeakSpec(table[dtype], f"spec: {fragment} {dtype} dense")
    return None


def rank_peak(
    *,
    hidden_size: int,
    rows: int = 4096,
    mlp_ratio: float = 4.0,
    given_tflops: float | None = None,
    dtype: str = "bf16",
    probe_seconds: float = 0.05,
) -> PeakSpec:
    """The MFU denominator of this rank: ``given_tflops``, else the GPU's spec peak, else (CPU,
    unknown GPU) the best of a square GEMM and the model's MLP GEMM ``[rows, D] @ [D, r*D]``
    measured now (a few tenths of a second; call once at start-up)."""
    if given_tflops:
        return PeakSpec(float(given_tflops), "given")
    if torch.cuda.is_available():
        spec = gpu_peak(torch.cuda.get_device_name(), dtype)
        if spec is not None:
            return spec
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    kind = torch.bfloat16 if device is not None else torch.float32
    shapes = [
        (1024, 1024, 1024),
        (max(256, min(rows, 8192)), hidden_size, int(mlp_ratio * hidden_size)),
    ]
    best, _ = measure_matmul_flops(
        shapes, dtype=kind, device=device or "cpu", repeats=3, min_time=probe_seconds
    )
    return PeakSpec(best / 1e12, f"measured {'bf16' if device is not None else 'fp32'} matmul")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds taken by ``calls`` back-to-back calls of ``fn``.

    CUDA: between two events around the launches, one synchronisation per batch -- a host
    synchronisation after every call would add its latency to each (small) GEMM. CPU: wall
    clock (the calls run synchronously).
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def measure_matmul_flops(
    shapes: list[tuple[int, int, int]] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    min_time: float = 0.2,
) -> tuple[float, dict[str, float]]:
    """Best FLOP/s of ``[m, k] @ [k, n]`` over ``shapes``; returns ``(best, {shape: flops})``.

    The number of calls per timing doubles until one timing lasts ``min_time`` seconds; that
    timing and ``repeats - 1`` more of as many calls are kept and the fastest counts: the CPU
    of a shared machine is noisy, and a peak is a maximum.
    """
    device = torch.device(device)
    shapes = shapes or [(2048, 2048, 2048)]
    results: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b  # warm-up (allocations, kernel selection)
        _sync(device)
        flop = 2.0 * m * k * n

        def matmul(a=a, b=b) -> None:
            a @ b

        calls = 1
        elapsed = time_calls(matmul, calls, device)
        while elapsed < min_time or elapsed <= 0:
            calls *= 2
            elapsed = time_calls(matmul, calls, device)
        best = flop * calls / elapsed
        for _ in range(repeats - 1):
            best = max(best, flop * calls / time_calls(matmul, calls, device))
        results[f"{m}x{k}x{n}"] = best
    return max(results.values()), results


def _read_hwm_bytes() -> int | None:
    """Peak resident set size of this process (Linux ``VmHWM``), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` into ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemorySampler:
    """Peak memory of this rank while the context is open.

    CUDA: ``max_memory_allocated`` (reset on entry). CPU: the kernel's resident-set high-water
    mark, reset on entry (Linux), else the larger RSS seen at entry, at :meth:`sample` calls and
    at exit. No sampling thread: on a machine with as many busy OpenMP threads as cores, an
    extra thread that wakes up often slows the measured step several-fold.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_rss_peak"
        self._hwm = False

    def sample(self) -> None:
        """Record the current RSS (CPU without a resettable high-water mark)."""
        if not torch.cuda.is_available() and not self._hwm:
            rss = psutil.Process(os.getpid()).memory_info().rss
            self.peak_bytes = max(self.peak_bytes, rss)

    def __enter__(self) -> MemorySampler:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self._hwm = _reset_hwm() and _read_hwm_bytes() is not None
            self.peak_bytes = 0
            self.sample()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._hwm:
            self.peak_bytes = _read_hwm_bytes() or 0
        else:
            self.sample()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


# torch.distributed entry points megatron uses during a train step (called through the module,
# so replacing the module attribute intercepts them).
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "_all_gather_base",
    "_reduce_scatter_base",
)


class _TimedWork:
    """Proxy of an async ``Work`` whose ``wait()`` is timed."""

    def __init__(self, work, timer: CommTimer) -> None:
        self._work = work
        self._timer = timer

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self._work, name)


@dataclass
class CommTimer:
    """Wall time spent inside ``torch.distributed`` calls while ``active()`` is open.

    Synchronous collectives count from call to return, async ones (pipeline p2p) from call to
    return plus their ``wait()``; collectives issued inside ``_coalescing_manager`` (megatron
    DDP's gradient all-reduce / reduce-scatter) run when the manager exits, so that exit is
    timed too. This includes waiting for slower ranks, which is what a rank loses to
    communication on CPU (gloo has no overlap). On GPU, NCCL calls return at enqueue, so the
    number is a lower bound there.
    """

    seconds: float = 0.0
    calls: int = 0
    _saved: list[tuple[Any, str, Callable]] = field(default_factory=list)

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
            if isinstance(out, list):
                return [_TimedWork(w, self) if hasattr(w, "wait") else w for w in out]
            if out is not None and hasattr(out, "wait"):
                return _TimedWork(out, self)
            return out

        return timed

    def _wrap_coalescing(self, factory: Callable) -> Callable:
        timer = self

        @contextmanager
        def timed(*args, **kwargs):
            cm = factory(*args, **kwargs)
            handle = cm.__enter__()
            try:
                yield _TimedWork(handle, timer)
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                t0 = time.perf_counter()
                cm.__exit__(None, None, None)  # the coalesced collectives run here
                timer.seconds += time.perf_counter() - t0

        return timed

    def _patch(self, owner: Any, name: str, replacement: Callable) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    @contextmanager
    def active(self) -> Iterator[CommTimer]:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            yield self
            return
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._patch(dist, name, self._wrap(fn))
        from torch.distributed import distributed_c10d

        original = distributed_c10d._coalescing_manager
        timed_cm = self._wrap_coalescing(original)
        # Modules that imported the manager by name (megatron's param_and_grad_buffer) too.
        owners = [dist, distributed_c10d] + [
            m
            for n, m in list(sys.modules.items())
            if n.startswith("megatron.") and getattr(m, "_coalescing_manager", None) is original
        ]
        for owner in owners:
            if getattr(owner, "_coalescing_manager", None) is original:
                self._patch(owner, "_coalescing_manager", timed_cm)
        try:
            yield self
        finally:
            for owner, name, fn in reversed(self._saved):
                setattr(owner, name, fn)
            self._saved.clear()
