"""Diffusers-style Lumos DiT for images (I2I / T2I / NVS, Flag-DiT options): the Hugging Face
export format of the engine and the pure-PyTorch numerical reference the megatron implementation
is tested against (video: :mod:`lumos_mcore.hf.lumos_transformer_3d`).

Parameter names are those of the released Lumos checkpoints (``x_embedder.proj``,
``t_embedder.mlp.{0,2}``, ``y_embedder.{y_proj.fc1,y_proj.fc2,y_embedding}``,
``blocks.{i}.{attn.qkv,attn.proj,cross_attn.q_linear,cross_attn.kv_linear,cross_attn.proj,
mlp.fc1,mlp.fc2,adaLN_modulation.1}``, ``final_layer.{linear,scale_shift_table}``), so an
original ``Lumos_I2I.pth`` state dict loads by name (its ``pos_embed`` entry is a fixed table and
is recomputed here, so drop it before ``load_state_dict(strict=True)``). ``adaln_type="single"``
gives the PixArt-α block layout (``t_block`` + per-block ``scale_shift_table``) in the same
naming, and ``use_size_conditioning`` adds PixArt-α's ``csize_embedder`` / ``ar_embedder``.
Options the released models do not have add ``camera_embedder.mlp.{fc1,fc2}`` (NVS),
``blocks.{i}.attn.{q_norm,k_norm}`` (QK-norm) and ``blocks.{i}.cross_attn.gate`` (gated
cross-attention).

Nothing here imports megatron: the exported model runs wherever diffusers runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from lumos_kernels.rope3d import apply_rope3d_reference
from lumos_mcore.models.common.embeddings import (
    CameraEmbedder,
    ConditionEmbedder,
    FinalLayer,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    token_coords,
    unpatchify,
)
from lumos_mcore.models.common.rope import rope_freqs

__all__ = [
    "LumosBlock",
    "LumosCrossAttention",
    "LumosSelfAttention",
    "LumosTransformer2DModel",
    "per_token",
    "rotate_pairs",
]

ADALN_TYPES = ("zero", "single")
NORM_TYPES = ("layernorm", "rmsnorm")
POS_EMBEDS = ("sincos", "rope")


def _norm(kind: str, dim: int, eps: float, affine: bool) -> nn.Module:
    """LayerNorm / RMSNorm over the last ``dim`` channels (``model.norm`` / QK-norm)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


def rotate_pairs(x: Tensor, angles: Tensor) -> Tensor:
    """3-D RoPE: rotate adjacent channel pairs of ``x [B, N, H, hd]`` by ``angles [B|1, N, P]``
    (the megatron model's ``rotary_interleaved`` convention, float32 math, rounded once)."""
    b, n, h, hd = x.shape
    angles = angles.expand(b, n, -1).reshape(b * n, -1)  # [B*N, P]
    out = apply_rope3d_reference(x.reshape(b * n, h, hd), angles)  # [B*N, H, hd]
    return out.reshape(b, n, h, hd)


class LumosSelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection laid out ``[Q; K; V]`` (timm /
    DiT layout; megatron's per-head interleaving is done by the checkpoint converter).

    ``(x [B, N, D], rope [B|1, N, P] | None) -> [B, N, D]``; scale ``1/sqrt(head_dim)``.
    Flag-DiT options: ``qk_norm`` (``"layernorm"`` | ``"rmsnorm"``: affine per-head norms
    ``q_norm`` / ``k_norm`` of queries and keys, before RoPE) and 3-D RoPE angles.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, qk_norm: str | None = None, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        if qk_norm is not None:
            self.q_norm = _norm(qk_norm, self.head_dim, eps, affine=True)
            self.k_norm = _norm(qk_norm, self.head_dim, eps, affine=True)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, hd]
        q, k, v = qkv.unbind(2)  # [B, N, H, hd] each
        if self.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # [B, N, H, hd]
        if rope is not None:
            q, k = rotate_pairs(q, rope), rotate_pairs(k, rope)  # [B, N, H, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class LumosCrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to condition tokens (PixArt
    ``MultiHeadCrossAttention``): ``q_linear`` on x, fused ``kv_linear`` (``[K; V]``) on the
    condition, ``proj`` (zero-initialised, so a fresh block ignores the condition).

    ``(x [B, N, D], cond [B, Lc, D], key_mask [B, Lc] bool | None) -> [B, N, D]``; a ``False``
    mask entry hides that condition token from every query of the sample. ``gated`` (Flag-DiT):
    each head's output is scaled by ``tanh(gate[h])``, ``gate`` zero-initialised.
    """

    def __init__(self, hidden_size: int, num_heads: int, gated: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.gate = nn.Parameter(torch.zeros(num_heads)) if gated else None

    def forward(self, x: Tensor, cond: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        lc = cond.shape[1]
        if lc == 1 and key_mask is None:
            # Softmax over one key is exactly 1: every query gets that token's value, so the
            # query projection and the attention are skipped (as the megatron model does).
            v = F.linear(cond, self.kv_linear.weight[d:], self.kv_linear.bias[d:])  # [B, 1, D]
            if self.gate is not None:
                v = v.unflatten(-1, (self.num_heads, -1)) * torch.tanh(self.gate)[:, None]
                v = v.flatten(-2)  # [B, 1, D]
            return self.proj(v).expand(b, n, d)  # [B, N, D]
        q = self.q_linear(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).reshape(b, lc, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Lc, hd] each
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lc]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, hd]
        if self.gate is not None:
            out = out * torch.tanh(self.gate).to(out.dtype)[None, :, None, None]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


def per_token(m: Tensor, n: int) -> Tensor:
    """Modulation rows ``[B, L, D]`` (one per sample, or one per frame of a video in
    frame-major token order) repeated to ``[B, n, D]`` (``L = 1`` broadcasts as it is)."""
    if m.shape[1] in (1, n):
        return m
    return m.repeat_interleave(n // m.shape[1], dim=1)  # [B, n, D]


class LumosBlock(nn.Module):
    """One Lumos transformer block (released ``LumosI2IBlock``)::

        shift1, scale1, gate1, shift2, scale2, gate2 = adaLN(c)
        x = x + gate1 * SelfAttn(modulate(Norm(x), shift1, scale1))
        x = x + CrossAttn(x, cond)            # no norm, no gate
        x = x + gate2 * MLP(modulate(Norm(x), shift2, scale2))

    ``adaln_type="zero"``: per-block ``adaLN_modulation = Sequential(SiLU, Linear(D, 6D))`` on
    ``c = t`` (zero-initialised: a fresh block is the identity plus cross-attention).
    ``adaln_type="single"`` (PixArt-α): ``c = t_block(t)`` is shared by all blocks and each
    block adds its own ``scale_shift_table [6, D]``. ``c`` is ``[B, D|6D]`` or, with per-frame
    timesteps, ``[B, T, D|6D]``. Flag-DiT options: ``norm_type`` of the block norms,
    ``qk_norm``, ``cross_attn_gate``; RoPE angles come with the call.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        adaln_type: str = "zero",
        norm_eps: float = 1e-6,
        *,
        norm_type: str = "layernorm",
        qk_norm: str | None = None,
        cross_attn_gate: bool = False,
    ) -> None:
        super().__init__()
        if adaln_type not in ADALN_TYPES:
            raise ValueError(f"adaln_type={adaln_type!r}: choose one of {ADALN_TYPES}")
        self.adaln_type = adaln_type
        self.norm1 = _norm(norm_type, hidden_size, norm_eps, affine=False)
        self.attn = LumosSelfAttention(hidden_size, num_heads, qk_norm, norm_eps)
        self.cross_attn = LumosCrossAttention(hidden_size, num_heads, gated=cross_attn_gate)
        self.norm2 = _norm(norm_type, hidden_size, norm_eps, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        if adaln_type == "zero":
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
            )
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """Six ``[B, L, D]`` tensors (shift1, scale1, gate1, shift2, scale2, gate2), ``L`` = 1
        or the number of frames."""
        rows = c if c.ndim == 3 else c[:, None]  # [B, L, D|6D]
        if self.adaln_type == "zero":
            return self.adaLN_modulation(rows).chunk(6, dim=-1)
        mod = rows.unflatten(-1, (6, -1)) + self.scale_shift_table  # [B, L, 6, D]
        return mod.unbind(dim=2)

    def self_attention(self, h: Tensor, rope: Tensor | None, grid: Any) -> Tensor:
        """The block's self-attention over ``h [B, N, D]`` (all tokens of a sample)."""
        return self.attn(h, rope)

    def temporal(self, x: Tensor, rope: Tensor | None, grid: Any) -> Tensor:
        """Hook after the self-attention residual (the video block's temporal attention)."""
        return x

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        rope: Tensor | None = None,
        grid: Any = None,
    ) -> Tensor:
        n = x.shape[1]
        mods = [per_token(m, n) for m in self.modulation(c)]  # 6 x [B, 1|N, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = modulate(self.norm1(x), shift1, scale1)  # [B, N, D]
        x = x + gate1 * self.self_attention(h, rope, grid)  # [B, N, D]
        x = self.temporal(x, rope, grid)  # [B, N, D]
        x = x + self.cross_attn(x, cond, cond_mask)  # [B, N, D]
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, N, D]
        return x


class LumosTransformer2DModel(ModelMixin, ConfigMixin):
    """Lumos I2I / T2I / NVS diffusion transformer over VAE latents (diffusers ``ModelMixin``).

    ``forward(hidden_states [B, C, H, W], timestep [B], encoder_hidden_states [B, Lc, Cc])``
    returns ``Transformer2DModelOutput(sample=[B, out_channels, H, W])`` (with learned sigma the
    first ``in_channels`` are the ε prediction, the rest the variance interpolation).
    Other latent sizes than ``sample_size`` work: the sin-cos table is recomputed for the new
    grid with the ``pos_base_size`` stretch (PixArt's multi-resolution recipe).

    Config: ``sample_size`` latent side; ``patch_size``; ``in_channels``; ``out_channels`` (None:
    ``2*in`` with ``learn_sigma`` else ``in``); ``hidden_size``, ``depth``, ``num_heads``,
    ``mlp_ratio``; ``cond_channels`` (768 DINO, 4096 T5) and ``cond_tokens`` (1, 256, 120) of the
    condition and of its learned null embedding; ``adaln_type`` ``"zero"`` (Lumos) or
    ``"single"`` (PixArt-α); ``use_size_conditioning`` (PixArt-α multi-scale: resolution and
    aspect-ratio embeddings added to ``t``); ``pos_base_size`` in tokens (None:
    ``sample_size // patch_size``); ``pos_interpolation_scale``; ``cond_dropout_prob`` (training
    CFG dropout); ``norm_eps``.

    Novel-view synthesis: ``camera_dim`` (12: R flattened, then T) adds ``camera_embedder``,
    whose embedding of ``camera [B, camera_dim]`` is added to every condition token, and the
    input view's latent ``input_latent [B, C, H, W]`` is concatenated channel-wise to the noisy
    one (``2 * in_channels`` patch-embedder channels). Flag-DiT options: ``norm_type``
    (``"layernorm"`` | ``"rmsnorm"``, the block norms and the QK-norm), ``qk_norm``,
    ``pos_embed_type`` (``"sincos"`` tables | 3-D ``"rope"`` with ``rope_theta`` and NTK factor
    ``rope_ntk_factor``), ``cross_attn_gate`` (tanh gate per head on the cross-attention).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LumosBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        learn_sigma: bool = True,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        cond_channels: int = 768,
        cond_tokens: int = 1,
        adaln_type: str = "zero",
        use_size_conditioning: bool = False,
        pos_base_size: int | None = None,
        pos_interpolation_scale: float = 1.0,
        cond_dropout_prob: float = 0.1,
        norm_eps: float = 1e-6,
        camera_dim: int | None = None,
        norm_type: str = "layernorm",
        qk_norm: bool = False,
        pos_embed_type: str = "sincos",
        rope_theta: float = 10000.0,
        rope_ntk_factor: float = 1.0,
        cross_attn_gate: bool = False,
    ) -> None:
        super().__init__()
        self._build(self.config, self._blocks_kwargs(self.config))

    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _blocks_kwargs(config: Any) -> dict[str, Any]:
        """Keyword arguments of every block (the video model adds its own)."""
        return dict(
            norm_type=config.norm_type,
            qk_norm=config.norm_type if config.qk_norm else None,
            cross_attn_gate=config.cross_attn_gate,
        )

    def _make_block(self, config: Any, **kwargs: Any) -> nn.Module:
        return LumosBlock(
            config.hidden_size,
            config.num_heads,
            config.mlp_ratio,
            config.adaln_type,
            config.norm_eps,
            **kwargs,
        )

    def _build(self, config: Any, block_kwargs: dict[str, Any]) -> None:
        self._validate(config)
        in_channels, hidden_size, patch_size = (
            config.in_channels,
            config.hidden_size,
            config.patch_size,
        )
        self.out_channels = (
            config.out_channels
            if config.out_channels is not None
            else (2 * in_channels if config.learn_sigma else in_channels)
        )
        self.patch_size = patch_size
        self.base_grid = config.sample_size // patch_size
        self.pos_base_size = (
            config.pos_base_size if config.pos_base_size is not None else self.base_grid
        )
        self.gradient_checkpointing = False

        # The video class has no camera_dim field (its config then has no such key).
        self._camera_dim = config.get("camera_dim")
        embed_channels = 2 * in_channels if self._camera_dim is not None else in_channels
        self.x_embedder = PatchEmbed(patch_size, embed_channels, hidden_size)
        table = self._pos_table(self.base_grid, self.base_grid)
        self.register_buffer("pos_embed", table, False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if config.use_size_conditioning:
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size // 3)
        if config.adaln_type == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = ConditionEmbedder(
            config.cond_channels,
            hidden_size,
            config.cond_tokens,
            dropout_prob=config.cond_dropout_prob,
        )
        if self._camera_dim is not None:
            self.camera_embedder = CameraEmbedder(self._camera_dim, hidden_size)
        self.blocks = nn.ModuleList(
            self._make_block(config, **block_kwargs) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(
            hidden_size, patch_size, self.out_channels, eps=config.norm_eps
        )
        self.initialize_weights()

    @staticmethod
    def _validate(config: Any) -> None:
        c = config
        choices = {
            "adaln_type": (c.adaln_type, ADALN_TYPES),
            "norm_type": (c.norm_type, NORM_TYPES),
            "pos_embed_type": (c.pos_embed_type, POS_EMBEDS),
        }
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"config.{flag}={value!r}: choose one of {allowed}")
        if c.sample_size % c.patch_size:
            raise ValueError(
                f"config.sample_size={c.sample_size} is not divisible by patch_size={c.patch_size}"
            )
        if c.hidden_size % c.num_heads:
            raise ValueError(
                f"config.hidden_size={c.hidden_size} is not divisible by "
                f"num_heads={c.num_heads}; choose a divisor"
            )
        if c.pos_embed_type == "sincos" and c.hidden_size % 4:
            raise ValueError(
                f"config.hidden_size={c.hidden_size} must be divisible by 4 (2-D sin-cos table)"
            )
        head_dim = c.hidden_size // c.num_heads
        if c.pos_embed_type == "rope" and (head_dim % 2 or head_dim < 6):
            raise ValueError(
                f"config.pos_embed_type='rope': head dim {head_dim} must be even and >= 6 to split "
                "over the (t, h, w) axes"
            )
        if c.pos_embed_type == "rope" and (c.rope_theta <= 0 or c.rope_ntk_factor < 1.0):
            raise ValueError(
                f"config.rope_theta={c.rope_theta} / config.rope_ntk_factor="
                f"{c.rope_ntk_factor}: theta must be positive and the NTK factor >= 1"
            )
        if c.use_size_conditioning and c.hidden_size % 3:
            raise ValueError(
                f"config.use_size_conditioning=True needs hidden_size divisible by 3 "
                f"(got {c.hidden_size}): size and aspect-ratio embeddings are D/3 wide each"
            )
        if c.pos_interpolation_scale <= 0:
            raise ValueError(
                f"config.pos_interpolation_scale={c.pos_interpolation_scale} must be positive"
            )
        camera_dim = c.get("camera_dim")
        if camera_dim is not None and camera_dim <= 0:
            raise ValueError(f"config.camera_dim={camera_dim} must be positive (or None)")

    # -------------------------------------------------------------------------------------------
    def _pos_table(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        if self.config.pos_embed_type != "sincos":
            return torch.zeros(1, 0, self.config.hidden_size, device=device)  # [1, 0, D]
        table = get_2d_sincos_pos_embed(
            self.config.hidden_size,
            (h, w),
            base_size=self.pos_base_size,
            interpolation_scale=self.config.pos_interpolation_scale,
            device=device,
        )
        return table[None]  # [1, h*w, D]

    def get_pos_embed(self, h: int, w: int, device: torch.device) -> Tensor:
        """Position table [1, h*w, D] for an ``h x w`` token grid: the cached buffer at the
        training grid, recomputed for any other grid."""
        buf = self.pos_embed
        if (h, w) == (self.base_grid, self.base_grid) and buf.device.type != "meta":
            return buf.to(device)
        return self._pos_table(h, w, device)

    def rope_angles(self, frames: int, h: int, w: int, device: torch.device) -> Tensor:
        """3-D RoPE pair angles ``[1, frames*h*w, head_dim/2]`` of the frame-major tokens."""
        c = self.config
        freqs = rope_freqs(
            token_coords(frames, h, w),
            c.hidden_size // c.num_heads,
            theta=c.rope_theta,
            ntk_factor=c.rope_ntk_factor,
        )  # [N, hd], each pair's angle twice
        return freqs[None, :, ::2].contiguous().to(device)  # [1, N, P]

    def initialize_weights(self) -> None:
        """Lumos / DiT / PixArt initialisation: xavier-uniform linears with zero bias; the patch
        embedding xavier on its flattened weight; timestep, size, ``t_block`` and condition MLPs
        normal(0, 0.02); per-block adaLN (``"zero"``), cross-attention out-projection (its gate
        instead when gated), the camera embedding's output and the final projection zero, so a
        fresh model outputs exactly 0."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.x_embedder.initialize_weights()
        for emb in (self.t_embedder, getattr(self, "csize_embedder", None)):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.config.use_size_conditioning:
            nn.init.normal_(self.ar_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.ar_embedder.mlp[2].weight, std=0.02)
        if self.config.adaln_type == "single":
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        self.y_embedder.initialize_weights()
        if self._camera_dim is not None:
            nn.init.normal_(self.camera_embedder.mlp.fc1.weight, std=0.02)
            nn.init.zeros_(self.camera_embedder.mlp.fc2.weight)
        for block in self.blocks:
            if self.config.adaln_type == "zero":
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn.gate is not None:
                nn.init.zeros_(block.cross_attn.gate)
            else:
                nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        self.final_layer.initialize_weights()

    # -------------------------------------------------------------------------------------------
    def _timestep_conditioning(
        self, timestep: Tensor | float, b: int, device: torch.device, added_cond_kwargs
    ) -> tuple[Tensor, Tensor]:
        """``(t, c)``: ``t [B, (T,) D]`` (final layer) and the blocks' adaLN input ``c``
        (``t``, or ``t_block(t) [B, (T,) 6D]`` with adaLN-single); ``timestep`` is a scalar,
        ``[B]`` or per frame ``[B, T]``."""
        dtype = self.x_embedder.proj.weight.dtype
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0 or timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(b)
        t = self.t_embedder(timestep)  # [B, (T,) D]
        if self.config.use_size_conditioning:
            if not added_cond_kwargs or "resolution" not in added_cond_kwargs:
                raise ValueError(
                    "use_size_conditioning=True: pass added_cond_kwargs={'resolution': [B, 2], "
                    "'aspect_ratio': [B, 1]}"
                )
            res = added_cond_kwargs["resolution"].to(device, dtype)
            ar = added_cond_kwargs["aspect_ratio"].to(device, dtype)
            size = torch.cat([self.csize_embedder(res, b), self.ar_embedder(ar, b)], dim=1)
            t = t + (size[:, None] if t.ndim == 3 else size)  # [B, (T,) D]
        c = self.t_block(t) if self.config.adaln_type == "single" else t  # [B, (T,) 6D|D]
        return t, c

    def _condition_tokens(
        self,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None,
        force_drop_ids: Tensor | None,
        camera: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(cond [B, Lc, D], key mask [B, Lc] bool | None)``; NVS adds the camera."""
        dtype = self.x_embedder.proj.weight.dtype
        cond = self.y_embedder(
            encoder_hidden_states.to(dtype), self.training, force_drop_ids=force_drop_ids
        )  # [B, Lc, D]
        if self._camera_dim is not None:
            if camera is None:
                raise ValueError(
                    f"camera_dim={self._camera_dim} (novel-view model): pass camera "
                    "[B, camera_dim] (R flattened, then T)"
                )
            cond = cond + self.camera_embedder(camera.to(cond.device))[:, None].to(dtype)
        mask = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.to(cond.device) != 0  # [B, Lc] bool
            if not bool(mask.any(dim=1).all()):
                raise ValueError("encoder_attention_mask hides every condition token of a sample")
        return cond, mask

    def _with_input_view(self, hidden_states: Tensor, input_latent: Tensor | None) -> Tensor:
        if self._camera_dim is None:
            return hidden_states
        if input_latent is None or input_latent.shape != hidden_states.shape:
            got = None if input_latent is None else tuple(input_latent.shape)
            raise ValueError(
                "novel-view model: pass input_latent (the input view's latent) shaped like "
                f"hidden_states {tuple(hidden_states.shape)}; got {got}"
            )
        return torch.cat([hidden_states, input_latent.to(hidden_states.dtype)], dim=1)

    def _run_blocks(
        self,
        x: Tensor,
        c: Tensor,
        cond: Tensor,
        mask: Tensor | None,
        rope: Tensor | None,
        grid: Any = None,
    ) -> Tensor:
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, cond, mask, rope, grid)
            else:
                x = block(x, c, cond, mask, rope, grid)  # [B, N, D]
        return x

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        force_drop_ids: Tensor | None = None,
        return_dict: bool = True,
        *,
        input_latent: Tensor | None = None,
        camera: Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Predict the model output for noisy latents.

        ``encoder_attention_mask [B, Lc]``: nonzero/True marks a real condition token (padding
        is hidden from cross-attention). ``added_cond_kwargs``: ``{"resolution": [B, 2],
        "aspect_ratio": [B, 1]}`` when ``use_size_conditioning``. ``force_drop_ids [B]``
        swaps in the learned null condition (unconditional CFG branch). Novel-view models
        take ``input_latent [B, C, H, W]`` and ``camera [B, camera_dim]``.
        """
        b, _, hh, ww = hidden_states.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        dtype = self.x_embedder.proj.weight.dtype

        latents = self._with_input_view(hidden_states.to(dtype), input_latent)
        x = self.x_embedder(latents)  # [B, N, D]
        rope = None
        if self.config.pos_embed_type == "sincos":
            x = x + self.get_pos_embed(h, w, x.device).to(dtype)  # [B, N, D]
        else:
            rope = self.rope_angles(1, h, w, x.device)  # [1, N, P]
        t, c = self._timestep_conditioning(timestep, b, x.device, added_cond_kwargs)
        cond, mask = self._condition_tokens(
            encoder_hidden_states, encoder_attention_mask, force_drop_ids, camera
        )
        x = self._run_blocks(x, c, cond, mask, rope)  # [B, N, D]
        x = self.final_layer(x, t)  # [B, N, p*p*out]
        out = unpatchify(x, p, h, w, self.out_channels)  # [B, out, H, W]
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
