"""The ``profile`` section: a bounded window of steps traced by torch.profiler or Nsight."""

from __future__ import annotations

from dataclasses import dataclass, field

PROFILE_BACKENDS = ("torch", "nsys")


@dataclass
class ProfileConfig:
    """Trace steps ``start_step .. start_step + num_steps - 1`` (1-based) on ``ranks``.

    ``backend=torch`` records torch.profiler (CPU ops, and CUDA kernels on GPU) and writes a
    Chrome / Perfetto trace plus an op summary per rank under ``<train.output_dir>/profile``.
    ``backend=nsys`` instead opens the CUDA profiler range (``cudaProfilerStart/Stop``) and
    emits NVTX ranges for every op, for ``nsys profile --capture-range=cudaProfilerApi``.
    Steps before ``start_step`` are the warm-up (allocator, autotuning, kernel choice), so the
    default skips the first few. ``memory=true`` adds allocation records: torch.profiler's
    memory profile, and on CUDA a ``torch.cuda.memory`` snapshot readable at
    https://pytorch.org/memory_viz.
    """

    enabled: bool = False
    start_step: int = 5
    num_steps: int = 2
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that record
    backend: str = "torch"
    record_shapes: bool = True
    with_stack: bool = False  # Python stacks per op (large traces, slow export)
    memory: bool = False

    def __post_init__(self) -> None:
        if self.start_step < 1:
            raise ValueError(f"profile.start_step={self.start_step}: must be >= 1 (1-based)")
        if self.num_steps < 1:
            raise ValueError(f"profile.num_steps={self.num_steps}: must be >= 1")
        if not self.ranks:
            raise ValueError("profile.ranks=[]: give at least one global rank, e.g. [0]")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"profile.ranks={self.ranks}: ranks are >= 0")
        if self.backend not in PROFILE_BACKENDS:
            raise ValueError(
                f"profile.backend={self.backend!r}: choose one of {', '.join(PROFILE_BACKENDS)}"
            )

    @property
    def last_step(self) -> int:
        """The last traced step (1-based, inclusive)."""
        return self.start_step + self.num_steps - 1
