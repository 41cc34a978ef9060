"""Pick the Triton kernel or the PyTorch reference for each fused op, by measurement.

A kernel is used only where it runs (CUDA tensors, triton importable) *and* was measured faster
than the eager reference, by :data:`MARGIN`, for forward + backward on this GPU (back-to-back
calls, as the training step queues them; a kernel that fails to compile or launch counts as
infinitely slow). The decision is made once per op and logged once:

- :func:`autoselect` (collective): every rank times both paths on synthetic tensors of the
  run's shape, the timings are averaged over the process group, so all ranks of a tensor-
  parallel group make the *same* choice (replicated activations must stay bit-identical across
  TP ranks, or the replicated adaLN weights would slowly drift apart). Call it once at set-up on
  every rank.
- Without :func:`autoselect`, a single-process run measures on the first call of each op (on
  the real arguments); a multi-process run keeps the PyTorch reference (and says so in the
  log), because a per-rank measurement could disagree between ranks.

``LUMOS_KERNELS=triton`` forces the kernels wherever they can run (CUDA, or the CPU
interpreter under ``TRITON_INTERPRET=1``), ``LUMOS_KERNELS=torch`` forces the references, and
``auto`` (default) measures. CPU tensors use the references in ``auto`` mode.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import lumos_kernels
from lumos_kernels import adaln as _nm
from lumos_kernels import residual as _gr
from lumos_kernels import rope3d as _rope
from lumos_mcore.perf.hardware import time_calls

log = logging.getLogger(__name__)

__all__ = [
    "ENV",
    "MARGIN",
    "MODES",
    "OPS",
    "KernelChoice",
    "apply_rope3d",
    "autoselect",
    "gated_residual",
    "kernel_choices",
    "kernel_mode",
    "norm_modulate",
    "reset_kernel_choices",
]

ENV = "LUMOS_KERNELS"
MODES = ("auto", "triton", "torch")
OPS = ("norm_modulate", "gated_residual", "rope3d")


@dataclass(frozen=True)
class KernelChoice:
    """The backend chosen for one op and why (timings in ms for forward + backward)."""

    op: str
    backend: str  # "triton" | "torch"
    reason: str
    triton_ms: float | None = None
    torch_ms: float | None = None


_choices: dict[str, KernelChoice] = {}
_logged: set[str] = set()


def kernel_mode() -> str:
    """The ``LUMOS_KERNELS`` mode (validated)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def kernel_choices() -> dict[str, KernelChoice]:
    """Decisions made so far (op -> choice)."""
    return dict(_choices)


def reset_kernel_choices() -> None:
    """Forget all decisions (tests, or a new run in the same process)."""
    _choices.clear()
    _logged.clear()


def _log_once(key: str, msg: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def _record(choice: KernelChoice) -> KernelChoice:
    _choices[choice.op] = choice
    timing = ""
    if choice.triton_ms is not None and choice.torch_ms is not None:
        timing = f" (triton {choice.triton_ms:.3f} ms, torch {choice.torch_ms:.3f} ms, fwd+bwd)"
    _log_once(
        f"choice:{choice.op}",
        "kernel %s: %s -- %s%s",
        choice.op,
        choice.backend,
        choice.reason,
        timing,
    )
    return choice


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _time_ms(
    fn: Callable[[], None], device: torch.device, warmup: int = 3, reps: int = 10, blocks: int = 3
) -> float:
    """Time of one ``fn`` call in ms: the median over ``blocks`` of ``reps`` back-to-back calls.

    On CUDA the calls of a block are queued between one pair of events with no synchronisation
    in between, as in training, where the host runs ahead of the GPU: synchronising after every
    call would add the host's launch and autograd overhead to each, and for these memory-bound
    ops that overhead can exceed the kernel time and flip the choice.
    """
    for _ in range(warmup):
        fn()
    times = [time_calls(fn, reps, device) * 1e3 / reps for _ in range(blocks)]
    return statistics.median(times)


# The arguments each op differentiates in training (RoPE's angles are constants). The timing is
# always forward + backward on these: the choice is made for training, also when the first call
# comes from a no-grad forward (full activation recompute, validation, sampling).
_GRAD_ARGS = {"norm_modulate": (0, 1, 2), "gated_residual": (0, 1, 2, 3), "rope3d": (0,)}


def _fwd_bwd(
    impl: Callable[..., Tensor], args: Sequence, kwargs: dict, grad_args: Sequence[int]
) -> Callable[[], None]:
    """A closure running ``impl`` forward and backward on copies of ``args``."""
    with torch.inference_mode(False):  # a first call under inference_mode: normal copies
        copies = [
            a.clone().detach().requires_grad_(i in grad_args and a.is_floating_point())
            if isinstance(a, Tensor)
            else a
            for i, a in enumerate(args)
        ]
    leaves = [a for a in copies if isinstance(a, Tensor) and a.requires_grad]

    def run() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            out = impl(*copies, **kwargs)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def _measure(
    op: str, triton_impl: Callable, torch_impl: Callable, args: Sequence, kwargs: dict
) -> tuple[float, float]:
    """(triton ms, torch ms) for forward + backward; a Triton failure (compile error, launch
    limit, out of resources) times as infinite, so the reference is kept, and is logged."""
    device = next(a.device for a in args if isinstance(a, Tensor))
    grad_args = _GRAD_ARGS[op]
    try:
        t_triton = _time_ms(_fwd_bwd(triton_impl, args, kwargs, grad_args), device)
    except Exception as exc:  # noqa: BLE001 -- any failure means: do not use the kernel
        log.warning("kernel %s: the Triton kernel failed (%s: %s); using torch", op,
                    type(exc).__name__, exc)  # fmt: skip
        t_triton = float("inf")
    t_torch = _time_ms(_fwd_bwd(torch_impl, args, kwargs, grad_args), device)
    return t_triton, t_torch


# ---------------------------------------------------------------------------------------------
# Decision
# ---------------------------------------------------------------------------------------------
def _use_triton(
    op: str, triton_impl: Callable, torch_impl: Callable, args: Sequence, kwargs: dict
) -> bool:
    mode = kernel_mode()
    tensors = [a for a in args if isinstance(a, Tensor)]
    if mode == "torch":
        _log_once(f"mode:{op}", "kernel %s: torch (%s=torch)", op, ENV)
        return False
    if mode == "auto" and not all(t.is_cuda for t in tensors):
        _log_once(f"cpu:{op}", "kernel %s: torch (CPU tensors)", op)
        return False
    if not lumos_kernels.has_triton():
        _log_once(f"notriton:{op}", "kernel %s: torch (triton is not importable)", op)
        return False
    if mode == "triton":
        if lumos_kernels.can_launch(*tensors):
            _log_once(f"mode:{op}", "kernel %s: triton (%s=triton)", op, ENV)
            return True
        _log_once(f"cpu:{op}", "kernel %s: torch (triton cannot run on these tensors)", op)
        return False
    choice = _choices.get(op)
    if choice is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            choice = _record(
                KernelChoice(
                    op,
                    "torch",
                    "multi-process run without lumos_mcore.ops.autoselect(); call it at set-up "
                    "so that all ranks measure and choose together",
                )
            )
        elif torch.cuda.is_current_stream_capturing():
            return False  # no timing inside CUDA-graph capture; decide on a later eager call
        else:
            t_triton, t_torch = _measure(op, triton_impl, torch_impl, args, kwargs)
            choice = _record(_decide(op, t_triton, t_torch, "measured on the first call"))
    return choice.backend == "triton"


# The kernel must beat the reference by this factor: a tie within timing noise keeps the
# reference, the path every CPU test checks.
MARGIN = 0.97


def _decide(op: str, t_triton: float, t_torch: float, how: str) -> KernelChoice:
    faster = t_triton < MARGIN * t_torch
    reason = "triton faster" if faster else f"torch faster or triton within {1 - MARGIN:.0%}"
    return KernelChoice(op, "triton" if faster else "torch", f"{how}: {reason}", t_triton, t_torch)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, norm: str = "layernorm"
) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` for ``x [s, b, h]``, modulation ``[b, h]``,
    ``[1, b, h]`` or ``[s, b, h]`` (non-affine LayerNorm or RMSNorm)."""
    args, kw = (x, shift, scale), {"eps": eps, "norm": norm}
    if _use_triton(
        "norm_modulate", _nm.norm_modulate_triton, _nm.norm_modulate_reference, args, kw
    ):
        return _nm.norm_modulate_triton(*args, **kw)
    return _nm.norm_modulate_reference(*args, **kw)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x + gate * (y + bias)`` for ``x, y [s, b, h]``, ``gate`` per sample or per token,
    ``bias [h]`` or None (the row-parallel projection's skipped bias)."""
    args = (x, y, gate, bias)
    if _use_triton(
        "gated_residual", _gr.gated_residual_triton, _gr.gated_residual_reference, args, {}
    ):
        return _gr.gated_residual_triton(*args)
    return _gr.gated_residual_reference(*args)


def apply_rope3d(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x [s, b, np, hn]`` (or ``[t, np, hn]``) by the
    per-token angles ``freqs [s, P]`` (see :mod:`lumos_kernels.rope3d` for the 3-D band layout)."""
    args = (x, freqs)
    if _use_triton("rope3d", _rope.apply_rope3d_triton, _rope.apply_rope3d_reference, args, {}):
        return _rope.apply_rope3d_triton(*args)
    return _rope.apply_rope3d_reference(*args)


# ---------------------------------------------------------------------------------------------
# Collective selection
# ---------------------------------------------------------------------------------------------
def _synthetic(
    op: str,
    seq_len: int,
    batch: int,
    hidden: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    norm: str,
) -> tuple[tuple, dict]:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return (
            torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
            .to(dt)
            .requires_grad_()
        )

    if op == "norm_modulate":
        x = rnd(seq_len, batch, hidden)
        return (x, rnd(1, batch, hidden), rnd(1, batch, hidden)), {"eps": 1e-6, "norm": norm}
    if op == "gated_residual":
        x = rnd(seq_len, batch, hidden)
        return (x, rnd(seq_len, batch, hidden), rnd(1, batch, hidden), rnd(hidden)), {}
    freqs = 100 * torch.rand(seq_len, head_dim // 2, generator=g, device=device)  # angles
    return (rnd(seq_len, batch, heads, head_dim), freqs), {}


_IMPLS = {
    "norm_modulate": (_nm.norm_modulate_triton, _nm.norm_modulate_reference),
    "gated_residual": (_gr.gated_residual_triton, _gr.gated_residual_reference),
    "rope3d": (_rope.apply_rope3d_triton, _rope.apply_rope3d_reference),
}


def autoselect(
    *,
    seq_len: int,
    batch: int,
    hidden_size: int,
    num_heads: int,
    head_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    ops: Sequence[str] = OPS,
    norm: str = "layernorm",
) -> dict[str, KernelChoice]:
    """Time Triton vs PyTorch for each op at the run's shape and fix the choice (collective).

    ``seq_len`` is the local token count per sample (after SP / CP splitting), ``norm`` the
    model's norm (``layernorm`` | ``rmsnorm``: the two kernels differ). Every rank of
    ``group`` (default: the whole job, when torch.distributed is initialised) must call this;
    timings are averaged over the group so all ranks choose the same backend. Ranks that
    cannot run Triton report an infinite time, which makes every rank keep PyTorch.
    """
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"ops={unknown}: unknown; choose from {', '.join(OPS)}")
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm={norm!r}: choose layernorm or rmsnorm")
    if head_dim is None:
        head_dim = hidden_size // num_heads
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(device)
    mode = kernel_mode()
    runnable = lumos_kernels.has_triton() and (
        device.type == "cuda" or lumos_kernels.can_launch(torch.empty(0, device=device))
    )
    timings = torch.full((len(ops), 2), float("inf"), dtype=torch.float64)
    if runnable and mode == "auto":
        for i, op in enumerate(ops):
            args, kw = _synthetic(
                op, seq_len, batch, hidden_size, num_heads, head_dim, dtype, device, norm
            )
            timings[i, 0], timings[i, 1] = _measure(op, *_IMPLS[op], args, kw)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        reduce_dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        t = timings.to(reduce_dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        timings = t.cpu() / dist.get_world_size(group)
    how = f"autoselect over {dist.get_world_size(group)} ranks" if distributed else "autoselect"
    result = {}
    for i, op in enumerate(ops):
        _logged.discard(f"choice:{op}")
        if mode != "auto":
            backend = "triton" if mode == "triton" and runnable else "torch"
            result[op] = _record(KernelChoice(op, backend, f"{ENV}={mode}"))
        elif not torch.isfinite(timings[i]).all():
            result[op] = _record(
                KernelChoice(op, "torch", f"{how}: triton cannot run on every rank")
            )
        else:
            result[op] = _record(_decide(op, float(timings[i, 0]), float(timings[i, 1]), how))
    return result
