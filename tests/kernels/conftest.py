"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else in Triton's CPU
interpreter. triton fixes its mode when first imported, so ``TRITON_INTERPRET=1`` is set here,
at collection, before anything in this folder imports it (``lumos_kernels`` imports triton lazily)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run in this session (CUDA, or CPU through the interpreter)."""
    import lumos_kernels

    if not lumos_kernels.has_triton():
        pytest.skip("triton is not installed (pip install -r requirements.txt)")
    if DEVICE.type == "cpu" and not lumos_kernels.interpret_mode():
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so its "
            "CPU interpreter is off; run `TRITON_INTERPRET=1 pytest ...` or tests/kernels alone"
        )
    return DEVICE


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN / inf never pass)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# Relative-error bounds: float32 math rounds far below 1e-5; a bf16 result rounded once is
# ~2e-3 off (8 mantissa bits), so 1e-2 leaves room without hiding a wrong formula.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
