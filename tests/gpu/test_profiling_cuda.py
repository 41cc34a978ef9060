"""The step profiler on CUDA: GPU kernels in the trace, the memory snapshot, and the nsys
capture range (cudaProfilerStart/Stop are no-ops without nsys attached, so they run here)."""

from __future__ import annotations

import json
import pickle

import torch

from lumos_mcore.config.profile import ProfileConfig
from lumos_mcore.training.profiling import StepProfiler, phase
from tests.gpu.helpers import requires_cuda


def _steps(prof: StepProfiler, steps: range) -> None:
    x = torch.randn(256, 256, device="cuda")
    for step in steps:
        prof.before_step(step)
        with phase("forward_backward"):
            (x @ x).sum().item()
        prof.after_step(step)


@requires_cuda
def test_trace_has_cuda_kernels_and_memory_snapshot(tmp_path):
    cfg = ProfileConfig(enabled=True, start_step=2, num_steps=2, memory=True)
    prof = StepProfiler(cfg, 0, 1, tmp_path)
    _steps(prof, range(1, 5))
    names = {p.name for p in prof.written}
    assert "rank0_steps2-3.pt.trace.json" in names
    trace = json.loads((tmp_path / "profile" / "rank0_steps2-3.pt.trace.json").read_text())
    cats = {e.get("cat", "") for e in trace["traceEvents"]}
    assert "kernel" in cats  # CUDA activity recorded
    if hasattr(torch.cuda.memory, "_record_memory_history"):
        snap = tmp_path / "profile" / "rank0_steps2-3_memory.pickle"
        data = pickle.loads(snap.read_bytes())
        assert data["segments"]  # the allocations of the window


@requires_cuda
def test_nsys_backend_opens_and_closes_the_capture_range(tmp_path):
    prof = StepProfiler(ProfileConfig(enabled=True, start_step=1, backend="nsys"), 0, 1, tmp_path)
    _steps(prof, range(1, 2))
    assert prof.recording
    _steps(prof, range(2, 4))
    assert not prof.recording and prof.written == []
