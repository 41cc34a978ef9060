"""3-D rotary position embedding (Flag-DiT / Lumina style) in megatron-core's RoPE layout.

One definition serves every variant: the head dimension is split over the ``(t, h, w)`` token
axes and each axis rotates its own channel pairs by ``coord * freq``. Images are videos with one
frame (``t = 0``, so the temporal channels are not rotated), which is why an I2I checkpoint
trained with RoPE keeps its spatial positions when loaded into the I2V model: within a frame
the temporal rotation is common to query and key and cancels, and along the temporal axis the
spatial rotations cancel. So the same angles serve full 3-D, per-frame (spatial) and
per-position (temporal) attention.

Convention (the one of ``kernels/lumos_kernels/rope3d.py``, so the fused kernel is a drop-in): a pair is two
*adjacent* channels ``(2k, 2k + 1)`` rotated as the complex number ``x[2k] + i x[2k+1]``
(Lumina-Next's ``view_as_complex``; megatron's ``rotary_interleaved=True``); the ``hn / 2`` pairs
are cut into three contiguous bands ``[t | h | w]``, the spatial axes getting ``floor(P / 3)``
pairs each and time the rest (head dim 72 -> 24/24/24 channels, 64 -> 24/20/20).

NTK-aware scaling (for extrapolating to more frames / larger grids than trained on): each
axis's base becomes ``theta * ntk_factor ** (d / (d - 2))`` for an axis of ``d`` channels, which
keeps the highest frequency and stretches the lowest one by ``ntk_factor``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_axes_dims", "rope_freqs"]


def rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis ``(d_t, d_h, d_w)``: ``floor(P / 3)`` pairs per spatial axis, the
    remaining pairs for time (``P = head_dim / 2``)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE head dim {head_dim} must be even and >= 6")
    pairs = head_dim // 2
    spatial = pairs // 3
    return 2 * (pairs - 2 * spatial), 2 * spatial, 2 * spatial


def _axis_inv_freq(dim: int, theta: float, ntk_factor: float) -> Tensor:
    base = theta * ntk_factor ** (dim / (dim - 2)) if ntk_factor != 1.0 and dim > 2 else theta
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]


def rope_freqs(
    coords: Tensor, head_dim: int, theta: float = 10000.0, ntk_factor: float = 1.0
) -> Tensor:
    """Per-channel rotation angles ``[N, head_dim]`` (float32) for ``(frame, row, col)`` coords.

    Each pair's angle is repeated for its two channels, so ``result[:, None, None]`` is the
    ``rotary_pos_emb`` ``[s, b, 1, hn]`` a megatron ``SelfAttention`` applies with
    ``config.rotary_interleaved = True``.
    """
    dims = rope_axes_dims(head_dim)
    coords = coords.to(torch.float64)
    bands = [
        coords[:, axis, None] * _axis_inv_freq(dim, theta, ntk_factor)[None]
        for axis, dim in enumerate(dims)
    ]  # [N, d_axis/2] each
    angles = torch.cat(bands, dim=1)  # [N, hn/2]
    return angles.repeat_interleave(2, dim=1).float()  # [N, hn]
