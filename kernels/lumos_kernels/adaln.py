"""Fused non-affine LayerNorm / RMSNorm + adaLN modulation: ``norm(x) * (1 + scale) + shift``.

Every DiT block applies this twice. Eager PyTorch reads and writes the ``[s, b, h]`` activation
three times (norm, multiply, add); the fused kernel reads ``x`` once and writes ``y`` once, with
statistics in float32. ``shift`` / ``scale`` are per sample (``[B, D]`` or ``[1, B, D]``,
broadcast over tokens) or per token (``[S, B, D]``, e.g. a clean condition frame in video).

Backward: ``dx`` is the usual norm backward of ``dy * (1 + scale)``; ``d shift = sum_s dy`` and
``d scale = sum_s dy * x_hat`` are reduced per sample by a ``(chunks, B)`` grid of programs
that each walk a block of tokens and write one partial sum (no atomics, deterministic), summed
over chunks on the host. With per-token modulation the grads are written per row instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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

__all__ = ["NORMS", "norm_modulate", "norm_modulate_reference", "norm_modulate_triton"]

NORMS = ("layernorm", "rmsnorm")


def norm_modulate_reference(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, norm: str = "layernorm"
) -> Tensor:
    """Eager PyTorch: exactly the math of the DiT layer's norm + ``modulate`` (the fallback)."""
    _check_norm(norm)
    if norm == "layernorm":
        h = F.layer_norm(x, (x.shape[-1],), eps=eps)  # [s, b, h]
    else:
        xf = x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # [s, b, h]
    return h * (1 + scale) + shift  # [s, b, h]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")


# ---------------------------------------------------------------------------------------------
# Triton kernels (compiled on first launch, see lumos_kernels._triton.jit)
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(
    X,
    SHIFT,
    SCALE,
    Y,
    MEAN,
    RSTD,
    B,
    D,
    sh_stride_s,
    sh_stride_b,
    sc_stride_s,
    sc_stride_b,
    eps,
    RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one token of one sample: row = s * B + b
    s = row // B
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    sh = tl.load(SHIFT + s * sh_stride_s + b * sh_stride_b + cols, mask=mask, other=0.0)
    sc = tl.load(SCALE + s * sc_stride_s + b * sc_stride_b + cols, mask=mask, other=0.0)
    y = xc * rstd * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


def _bwd_kernel(
    DY,
    X,
    SCALE,
    MEAN,
    RSTD,
    DX,
    DSHIFT,
    DSCALE,
    S,
    B,
    D,
    sc_stride_s,
    sc_stride_b,
    rows_per_prog,
    RMS: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)  # int32 loop bounds; row offsets below are int64 through b
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    s0 = chunk * rows_per_prog
    s1 = tl.minimum(s0 + rows_per_prog, S)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sc = tl.load(
        SCALE + ((s0 * B + b) // B) * sc_stride_s + b * sc_stride_b + cols, mask=mask, other=0.0
    )
    for s in range(s0, s1):
        row = s * B + b
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if PER_TOKEN:
            sc = tl.load(
                SCALE + (row // B) * sc_stride_s + b * sc_stride_b + cols, mask=mask, other=0.0
            )
        if RMS:
            xhat = x * rstd
        else:
            mean = tl.load(MEAN + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * (1.0 + sc.to(tl.float32))  # d loss / d x_hat
        c1 = tl.sum(g * xhat, axis=0) / D
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / D
            dx = (g - c2 - xhat * c1) * rstd
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(DSHIFT + row * D + cols, dy, mask=mask)
            tl.store(DSCALE + row * D + cols, dy * xhat, mask=mask)
        else:
            acc_shift += dy
            acc_scale += dy * xhat
    if not PER_TOKEN:
        part = (chunk * B + b) * D
        tl.store(DSHIFT + part + cols, acc_shift, mask=mask)
        tl.store(DSCALE + part + cols, acc_scale, mask=mask)


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, scale: Tensor, eps: float, rms: bool) -> Tensor:
        s, b, d = x.shape
        x = x.contiguous()
        shift3, sh_ss, sh_sb = modulation_view(shift, s, b, d, "shift")
        scale3, sc_ss, sc_sb = modulation_view(scale, s, b, d, "scale")
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # [s, b, h]
        rows = s * b
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_pow2(d)
        if rows:
            jit(_fwd_kernel)[(rows,)](
                x, shift3, scale3, y, mean, rstd, b, d, sh_ss, sh_sb, sc_ss, sc_sb, eps,
                RMS=rms, BLOCK_D=block, num_warps=row_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(x, scale3, mean, rstd)
        ctx.rms = rms
        ctx.shapes = (shift.shape, scale.shape)
        ctx.dtypes = (shift.dtype, scale.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, scale3, mean, rstd = ctx.saved_tensors
        s, b, d = x.shape
        dy = dy.contiguous()
        per_token = scale3.shape[0] == s and s > 1
        sc_ss = scale3.stride(0) if scale3.shape[0] > 1 else 0
        dx = torch.empty_like(x)
        rows, chunks = split_rows(max(s, 1), b, x.device)
        lead = s if per_token else chunks
        dshift = torch.empty((lead, b, d), dtype=torch.float32, device=x.device)
        dscale = torch.empty((lead, b, d), dtype=torch.float32, device=x.device)
        block = next_pow2(d)
        if s * b:
            jit(_bwd_kernel)[(chunks, b)](
                dy, x, scale3, mean, rstd, dx, dshift, dscale, s, b, d, sc_ss,
                scale3.stride(1), rows,
                RMS=ctx.rms, PER_TOKEN=per_token, BLOCK_D=block, num_warps=row_warps(block),
            )  # fmt: skip
        else:
            dshift.zero_()
            dscale.zero_()
        if not per_token:
            dshift = dshift.sum(0, keepdim=True)  # [1, b, h]
            dscale = dscale.sum(0, keepdim=True)
        (shift_shape, scale_shape), (shift_dtype, scale_dtype) = ctx.shapes, ctx.dtypes
        dshift = dshift.reshape(shift_shape).to(shift_dtype)
        dscale = dscale.reshape(scale_shape).to(scale_dtype)
        return dx, dshift, dscale, None, None


def norm_modulate_triton(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, norm: str = "layernorm"
) -> Tensor:
    """Fused Triton forward and backward of :func:`norm_modulate_reference`.

    ``x``: ``[S, B, D]``; ``shift``/``scale``: ``[B, D]``, ``[1, B, D]`` or ``[S, B, D]``.
    Statistics and the modulation are computed in float32, the output rounded once.
    """
    _check_norm(norm)
    if x.dim() != 3:
        raise ValueError(f"x: shape {tuple(x.shape)} must be [S, B, D] (megatron layout)")
    return _NormModulate.apply(x, shift, scale, float(eps), norm == "rmsnorm")


def norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, norm: str = "layernorm"
) -> Tensor:
    """Triton when it can run on these tensors (CUDA, or the CPU interpreter), else PyTorch."""
    if can_launch(x, shift, scale):
        return norm_modulate_triton(x, shift, scale, eps, norm)
    return norm_modulate_reference(x, shift, scale, eps, norm)
