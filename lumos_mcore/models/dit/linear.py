"""megatron's tensor-parallel linears with the bias folded into the GEMM where it is exact.

megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` run ``matmul`` and add the bias in
a second pass over the output (or hand it back with ``skip_bias_add``). In a DiT layer that is
seven extra passes over ``[s, b, h]`` .. ``[s, b, 4h]`` activations per layer forward (more in
backward) -- about 6 % of a CPU train step, measured against diffusers' PixArt, whose
``nn.Linear`` uses ``addmm``. When the linear does no tensor-parallel communication at all (TP
size 1, no sequence parallelism) and none of megatron's GEMM-side features is on
(gradient-accumulation fusion, deferred embedding wgrad, CPU offloading), megatron's forward is
exactly ``x @ W^T (+ b)``; these subclasses then compute ``F.linear(x, W, b)`` and return
``(out, None)``. Every other case is megatron's own forward, unchanged.

Returning the bias already added (``None`` as the second value) is what megatron's callers do
when ``skip_bias_add`` is off, and the DiT layer, MLP and attention handle a ``None`` bias.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

__all__ = ["FusedBiasColumnParallelLinear", "FusedBiasRowParallelLinear", "bias_fusable"]


def bias_fusable(linear: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether megatron's forward of ``linear`` is a plain ``x @ W^T + b`` (no TP traffic)."""
    cfg = linear.config
    tp = linear.tp_group.size() if linear.tp_group is not None else 1
    return (
        tp == 1
        and not linear.sequence_parallel
        and not linear.gradient_accumulation_fusion
        and not getattr(linear, "explicit_expert_comm", False)
        and not getattr(cfg, "defer_embedding_wgrad_compute", False)
        and getattr(cfg, "_cpu_offloading_context", None) is None
    )


class FusedBiasColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` computing ``F.linear(x, W, b)`` when :func:`bias_fusable`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fused = bias_fusable(self)

    def forward(
        self,
        input_: Tensor,
        weight: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._fused or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        return F.linear(input_, self.weight, self.bias), None  # [s, b, out]


class FusedBiasRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` computing ``F.linear(x, W, b)`` when :func:`bias_fusable`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fused = bias_fusable(self)

    def forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self._fused:
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None  # [s, b, out]
