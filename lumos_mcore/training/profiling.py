"""A bounded window of training steps traced on chosen ranks (torch.profiler or Nsight).

Tracing every step of a long run costs time and disk, so the trainer opens the profiler just
before ``profile.start_step`` and closes it after ``profile.last_step``; ranks not listed in
``profile.ranks`` pay nothing. The loop marks its phases with ``record_function`` labels
(``lumos/forward_backward``, ``lumos/optimizer_step`` ...), which torch.profiler shows as
ranges and ``emit_nvtx`` turns into NVTX ranges for Nsight Systems.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from lumos_mcore.config.profile import ProfileConfig

log = logging.getLogger(__name__)

_MEMORY_HISTORY_ENTRIES = 100_000  # allocation events kept by the CUDA memory recorder
_TABLE_ROWS = 30  # ops in the summary table


def phase(name: str):
    """A named range in traces (``lumos/<name>``); free when no profiler is recording."""
    return torch.profiler.record_function(f"lumos/{name}")


class StepProfiler:
    """Starts and stops the profiler around the configured window of (1-based) steps.

    Call ``before_step(step)`` just before step ``step`` runs and ``after_step(step)`` just
    after it; ``close()`` at the end of the run writes a window the run cut short (a stop
    signal, or ``train.steps`` reached inside it). A run resumed past the window records
    nothing.
    """

    def __init__(self, cfg: ProfileConfig, rank: int, world_size: int, out_dir: Path) -> None:
        bad = [r for r in cfg.ranks if r >= world_size]
        if cfg.enabled and bad:
            raise ValueError(
                f"profile.ranks={cfg.ranks}: rank(s) {bad} do not exist in a world of "
                f"{world_size} ranks"
            )
        if cfg.enabled and cfg.backend == "nsys" and not torch.cuda.is_available():
            raise ValueError(
                "profile.backend=nsys needs CUDA (it opens the cudaProfilerApi capture range); "
                "use profile.backend=torch on this machine"
            )
        self.cfg = cfg
        self.rank = rank
        self.active = cfg.enabled and rank in cfg.ranks
        self.out_dir = Path(out_dir) / "profile"
        self._prof: torch.profiler.profile | None = None
        self._nvtx: contextlib.ExitStack | None = None
        self._memory_history = False
        self._first = 0  # first step of the open window
        self._last = 0  # last step run inside it
        self.written: list[Path] = []

    @property
    def recording(self) -> bool:
        return self._prof is not None or self._nvtx is not None

    def _stem(self) -> str:
        return f"rank{self.rank}_steps{self._first}-{self._last}"

    def before_step(self, step: int) -> None:
        """Opens the window when ``step`` is its first step (or the first step of a run
        resumed inside it)."""
        if not self.active or self.recording:
            return
        if not self.cfg.start_step <= step <= self.cfg.last_step:
            return
        self._first = self._last = step
        if self.cfg.backend == "nsys":
            self._start_nsys()
        else:
            self._start_torch()
        log.info(
            "profiler (%s) recording steps %d..%d on rank %d",
            self.cfg.backend,
            step,
            self.cfg.last_step,
            self.rank,
        )

    def after_step(self, step: int) -> None:
        """Closes the window after its last step."""
        if not self.recording:
            return
        self._last = step
        if self._prof is not None:
            self._prof.step()
        if step >= self.cfg.last_step:
            self._finish()

    def close(self) -> None:
        """Writes a window the run ended inside."""
        if self.recording:
            self._finish()

    # -- backends ----------------------------------------------------------------------
    def _start_torch(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            record_shapes=self.cfg.record_shapes,
            with_stack=self.cfg.with_stack,
            profile_memory=self.cfg.memory,
        )
        self._prof.__enter__()
        if self.cfg.memory and torch.cuda.is_available():
            recorder = getattr(torch.cuda.memory, "_record_memory_history", None)
            if recorder is not None:
                recorder(max_entries=_MEMORY_HISTORY_ENTRIES)
                self._memory_history = True

    def _start_nsys(self) -> None:
        self._nvtx = contextlib.ExitStack()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        self._nvtx.enter_context(
            torch.autograd.profiler.emit_nvtx(record_shapes=self.cfg.record_shapes)
        )

    def _finish(self) -> None:
        if self._nvtx is not None:
            torch.cuda.synchronize()
            self._nvtx.close()
            torch.cuda.profiler.stop()
            self._nvtx = None
            log.info("profiler (nsys) closed the capture range after step %d", self._last)
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self._stem()
        trace = self.out_dir / f"{stem}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=_TABLE_ROWS)
        ops = self.out_dir / f"{stem}_ops.txt"
        ops.write_text(table + "\n")
        self.written += [trace, ops]
        if self._memory_history:
            snapshot = self.out_dir / f"{stem}_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self._memory_history = False
            self.written.append(snapshot)
        log.info("profile of steps %d..%d written to %s", self._first, self._last, trace)
