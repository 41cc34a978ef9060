"""Triton availability and launch helpers shared by the kernels (standalone: no lumos_mcore).

triton is imported lazily, on the first launch or availability check, never when these modules
are imported: triton fixes interpreter vs. compiler mode (``TRITON_INTERPRET=1``) when it is
first imported, so an early import through the model must not freeze that choice before a test
suite has set the variable. Kernels are plain functions; :func:`jit` compiles them on first use
and binds the module global ``tl`` of their module to ``triton.language`` at that moment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "can_launch",
    "has_triton",
    "interpret_mode",
    "jit",
    "modulation_view",
    "next_pow2",
    "num_programs_hint",
    "row_warps",
    "split_rows",
]

_TRITON: dict[str, Any] = {}
_JIT_CACHE: dict[Callable[..., Any], Any] = {}
# Set by lumos_kernels.aot.capture_launches: jit() then hands out launch recorders, so the launchers'
# exact arguments can be compiled ahead of time for a GPU that is not here.
_LAUNCH_HOOK: Callable[[Callable[..., Any]], Any] | None = None
# Streaming multiprocessors to size grids for while capturing (the GPU is not here).
_SM_COUNT: int | None = None


def _modules() -> dict[str, Any]:
    """``{"triton": module, "tl": module}``, or ``{}`` when triton does not import."""
    if "ok" not in _TRITON:
        try:
            _TRITON["triton"] = importlib.import_module("triton")
            _TRITON["tl"] = importlib.import_module("triton.language")
            _TRITON["ok"] = True
        except Exception:  # ImportError, or a broken install raising something else
            _TRITON["ok"] = False
    return _TRITON if _TRITON["ok"] else {}


def has_triton() -> bool:
    """Whether triton imports here (imports it on the first call)."""
    return bool(_modules())


def interpret_mode() -> bool:
    """True when triton was imported in interpreter mode (``TRITON_INTERPRET=1`` at import):
    kernels then run as Python on CPU tensors. Its built-ins are interpreted functions then."""
    mods = _modules()
    return bool(mods) and type(mods["tl"].sum).__name__ == "InterpretedFunction"


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors here and now.

    CUDA tensors need the compiler; CPU tensors need the interpreter.
    """
    if not has_triton():
        return False
    if interpret_mode():
        return True
    return all(t.is_cuda for t in tensors)


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, built on first use and cached (a launch recorder while
    :func:`lumos_kernels.aot.capture_launches` is active)."""
    if _LAUNCH_HOOK is not None:
        return _LAUNCH_HOOK(fn)
    mods = _modules()
    if not mods:
        raise RuntimeError("triton is not importable; use the PyTorch reference of this op")
    kernel = _JIT_CACHE.get(fn)
    if kernel is None:
        fn.__globals__["tl"] = mods["tl"]
        kernel = _JIT_CACHE[fn] = mods["triton"].jit(fn)
    return kernel


def num_programs_hint(device: torch.device) -> int:
    """Programs that keep the device busy for the row-block reduction kernels.

    Four per streaming multiprocessor on CUDA (132 SMs on H100 SXM); a handful under the
    interpreter, where every program is a Python loop.
    """
    if _SM_COUNT is not None:
        return 4 * _SM_COUNT
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_warps(block: int) -> int:
    """Warps per program for a row kernel of ``block`` elements: 16-byte accesses per thread
    for bf16 at 2048 (8 warps x 32 threads x 8 elements)."""
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    if block >= 1024:
        return 4
    return 2


def split_rows(seq: int, batch: int, device: torch.device) -> tuple[int, int]:
    """``(rows_per_program, num_chunks)`` for kernels that reduce over the sequence per sample.

    The grid is ``(num_chunks, batch)``; each program walks ``rows_per_program`` tokens of one
    sample and writes one partial sum, so the per-sample reduction (``d shift``, ``d gate``)
    needs no atomics and is deterministic.
    """
    want = max(1, num_programs_hint(device) // max(1, batch))
    rows = -(-seq // min(seq, want))
    return rows, -(-seq // rows)


def modulation_view(
    t: torch.Tensor, seq: int, batch: int, dim: int, name: str
) -> tuple[torch.Tensor, int, int]:
    """View a per-sample ``[B, D]`` / ``[1, B, D]`` or per-token ``[S, B, D]`` tensor as 3-D.

    Returns ``(t3, stride_s, stride_b)`` with ``stride_s = 0`` when ``t`` broadcasts over the
    sequence; the last dim is made contiguous (adaLN chunks are strided views of one tensor,
    which is fine as long as each row is contiguous).
    """
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[1] != batch or t.shape[2] != dim or t.shape[0] not in (1, seq):
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} must be [B, D], [1, B, D] or [S, B, D] with "
            f"S={seq}, B={batch}, D={dim}"
        )
    if t.stride(2) != 1:
        t = t.contiguous()
    stride_s = 0 if t.shape[0] == 1 else t.stride(0)
    return t, stride_s, t.stride(1)
