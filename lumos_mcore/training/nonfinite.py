"""Steps whose loss or gradients are not finite: found on every rank at once, then skipped or
stopped with a checkpoint of the last good state.

megatron's own check (DDP ``check_for_nan_in_grad``) raises on the one rank whose gradient
bucket holds the NaN, before the data-parallel collective: the message names no step, the
other ranks are left waiting in that collective until the launcher kills them, and nothing is
saved. Here one small all-reduce after the backward pass (a flag per rank for the loss and for
the gradients) lets every rank agree, before the optimizer touches anything, on whether this
step's update is applied, skipped (``train.nonfinite_skips``) or the run stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were NaN / Inf and the run may not skip it."""


def _grad_tensors(chunk: nn.Module) -> list[Tensor]:
    """The gradients this rank holds for ``chunk``: megatron DDP's contiguous grad buffers
    (one reduction each) when wrapped, else each parameter's ``main_grad`` / ``grad``."""
    buffers = getattr(chunk, "buffers", None)
    if isinstance(buffers, list):
        buffers = buffers + list(getattr(chunk, "expert_parallel_buffers", None) or [])
        return [b.grad_data for b in buffers]
    grads = []
    for p in chunk.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            grads.append(g)
    return grads


def grads_finite(chunks: Sequence[nn.Module], device: torch.device) -> Tensor:
    """A 0-d bool tensor: every gradient element this rank holds is finite.

    The sum of each buffer is NaN / Inf exactly when an element is (or when finite values
    overflow fp32, which no trainable run survives either), and needs no temporary the size
    of the buffer. With the distributed optimizer the buffer outside this rank's shard holds
    the local, unreduced gradients; a non-finite value there is non-finite in the reduced
    shard of its owner too, so checking the whole buffer flags no step the owner would not.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for chunk in chunks:
        for g in _grad_tensors(chunk):
            total += g.sum(dtype=torch.float32)
    return torch.isfinite(total)


@dataclass(frozen=True)
class NonFiniteReport:
    """Which ranks saw a non-finite loss (last pipeline stages) or gradient this step."""

    loss_ranks: tuple[int, ...]
    grad_ranks: tuple[int, ...]

    @property
    def bad(self) -> bool:
        return bool(self.loss_ranks or self.grad_ranks)

    def describe(self) -> str:
        parts = []
        if self.loss_ranks:
            parts.append(f"the loss is not finite on {_ranks(self.loss_ranks)}")
        if self.grad_ranks:
            parts.append(f"gradients are not finite on {_ranks(self.grad_ranks)}")
        return " and ".join(parts) or "loss and gradients are finite"


def _ranks(ranks: tuple[int, ...], most: int = 16) -> str:
    shown = ", ".join(map(str, ranks[:most]))
    more = f" and {len(ranks) - most} more" if len(ranks) > most else ""
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {shown}{more}"


def find_nonfinite(
    chunks: Sequence[nn.Module], loss: Tensor | None, device: torch.device
) -> NonFiniteReport:
    """Every rank's verdict on this step (one all-reduce of ``2 x world`` floats).

    ``loss`` is this rank's step loss where it has one (the last pipeline stage), else None.
    Call after the backward pass and megatron's ``finalize_model_grads``, before the optimizer.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(2, world, dtype=torch.float32, device=device)
    if loss is not None:
        flags[0, rank] = (~torch.isfinite(loss.detach()).all()).float()
    flags[1, rank] = (~grads_finite(chunks, device)).float()
    dist.all_reduce(flags)
    bad = flags.cpu() > 0
    return NonFiniteReport(
        loss_ranks=tuple(bad[0].nonzero().flatten().tolist()),
        grad_ranks=tuple(bad[1].nonzero().flatten().tolist()),
    )


class NonFiniteGuard:
    """Decides, identically on every rank, what a step with a non-finite loss or gradient does.

    Up to ``max_skips`` consecutive such steps are skipped: no optimizer update and no EMA
    update, while the step counter, the data position and the learning-rate schedule move on
    as for any step (the schedule stays a function of the step). The next one raises
    :class:`NonFiniteError`; with ``max_skips=0`` that is the first. ``total`` counts skipped
    steps over the whole run (it is kept in checkpoints).
    """

    def __init__(self, max_skips: int, total: int = 0) -> None:
        self.max_skips = max_skips
        self.total = total
        self.consecutive = 0

    def skip(self, step: int, report: NonFiniteReport) -> bool:
        """True: do not apply step ``step`` (1-based). Raises when the run has to stop."""
        if not report.bad:
            self.consecutive = 0
            return False
        if self.consecutive >= self.max_skips:
            before = (
                f" after {self.consecutive} consecutive skipped steps"
                f" (train.nonfinite_skips={self.max_skips})"
                if self.max_skips
                else ""
            )
            raise NonFiniteError(
                f"step {step}: {report.describe()}{before}; nothing of this step was applied. "
                "If the loss diverged, lower optim.lr, raise optim.warmup_steps or lower "
                "optim.clip_grad; if a few batches are bad, resume with "
                "train.nonfinite_skips=N to pass over up to N consecutive such steps."
            )
        self.consecutive += 1
        self.total += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning(
                "step %d: %s; update skipped (%d consecutive, train.nonfinite_skips=%d, "
                "%d skipped in this run)",
                step,
                report.describe(),
                self.consecutive,
                self.max_skips,
                self.total,
            )
        return True
