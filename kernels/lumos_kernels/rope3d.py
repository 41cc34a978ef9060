"""3-D rotary position embedding for video tokens (Lumina / Flag-DiT style), fused apply.

Token order is frame-major ``(t, h, w)``: token ``n = (f * H + i) * W + j`` has position
``(f, i, j)`` (the order used everywhere in the engine, see ``models/common/embeddings``).

**Head-dim split.** The ``head_dim / 2`` rotation pairs are cut into three contiguous bands, one
per axis: pairs ``[0, P_t)`` rotate with the frame index, ``[P_t, P_t + P_h)`` with the row,
``[P_t + P_h, P_t + P_h + P_w)`` with the column. The default split gives the two spatial axes
``floor(P / 3)`` pairs each and the frame axis the rest, so all axes get an equal share when
``P`` divides by 3: head dim 72 (Lumos-XL, 16 heads x 72) -> ``(24, 24, 24)`` dims, 64 ->
``(24, 20, 20)``, 128 -> ``(44, 42, 42)``. Within a band of ``d_a`` dims the pair ``k`` turns by
``pos_a * theta_a ** (-2k / d_a)`` (NTK-style extrapolation = a larger ``theta_a``). Pairs
beyond the three bands (when the split sums to less than ``head_dim``) pass through unrotated.

**Pair layout.** Each pair is two *adjacent* channels ``(2p, 2p + 1)`` rotated as the complex
number ``x[2p] + i x[2p+1]`` (Lumina-Next's ``view_as_complex``); this is megatron's
``rotary_interleaved=True`` convention, so :func:`megatron_rotary_pos_emb` turns the angles into
the ``rotary_pos_emb`` megatron's attention accepts, with identical results.

The kernel takes per-token angles ``freqs [S, P]`` (float32) rather than a grid, so packed
sequences (concatenated position lists) and context-parallel shards (a slice of the list) need
nothing special. Backward is the same rotation by ``-angle``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lumos_kernels._triton import can_launch, jit, next_pow2

tl: Any = None  # triton.language, bound by lumos_kernels._triton.jit on the first launch

__all__ = [
    "apply_rope3d",
    "apply_rope3d_reference",
    "apply_rope3d_triton",
    "default_rope3d_split",
    "freqs_from_megatron",
    "megatron_rotary_pos_emb",
    "rope3d_freqs",
    "rope3d_positions",
]


def default_rope3d_split(head_dim: int) -> tuple[int, int, int]:
    """``(d_t, d_h, d_w)`` channel counts: equal thirds of the pairs, the remainder to time."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: 3-D RoPE needs a positive even head dim")
    pairs = head_dim // 2
    spatial = pairs // 3
    if spatial == 0:
        raise ValueError(f"head_dim={head_dim}: too small to give every axis a rotation pair")
    return 2 * (pairs - 2 * spatial), 2 * spatial, 2 * spatial


def rope3d_positions(
    frames: int, height: int, width: int, device: torch.device | str | None = None
) -> Tensor:
    """Positions ``[T*H*W, 3]`` (float32 ``(f, i, j)``) of a frame-major token grid."""
    f, i, j = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    return torch.stack([f, i, j], dim=-1).reshape(-1, 3).float()  # [T*H*W, 3]


def rope3d_freqs(
    positions: Tensor,
    head_dim: int,
    split: tuple[int, int, int] | None = None,
    theta: float | tuple[float, float, float] = 10000.0,
) -> Tensor:
    """Rotation angles ``[N, P]`` (float32, ``P = sum(split) / 2``) for positions ``[N, 3]``.

    ``split`` are the channels per axis (even, summing to at most ``head_dim``; default
    :func:`default_rope3d_split`); ``theta`` is one base or one per axis.
    """
    split = tuple(split) if split is not None else default_rope3d_split(head_dim)
    if len(split) != 3 or any(d <= 0 or d % 2 for d in split) or sum(split) > head_dim:
        raise ValueError(
            f"split={split}: need three positive even channel counts summing to <= "
            f"head_dim={head_dim}"
        )
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions: shape {tuple(positions.shape)} must be [N, 3]")
    thetas = (theta,) * 3 if isinstance(theta, (int, float)) else tuple(theta)
    pos = positions.to(torch.float64)
    bands = []
    for axis, (dim, base) in enumerate(zip(split, thetas)):
        k = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)
        inv_freq = 1.0 / (float(base) ** (k / dim))  # [d_a / 2]
        bands.append(pos[:, axis, None] * inv_freq)  # [N, d_a / 2]
    return torch.cat(bands, dim=1).float()  # [N, P]


def megatron_rotary_pos_emb(freqs: Tensor) -> Tensor:
    """``[S, P]`` angles -> megatron's ``rotary_pos_emb`` ``[S, 1, 1, 2P]`` for
    ``rotary_interleaved=True`` (each angle repeated for the two channels of its pair)."""
    return freqs.repeat_interleave(2, dim=-1)[:, None, None, :]  # [S, 1, 1, 2P]


def freqs_from_megatron(rotary_pos_emb: Tensor) -> Tensor:
    """Inverse of :func:`megatron_rotary_pos_emb`: ``[S, 1, 1, 2P]`` (or ``[S, 2P]``) -> ``[S, P]``."""
    return rotary_pos_emb.reshape(rotary_pos_emb.shape[0], -1)[:, ::2]  # [S, P]


def _check(x: Tensor, freqs: Tensor) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"x: shape {tuple(x.shape)} must be [S, B, H, hd] or [S, H, hd]")
    if freqs.dim() != 2 or freqs.shape[0] != x.shape[0] or 2 * freqs.shape[1] > x.shape[-1]:
        raise ValueError(
            f"freqs: shape {tuple(freqs.shape)} must be [S, P] with S={x.shape[0]} and "
            f"2P <= head_dim={x.shape[-1]}"
        )


def apply_rope3d_reference(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (``[S, B, H, hd]`` or ``[S, H, hd]``) by
    ``freqs [S, P]``; channels past ``2P`` pass through. Computed in float32, rounded once."""
    _check(x, freqs)
    rot = 2 * freqs.shape[1]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (freqs.shape[1],)
    cos = torch.cos(freqs.float()).reshape(shape)  # [S, 1.., P]
    sin = torch.sin(freqs.float()).reshape(shape)
    xr = x[..., :rot].float().unflatten(-1, (-1, 2))  # [S, ..., P, 2]
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), x[..., rot:]], dim=-1)  # same shape as x


def _rope_kernel(
    X,
    FREQS,
    OUT,
    R,
    NH,
    xv_stride_s,
    xv_stride_b,
    xv_stride_h,
    HD: tl.constexpr,
    P: tl.constexpr,
    VEC: tl.constexpr,
    SIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Strides arrive in units of VEC elements and HD / P are compile-time constants, so the
    # compiler can prove every row start VEC-aligned (head dim 72: 8 x bf16 = 16 bytes) and
    # vectorise the loads and stores; with run-time strides of 216 it could only use 2 bytes.
    s = tl.program_id(0).to(tl.int64)  # one token; rows = its (batch, head) vectors
    rblock = tl.program_id(1)
    r = rblock * BLOCK_R + tl.arange(0, BLOCK_R)  # row index within the token: r = b * NH + h
    p = tl.arange(0, BLOCK_P)
    ang = tl.load(FREQS + s * P + p, mask=p < P, other=0.0)  # angle 0 past P: pass-through
    cos = tl.cos(ang)
    sin = tl.sin(ang) * SIGN
    rb = (r // NH).to(tl.int64)
    rh = (r % NH).to(tl.int64)
    src = X + (s * xv_stride_s + rb * xv_stride_b + rh * xv_stride_h) * VEC  # [BLOCK_R] rows
    dst = OUT + (s * R + r.to(tl.int64)) * HD
    cols = tl.arange(0, 2 * BLOCK_P)
    mask = (r[:, None] < R) & (cols[None, :] < HD)
    x = tl.load(src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_P, 2)))  # even / odd channels
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x0 * sin[None, :] + x1 * cos[None, :]
    y = tl.reshape(tl.join(y0, y1), (BLOCK_R, 2 * BLOCK_P))
    tl.store(dst[:, None] + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


def _vector_width(x4: Tensor) -> int:
    """Elements per 16-byte access that divide the head dim and every stride of ``x4``: the
    unit the kernel takes its strides in (8 for bf16 head dim 72 views of a fused QKV)."""
    vec = max(1, 16 // x4.element_size())
    while vec > 1 and any(n % vec for n in (x4.shape[-1], *x4.stride()[:3])):
        vec //= 2
    return vec


def _launch(x: Tensor, freqs: Tensor, sign: float) -> Tensor:
    x4 = x if x.dim() == 4 else x.unsqueeze(1)  # [S, B, H, hd]
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    s, b, nh, hd = x4.shape
    freqs = freqs.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty((s, b, nh, hd), dtype=x.dtype, device=x.device)
    rows = b * nh
    block_p = next_pow2((hd + 1) // 2)
    block_r = max(1, min(next_pow2(rows), max(1, 2048 // (2 * block_p))))
    vec = _vector_width(x4)
    # 8 elements per thread: a 16-byte access for bf16 (few local heads under TP: one warp).
    warps = max(1, min(4, block_r * 2 * block_p // (32 * 8)))
    if s * rows:
        jit(_rope_kernel)[(s, -(-rows // block_r))](
            x4, freqs, out, rows, nh,
            x4.stride(0) // vec, x4.stride(1) // vec, x4.stride(2) // vec,
            HD=hd, P=freqs.shape[1], VEC=vec, SIGN=sign, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=warps,
        )  # fmt: skip
    return out if x.dim() == 4 else out.squeeze(1)


class _Rope3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, freqs: Tensor) -> Tensor:
        ctx.save_for_backward(freqs)
        return _launch(x, freqs, 1.0)

    @staticmethod
    def backward(ctx, dout: Tensor):
        (freqs,) = ctx.saved_tensors
        return _launch(dout, freqs, -1.0), None


def apply_rope3d_triton(x: Tensor, freqs: Tensor) -> Tensor:
    """Fused Triton forward and backward of :func:`apply_rope3d_reference` (no grad to
    ``freqs``). Reads ``x`` through its strides, so megatron's split q/k views need no copy."""
    _check(x, freqs)
    return _Rope3d.apply(x, freqs)


def apply_rope3d(x: Tensor, freqs: Tensor) -> Tensor:
    """Triton when it can run on these tensors (CUDA, or the CPU interpreter), else PyTorch."""
    if can_launch(x):
        return apply_rope3d_triton(x, freqs)
    return apply_rope3d_reference(x, freqs)
