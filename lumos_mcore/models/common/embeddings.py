"""Shared embedding and output pieces of the Lumos DiT family (pure PyTorch, no megatron).

These modules are used by both the megatron-core model and the diffusers-style export class
(`lumos_mcore.hf`). Module and parameter names follow the released Lumos / PixArt code
(`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.y_proj.{fc1,fc2}`,
`y_embedder.y_embedding`, `final_layer.{linear,scale_shift_table}`, ...) so that the original
checkpoints load by name.

Token order conventions (stated once here, relied on everywhere):
- images: patch tokens are row-major over the patch grid, token ``n = i * w + j`` for patch row
  ``i`` and column ``j``;
- videos: frame-major ``(t, h, w)``, i.e. ``n = (f * h + i) * w + j``;
- a patch's output channels are laid out ``(p, q, c)`` (DiT's ``'nhwpqc->nchpwq'`` unpatchify).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "CameraEmbedder",
    "ConditionEmbedder",
    "FinalLayer",
    "Mlp",
    "PatchEmbed",
    "SizeEmbedder",
    "TimestepEmbedder",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "get_3d_sincos_pos_embed",
    "concat_token_channels",
    "modulate",
    "patchify",
    "patchify_video",
    "sincos_pos_embed_from_coords",
    "timestep_embedding",
    "token_coords",
    "unpatchify",
    "unpatchify_video",
]


# ----------------------------------------------------------------------------------------------
# Fixed sin-cos position embeddings
# ----------------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed(embed_dim: int, pos: Tensor) -> Tensor:
    """MAE-style 1-D sin-cos embedding of positions ``pos`` (any shape, flattened) -> [M, D].

    Channels are ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-2k/D)``; computed in
    float64 (as diffusers does on CPU/CUDA) so the table does not depend on the caller's dtype.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim={embed_dim} must be even for a sin-cos position embedding")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))  # [D/2]
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D]


def _sincos_grid_2d(
    embed_dim: int,
    grid_hw: tuple[int, int],
    base_size: int | None,
    interpolation_scale: float,
    device: torch.device | None,
) -> Tensor:
    """float64 2-D table [h*w, D]; first half of the channels encodes the column (w) coordinate,
    second half the row (h) coordinate, exactly as MAE / PixArt / diffusers."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for a 2-D sin-cos table")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    grid_h = torch.arange(h, dtype=torch.float32, device=device)
    grid_w = torch.arange(w, dtype=torch.float32, device=device)
    if base_size is not None:
        # Stretch each axis to `base_size` positions so other resolutions interpolate the
        # table the model was trained at (PixArt's `base_size / grid_size` scaling).
        grid_h = grid_h / (h / base_size)
        grid_w = grid_w / (w / base_size)
    grid_h = grid_h / interpolation_scale
    grid_w = grid_w / interpolation_scale
    rows, cols = torch.meshgrid(grid_h, grid_w, indexing="ij")  # [h, w] each, row-major
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # [h*w, D/2]
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows)  # [h*w, D/2]
    return torch.cat([emb_w, emb_h], dim=1)  # [h*w, D]


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_hw: tuple[int, int],
    base_size: int,
    interpolation_scale: float = 1.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2-D sin-cos position table [h*w, D] for an ``h x w`` patch grid (row-major tokens).

    Same numbers as ``diffusers.models.embeddings.get_2d_sincos_pos_embed(embed_dim, (h, w),
    base_size=base_size, interpolation_scale=interpolation_scale)`` (itself PixArt's
    ``lewei_scale`` recipe): positions along each axis are ``arange(n) / (n / base_size) /
    interpolation_scale``, so any resolution spans the range the model was trained on.
    """
    table = _sincos_grid_2d(embed_dim, grid_hw, base_size, interpolation_scale, device)
    return table.to(dtype)  # [h*w, D]


def get_3d_sincos_pos_embed(
    embed_dim: int,
    grid_thw: tuple[int, int, int],
    base_size: int | None,
    interpolation_scale: float = 1.0,
    temporal_interpolation_scale: float = 1.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 3-D sin-cos table [t*h*w, D] for video tokens in frame-major ``(t, h, w)`` order.

    Channel split as diffusers' ``get_3d_sincos_pos_embed``: the first ``D/4`` channels are a 1-D
    sin-cos of the frame index (``arange(t) / temporal_interpolation_scale``), the remaining
    ``3D/4`` the 2-D spatial table of :func:`get_2d_sincos_pos_embed` (same for every frame).
    ``base_size=None`` disables the base-size stretch; then the spatial positions are
    ``arange(n) / interpolation_scale`` and the result equals diffusers'
    ``get_3d_sincos_pos_embed(D, (w, h), t, interpolation_scale, temporal_interpolation_scale)``
    flattened to ``[t*h*w, D]``.
    """
    if embed_dim % 16 != 0:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 16 for a 3-D sin-cos table")
    t, h, w = (int(v) for v in grid_thw)
    dim_t = embed_dim // 4
    dim_s = embed_dim - dim_t
    spatial = _sincos_grid_2d(dim_s, (h, w), base_size, interpolation_scale, device)  # [h*w, 3D/4]
    frames = torch.arange(t, dtype=torch.float32, device=device) / temporal_interpolation_scale
    temporal = get_1d_sincos_pos_embed(dim_t, frames)  # [t, D/4]
    temporal = temporal[:, None, :].expand(t, h * w, dim_t)  # [t, h*w, D/4]
    spatial = spatial[None].expand(t, h * w, dim_s)  # [t, h*w, 3D/4]
    table = torch.cat([temporal, spatial], dim=-1).reshape(t * h * w, embed_dim)
    return table.to(dtype)  # [t*h*w, D]


def sincos_pos_embed_from_coords(
    embed_dim: int,
    coords: Tensor,
    grid_hw: tuple[int, int],
    *,
    base_size: int | None,
    interpolation_scale: float = 1.0,
    temporal_interpolation_scale: float = 1.0,
    video: bool = False,
) -> Tensor:
    """Rows of the 2-D (``video=False``) or 3-D sin-cos table for tokens at ``coords [N, 3]``.

    ``coords`` are ``(frame, row, col)`` token coordinates (as from :func:`token_coords`), so a
    context-parallel rank builds only the rows of its own tokens. Equals
    ``get_2d_sincos_pos_embed(D, grid_hw, base_size, ...)[row * w + col]`` and
    ``get_3d_sincos_pos_embed(D, (t, *grid_hw), base_size, ...)[(frame * h + row) * w + col]``
    (same float32 position arithmetic, float64 tables); returns float64 ``[N, D]``.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    frames, rows, cols = (coords[:, i].to(torch.float32) for i in range(3))
    if base_size is not None:
        rows = rows / (h / base_size)
        cols = cols / (w / base_size)
    rows = rows / interpolation_scale
    cols = cols / interpolation_scale
    dim_t = embed_dim // 4 if video else 0
    dim_s = embed_dim - dim_t
    if dim_s % 4:
        raise ValueError(
            f"embed_dim={embed_dim} leaves {dim_s} spatial channels, not a multiple of 4"
        )
    spatial = torch.cat(
        [get_1d_sincos_pos_embed(dim_s // 2, cols), get_1d_sincos_pos_embed(dim_s // 2, rows)],
        dim=1,
    )  # [N, dim_s]
    if not video:
        return spatial  # [N, D]
    temporal = get_1d_sincos_pos_embed(dim_t, frames / temporal_interpolation_scale)  # [N, D/4]
    return torch.cat([temporal, spatial], dim=1)  # [N, D]


# ----------------------------------------------------------------------------------------------
# Timestep / scalar embeddings
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000) -> Tensor:
    """DiT sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] (float32).

    ``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = exp(-ln(max_period) * k / half)``; equals
    diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``. An odd ``dim``
    gets one zero channel appended.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # [half]
    args = t.reshape(-1).float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # [B, dim]


class TimestepEmbedder(nn.Module):
    """Timestep -> conditioning vector (DiT): sinusoidal features then a 2-layer SiLU MLP.

    Accepts timesteps of any leading shape (``[B]``, or ``[B, T]`` per-frame timesteps for video)
    and returns ``[*leading, hidden_size]``.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:
        lead = t.shape
        t_freq = timestep_embedding(t.reshape(-1), self.frequency_embedding_size)  # [M, 256]
        t_emb = self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # [M, D]
        return t_emb.reshape(*lead, t_emb.shape[-1])  # [*lead, D]


class SizeEmbedder(TimestepEmbedder):
    """PixArt-α micro-condition embedder for image size / aspect ratio (multi-scale T2I).

    Each of the ``k`` scalars of ``s [B, k]`` is embedded with the timestep recipe and this
    module's MLP (shared over the ``k`` scalars, as in PixArt), then concatenated:
    ``[B, k] -> [B, k * hidden_size]``. A ``[B]`` input is treated as ``[B, 1]``; a batch-1
    input is repeated to ``batch_size`` (PixArt behaviour, used by samplers with one size).
    """

    def forward(self, s: Tensor, batch_size: int | None = None) -> Tensor:  # type: ignore[override]
        if s.ndim == 1:
            s = s[:, None]
        if s.ndim != 2:
            raise ValueError(f"size condition must be [B, k], got shape {tuple(s.shape)}")
        if batch_size is not None and s.shape[0] != batch_size:
            if batch_size % s.shape[0] != 0:
                raise ValueError(f"size condition batch {s.shape[0]} does not divide {batch_size}")
            s = s.repeat(batch_size // s.shape[0], 1)
        b, k = s.shape
        emb = super().forward(s)  # [B, k, D']
        return emb.reshape(b, k * emb.shape[-1])  # [B, k*D']


# ----------------------------------------------------------------------------------------------
# Patch embedding and (un)patchify
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens by a strided conv (timm / DiT PatchEmbed).

    ``[B, C, H, W] -> [B, (H/p)*(W/p), D]`` in row-major patch order.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True
        )

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"latent size {h}x{w} is not divisible by patch_size={self.patch_size}"
            )
        x = self.proj(x)  # [B, D, h/p, w/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, D]

    def forward_tokens(self, x: Tensor) -> Tensor:
        """The same embedding applied to patchified tokens ``[B, N, p*p*C]`` -> ``[B, N, D]``.

        Token channels are ordered ``(p, q, c)`` (see :func:`patchify`), so the conv kernel
        ``[D, C, p, q]`` is permuted to ``[D, p, q, C]``; this lets a context-parallel rank
        embed only its own tokens and packed sequences mix resolutions.
        """
        w = self.proj.weight  # [D, C, p, q]
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # [D, p*q*C]
        return torch.nn.functional.linear(x, w, self.proj.bias)  # [B, N, D]

    def initialize_weights(self) -> None:
        """DiT init: xavier-uniform on the conv weight viewed as a ``[D, C*p*p]`` linear."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.proj.bias, 0.0)


def patchify(x: Tensor, p: int) -> Tensor:
    """``[B, C, H, W] -> [B, N, p*p*C]`` with per-patch channels ordered ``(p, q, c)``.

    Exact inverse of :func:`unpatchify`; tokens are row-major over the ``(H/p, W/p)`` grid.
    """
    b, c, hh, ww = x.shape
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not divisible by patch size {p}")
    h, w = hh // p, ww // p
    x = x.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # [B, h, w, p, p, C]
    return x.reshape(b, h * w, p * p * c)  # [B, N, p*p*C]


def unpatchify(x: Tensor, p: int, h: int, w: int, c: int) -> Tensor:
    """``[B, h*w, p*p*C] -> [B, C, h*p, w*p]`` (DiT's ``einsum('nhwpqc->nchpwq')``)."""
    b, n, f = x.shape
    if n != h * w or f != p * p * c:
        raise ValueError(
            f"unpatchify: got tokens [{n}, {f}], expected [{h * w}, {p * p * c}] "
            f"for grid {h}x{w}, patch {p}, channels {c}"
        )
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)  # [B, C, h, p, w, p]
    return x.reshape(b, c, h * p, w * p)  # [B, C, H, W]


def patchify_video(x: Tensor, p: int) -> Tensor:
    """``[B, C, T, H, W] -> [B, T*h*w, p*p*C]`` in frame-major ``(t, h, w)`` token order.

    Token ``n = (f * h + i) * w + j`` is patch ``(i, j)`` of frame ``f``; each frame is
    patchified exactly as an image by :func:`patchify`. Inverse: :func:`unpatchify_video`.
    """
    b, c, t, hh, ww = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, hh, ww)  # [B*T, C, H, W]
    tokens = patchify(frames, p)  # [B*T, h*w, p*p*C]
    return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])  # [B, T*h*w, p*p*C]


def unpatchify_video(x: Tensor, p: int, t: int, h: int, w: int, c: int) -> Tensor:
    """``[B, t*h*w, p*p*C] -> [B, C, t, h*p, w*p]`` (inverse of :func:`patchify_video`)."""
    b, n, f = x.shape
    if n != t * h * w:
        raise ValueError(f"unpatchify_video: {n} tokens do not form a {t}x{h}x{w} grid")
    frames = unpatchify(x.reshape(b * t, h * w, f), p, h, w, c)  # [B*T, C, H, W]
    return frames.reshape(b, t, c, h * p, w * p).transpose(1, 2)  # [B, C, T, H, W]


def token_coords(frames: int, h: int, w: int, index: Tensor | None = None) -> Tensor:
    """``(frame, row, col)`` of tokens in frame-major order, ``[N, 3]`` long.

    ``index`` (positions within the sample) selects rows, e.g. one context-parallel shard.
    """
    if index is None:
        index = torch.arange(frames * h * w)
    index = index.long()
    hw = h * w
    return torch.stack([index // hw, (index % hw) // w, index % w], dim=1)  # [N, 3]


def concat_token_channels(a: Tensor, b: Tensor, p: int) -> Tensor:
    """Tokens of the channel-wise concatenation of two latents, from their tokens.

    ``patchify(cat([x, y], 1)) == concat_token_channels(patchify(x), patchify(y))``: channels
    are the fastest axis inside a patch, so the two are interleaved per ``(p, q)`` position.
    """
    lead = a.shape[:-1]
    a = a.reshape(*lead, p * p, -1)  # [..., p*p, Ca]
    b = b.reshape(*lead, p * p, -1)  # [..., p*p, Cb]
    return torch.cat([a, b], dim=-1).reshape(*lead, -1)  # [..., p*p*(Ca+Cb)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shapes broadcast (e.g. ``[B, 1, D]``)."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# Condition embedding
# ----------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """Two-layer MLP with the attribute names of timm's ``Mlp`` (``fc1``, ``act``, ``fc2``) so
    checkpoint keys match the released code; tanh-approximate GELU by default."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = act_layer() if act_layer is not None else nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [..., out]


class ConditionEmbedder(nn.Module):
    """Condition tokens -> model width, with condition dropout for classifier-free guidance.

    PixArt's ``CaptionEmbedder``: ``y_proj`` is a GELU-tanh MLP ``Cin -> D -> D``;
    ``y_embedding [num_tokens, Cin]`` is the learned *null* condition. While training with
    ``dropout_prob > 0`` each sample's whole condition is replaced by the null one with that
    probability (a Bernoulli per sample, drawn from ``generator`` when given); ``force_drop_ids``
    ``[B]`` (bool, or 0/1) does it explicitly, e.g. for the unconditional CFG branch.
    ``[B, Lc, Cin] -> [B, Lc, D]``. A key-padding mask for the condition is not changed by a
    drop (PixArt behaviour): the null tokens are seen through the caption's own mask.
    """

    def __init__(
        self, in_channels: int, hidden_size: int, num_tokens: int, dropout_prob: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"cond dropout_prob={dropout_prob} must be in [0, 1]")
        self.dropout_prob = dropout_prob
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.y_embedding = nn.Parameter(torch.randn(num_tokens, in_channels) / in_channels**0.5)

    def drop_ids(self, batch_size: int, device: torch.device, generator=None) -> Tensor:
        """Per-sample Bernoulli(dropout_prob) drop decisions, ``[B]`` bool on ``device``."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch_size, generator=generator, device=gen_device)
        return (u < self.dropout_prob).to(device)

    def token_drop(self, cond: Tensor, drop: Tensor) -> Tensor:
        """Replace the conditions of samples with ``drop[b]`` true by the null condition."""
        if tuple(cond.shape[1:]) != tuple(self.y_embedding.shape):
            raise ValueError(
                f"condition shape {tuple(cond.shape[1:])} does not match the null condition "
                f"{tuple(self.y_embedding.shape)} (cond_tokens, cond_channels)"
            )
        null = self.y_embedding.to(cond.dtype)[None]  # [1, Lc, Cin]
        return torch.where(drop.to(cond.device).bool()[:, None, None], null, cond)

    def forward(
        self,
        cond: Tensor,
        train: bool,
        force_drop_ids: Tensor | None = None,
        generator=None,
    ) -> Tensor:
        if force_drop_ids is not None:
            cond = self.token_drop(cond, force_drop_ids.bool())
        elif train and self.dropout_prob > 0:
            cond = self.token_drop(cond, self.drop_ids(cond.shape[0], cond.device, generator))
        return self.y_proj(cond)  # [B, Lc, D]

    def initialize_weights(self, std: float = 0.02) -> None:
        """PixArt init: normal(0, 0.02) on both projection weights."""
        nn.init.normal_(self.y_proj.fc1.weight, std=std)
        nn.init.normal_(self.y_proj.fc2.weight, std=std)


class CameraEmbedder(nn.Module):
    """Relative camera ``(R, T)`` of novel-view synthesis -> one vector per sample ``[B, D]``.

    Zero-1-to-3 concatenates the camera to the image embedding before a linear projection;
    ``Linear([dino; cam]) = Linear_dino(dino) + Linear_cam(cam)``, so the camera is embedded on
    its own (a GELU-tanh MLP over the flattened ``[R (9), T (3)]``) and added to every condition
    token. The output layer is zero-initialised: an I2I checkpoint loaded into an NVS model
    starts out ignoring the camera.
    """

    def __init__(self, camera_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.camera_dim = camera_dim
        self.mlp = Mlp(camera_dim, hidden_size, hidden_size)
        nn.init.normal_(self.mlp.fc1.weight, std=0.02)
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, camera: Tensor) -> Tensor:
        cam = camera.reshape(camera.shape[0], -1)  # [B, camera_dim]
        if cam.shape[1] != self.camera_dim:
            raise ValueError(
                f"camera has {cam.shape[1]} values per sample; expected model.camera_dim="
                f"{self.camera_dim} (R flattened (9) then T (3))"
            )
        return self.mlp(cam.to(self.mlp.fc1.weight.dtype))  # [B, D]


# ----------------------------------------------------------------------------------------------
# Output layer
# ----------------------------------------------------------------------------------------------
class FinalLayer(nn.Module):
    """T2I-style output layer (PixArt ``T2IFinalLayer``, used by Lumos): affine-free LayerNorm,
    modulated by a learned ``scale_shift_table [2, D]`` plus the conditioning vector ``t``, then
    ``Linear(D -> p*p*out_channels)``.

    ``(x [B, N, D], t [B, D]) -> [B, N, p*p*out]``. The linear layer is zero-initialised (so a
    fresh model predicts exactly zero) by :meth:`initialize_weights`, which the constructor calls.
    """

    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the output projection (DiT/PixArt): training starts from a zero prediction."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``t`` is ``[B, D]`` (one timestep per sample) or ``[B, N, D]`` (per token, e.g. a
        clean condition frame at timestep 0)."""
        if t.ndim == 3:
            mod = self.scale_shift_table[None, None] + t[:, :, None]  # [B, N, 2, D]
            shift, scale = mod.unbind(dim=2)  # [B, N, D] each
        else:
            shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, D]
        x = modulate(self.norm_final(x), shift, scale)  # [B, N, D]
        return self.linear(x)  # [B, N, p*p*out]
