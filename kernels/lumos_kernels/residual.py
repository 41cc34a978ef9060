"""Fused gated residual add: ``out = x + gate * (y + bias)``.

The DiT block ends both of its gated branches with this (``x + gate1 * attn_out``,
``x + gate2 * mlp_out``); megatron's row-parallel output projection returns its bias separately
(``skip_bias_add``), so the bias add is folded in as well: one read of ``x`` and ``y``, one write,
instead of three elementwise passes. ``gate`` is per sample (``[B, D]`` / ``[1, B, D]``) or per
token (``[S, B, D]``); ``bias`` is ``[D]`` or absent.

Backward: ``dx = dout`` (passed through, no copy), ``dy = dout * gate``,
``d gate = sum_s dout * (y + bias)`` and ``d bias = sum_{s,b} dout * gate``, the sums reduced
per ``(chunk, sample)`` program as in :mod:`lumos_kernels.adaln`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lumos_kernels._triton import (
    can_launch,
    jit,
    modulation_view,
    next_pow2,
    row_warps,
    split_rows,
)

tl: Any = None  # triton.language, bound by lumos_kernels._triton.jit on the first launch

__all__ = ["gated_residual", "gated_residual_reference", "gated_residual_triton"]


def gated_residual_reference(
    x: Tensor, y: Tensor, gate: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Eager PyTorch: the DiT layer's ``x + gate * _add_bias(out, bias)`` (the fallback)."""
    if bias is not None:
        y = y + bias  # [s, b, h]
    return x + gate * y  # [s, b, h]


def _fwd_kernel(
    X,
    Y,
    GATE,
    BIAS,
    OUT,
    B,
    D,
    g_stride_s,
    g_stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = s * B + b
    s = row // B
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + s * g_stride_s + b * g_stride_b + cols, mask=mask, other=0.0)
    out = x + g.to(tl.float32) * y
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


def _bwd_kernel(
    DOUT,
    Y,
    GATE,
    BIAS,
    DY,
    DGATE,
    DBIAS,
    S,
    B,
    D,
    g_stride_s,
    g_stride_b,
    rows_per_prog,
    HAS_BIAS: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)  # int32 loop bounds; row offsets below are int64 through b
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    s0 = chunk * rows_per_prog
    s1 = tl.minimum(s0 + rows_per_prog, S)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(
        GATE + ((s0 * B + b) // B) * g_stride_s + b * g_stride_b + cols, mask=mask, other=0.0
    )
    for s in range(s0, s1):
        row = s * B + b
        dout = tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32) + bias
        if PER_TOKEN:
            g = tl.load(
                GATE + (row // B) * g_stride_s + b * g_stride_b + cols, mask=mask, other=0.0
            )
        dy = dout * g.to(tl.float32)
        tl.store(DY + row * D + cols, dy.to(DY.dtype.element_ty), mask=mask)
        acc_bias += dy
        if PER_TOKEN:
            tl.store(DGATE + row * D + cols, dout * y, mask=mask)
        else:
            acc_gate += dout * y
    part = (chunk * B + b) * D
    if not PER_TOKEN:
        tl.store(DGATE + part + cols, acc_gate, mask=mask)
    if HAS_BIAS:
        tl.store(DBIAS + part + cols, acc_bias, mask=mask)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, gate: Tensor, bias: Tensor | None) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have one shape")
        s, b, d = x.shape
        if bias is not None and bias.shape != (d,):
            raise ValueError(f"bias: shape {tuple(bias.shape)} must be [D] with D={d}")
        x, y = x.contiguous(), y.contiguous()
        gate3, g_ss, g_sb = modulation_view(gate, s, b, d, "gate")
        dtypes = [x.dtype, y.dtype, gate.dtype] + ([bias.dtype] if bias is not None else [])
        out_dtype = dtypes[0]
        for dt in dtypes[1:]:
            out_dtype = torch.promote_types(out_dtype, dt)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # [s, b, h]
        block = next_pow2(d)
        if s * b:
            jit(_fwd_kernel)[(s * b,)](
                x, y, gate3, bias if bias is not None else x, out, b, d, g_ss, g_sb,
                HAS_BIAS=bias is not None, BLOCK_D=block, num_warps=row_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(y, gate3, bias)
        ctx.meta = (x.dtype, gate.shape, gate.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        y, gate3, bias = ctx.saved_tensors
        x_dtype, gate_shape, gate_dtype = ctx.meta
        s, b, d = y.shape
        dout_c = dout.contiguous()
        per_token = gate3.shape[0] == s and s > 1
        g_ss = gate3.stride(0) if gate3.shape[0] > 1 else 0
        rows, chunks = split_rows(max(s, 1), b, y.device)
        dy = torch.empty_like(y)
        dgate = torch.zeros(
            (s if per_token else chunks, b, d), dtype=torch.float32, device=y.device
        )
        has_bias = bias is not None
        dbias = torch.zeros(
            (chunks, b, d) if has_bias else (1,), dtype=torch.float32, device=y.device
        )
        block = next_pow2(d)
        if s * b:
            jit(_bwd_kernel)[(chunks, b)](
                dout_c, y, gate3, bias if has_bias else y, dy, dgate, dbias, s, b, d, g_ss,
                gate3.stride(1), rows,
                HAS_BIAS=has_bias, PER_TOKEN=per_token, BLOCK_D=block,
                num_warps=row_warps(block),
            )  # fmt: skip
        if not per_token:
            dgate = dgate.sum(0, keepdim=True)  # [1, b, h]
        dgate = dgate.reshape(gate_shape).to(gate_dtype)
        dbias_out = dbias.sum((0, 1)).to(bias.dtype) if has_bias else None  # [h]
        dx = dout if dout.dtype == x_dtype else dout.to(x_dtype)
        return dx, dy, dgate, dbias_out


def gated_residual_triton(x: Tensor, y: Tensor, gate: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused Triton forward and backward of :func:`gated_residual_reference`.

    ``x``, ``y``: ``[S, B, D]``; ``gate``: ``[B, D]``, ``[1, B, D]`` or ``[S, B, D]``;
    ``bias``: ``[D]`` or None. Computed in float32, rounded once to the promoted dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x: shape {tuple(x.shape)} must be [S, B, D] (megatron layout)")
    return _GatedResidual.apply(x, y, gate, bias)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor, bias: Tensor | None = None) -> Tensor:
    """Triton when it can run on these tensors (CUDA, or the CPU interpreter), else PyTorch."""
    tensors = (x, y, gate) if bias is None else (x, y, gate, bias)
    if can_launch(*tensors):
        return gated_residual_triton(x, y, gate, bias)
    return gated_residual_reference(x, y, gate, bias)
