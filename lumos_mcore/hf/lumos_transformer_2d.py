"""Diffusers-style Lumos DiT (I2I / T2I): the Hugging Face export format of the engine and the
pure-PyTorch numerical reference the megatron implementation is tested against.

Parameter names are those of the released Lumos checkpoints (``x_embedder.proj``,
``t_embedder.mlp.{0,2}``, ``y_embedder.{y_proj.fc1,y_proj.fc2,y_embedding}``,
``blocks.{i}.{attn.qkv,attn.proj,cross_attn.q_linear,cross_attn.kv_linear,cross_attn.proj,
mlp.fc1,mlp.fc2,adaLN_modulation.1}``, ``final_layer.{linear,scale_shift_table}``), so an
original ``Lumos_I2I.pth`` state dict loads by name (its ``pos_embed`` entry is a fixed table and
is recomputed here, so drop it before ``load_state_dict(strict=True)``). ``adaln_type="single"``
gives the PixArt-α block layout (``t_block`` + per-block ``scale_shift_table``) in the same
naming, and ``use_size_conditioning`` adds PixArt-α's ``csize_embedder`` / ``ar_embedder``.

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

from lumos_mcore.models.common.embeddings import (
    ConditionEmbedder,
    FinalLayer,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)

__all__ = ["LumosBlock", "LumosCrossAttention", "LumosSelfAttention", "LumosTransformer2DModel"]

ADALN_TYPES = ("zero", "single")


class LumosSelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection laid out ``[Q; K; V]`` (timm /
    DiT layout; megatron's per-head interleaving is done by the checkpoint converter).

    ``[B, N, D] -> [B, N, D]``; scale ``1/sqrt(head_dim)``; SDPA picks the fastest kernel.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class LumosCrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to condition tokens (PixArt
    ``MultiHeadCrossAttention``): ``q_linear`` on x, fused ``kv_linear`` (``[K; V]``) on the
    condition, ``proj`` (zero-initialised, so a fresh block ignores the condition).

    ``(x [B, N, D], cond [B, Lc, D], key_mask [B, Lc] bool | None) -> [B, N, D]``; a ``False``
    mask entry hides that condition token from every query of the sample.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: Tensor, cond: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        lc = cond.shape[1]
        q = self.q_linear(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).reshape(b, lc, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Lc, hd] each
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lc]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class LumosBlock(nn.Module):
    """One Lumos transformer block (released ``LumosI2IBlock``)::

        shift1, scale1, gate1, shift2, scale2, gate2 = adaLN(c)
        x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))
        x = x + CrossAttn(x, cond)            # no norm, no gate
        x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))

    ``adaln_type="zero"``: per-block ``adaLN_modulation = Sequential(SiLU, Linear(D, 6D))`` on
    ``c = t [B, D]`` (zero-initialised: a fresh block is the identity plus cross-attention).
    ``adaln_type="single"`` (PixArt-α): ``c = t_block(t) [B, 6D]`` is shared by all blocks and
    each block adds its own ``scale_shift_table [6, D]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        adaln_type: str = "zero",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if adaln_type not in ADALN_TYPES:
            raise ValueError(f"adaln_type={adaln_type!r}: choose one of {ADALN_TYPES}")
        self.adaln_type = adaln_type
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = LumosSelfAttention(hidden_size, num_heads)
        self.cross_attn = LumosCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        if adaln_type == "zero":
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
            )
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """Six ``[B, 1, D]`` tensors (shift1, scale1, gate1, shift2, scale2, gate2)."""
        b = c.shape[0]
        if self.adaln_type == "zero":
            return tuple(m[:, None] for m in self.adaLN_modulation(c).chunk(6, dim=1))
        return (self.scale_shift_table[None] + c.reshape(b, 6, -1)).chunk(6, dim=1)

    def forward(
        self, x: Tensor, c: Tensor, cond: Tensor, cond_mask: Tensor | None = None
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)  # [B, 1, D] each
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # [B, N, D]
        x = x + self.cross_attn(x, cond, cond_mask)  # [B, N, D]
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, N, D]
        return x


class LumosTransformer2DModel(ModelMixin, ConfigMixin):
    """Lumos I2I / T2I diffusion transformer over VAE latents (diffusers ``ModelMixin``).

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
    ) -> None:
        super().__init__()
        self._validate(
            sample_size,
            patch_size,
            hidden_size,
            num_heads,
            adaln_type,
            use_size_conditioning,
            pos_interpolation_scale,
        )
        self.out_channels = (
            out_channels
            if out_channels is not None
            else (2 * in_channels if learn_sigma else in_channels)
        )
        self.patch_size = patch_size
        self.base_grid = sample_size // patch_size
        self.pos_base_size = pos_base_size if pos_base_size is not None else self.base_grid
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.register_buffer("pos_embed", self._pos_table(self.base_grid, self.base_grid), False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if use_size_conditioning:
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size // 3)
        if adaln_type == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = ConditionEmbedder(
            cond_channels, hidden_size, cond_tokens, dropout_prob=cond_dropout_prob
        )
        self.blocks = nn.ModuleList(
            LumosBlock(hidden_size, num_heads, mlp_ratio, adaln_type, norm_eps)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, eps=norm_eps)
        self.initialize_weights()

    @staticmethod
    def _validate(
        sample_size: int,
        patch_size: int,
        hidden_size: int,
        num_heads: int,
        adaln_type: str,
        use_size_conditioning: bool,
        pos_interpolation_scale: float,
    ) -> None:
        if adaln_type not in ADALN_TYPES:
            raise ValueError(f"config.adaln_type={adaln_type!r}: choose one of {ADALN_TYPES}")
        if sample_size % patch_size:
            raise ValueError(
                f"config.sample_size={sample_size} is not divisible by patch_size={patch_size}"
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"config.hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                "choose a divisor"
            )
        if hidden_size % 4:
            raise ValueError(
                f"config.hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos table)"
            )
        if use_size_conditioning and hidden_size % 3:
            raise ValueError(
                f"config.use_size_conditioning=True needs hidden_size divisible by 3 "
                f"(got {hidden_size}): size and aspect-ratio embeddings are D/3 wide each"
            )
        if pos_interpolation_scale <= 0:
            raise ValueError(
                f"config.pos_interpolation_scale={pos_interpolation_scale} must be positive"
            )

    # -------------------------------------------------------------------------------------------
    def _pos_table(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
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

    def initialize_weights(self) -> None:
        """Lumos / DiT / PixArt initialisation: xavier-uniform linears with zero bias; the patch
        embedding xavier on its flattened weight; timestep, size, ``t_block`` and condition MLPs
        normal(0, 0.02); per-block adaLN (``"zero"``), cross-attention out-projection and the
        final projection zero, so a fresh model outputs exactly 0."""

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
        for block in self.blocks:
            if self.config.adaln_type == "zero":
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        self.final_layer.initialize_weights()

    # -------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        force_drop_ids: Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Predict the model output for noisy latents.

        ``encoder_attention_mask [B, Lc]``: nonzero/True marks a real condition token (padding
        is hidden from cross-attention). ``added_cond_kwargs``: ``{"resolution": [B, 2],
        "aspect_ratio": [B, 1]}`` when ``use_size_conditioning``. ``force_drop_ids [B]``
        swaps in the learned null condition (unconditional CFG branch).
        """
        b, _, hh, ww = hidden_states.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        dtype = self.x_embedder.proj.weight.dtype

        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, D]
        x = x + self.get_pos_embed(h, w, x.device).to(dtype)  # [B, N, D]

        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0 or timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(b)
        t = self.t_embedder(timestep)  # [B, D]
        if self.config.use_size_conditioning:
            if not added_cond_kwargs or "resolution" not in added_cond_kwargs:
                raise ValueError(
                    "use_size_conditioning=True: pass added_cond_kwargs={'resolution': [B, 2], "
                    "'aspect_ratio': [B, 1]}"
                )
            res = added_cond_kwargs["resolution"].to(x.device, dtype)
            ar = added_cond_kwargs["aspect_ratio"].to(x.device, dtype)
            t = t + torch.cat([self.csize_embedder(res, b), self.ar_embedder(ar, b)], dim=1)
        c = self.t_block(t) if self.config.adaln_type == "single" else t  # [B, 6D] | [B, D]

        cond = self.y_embedder(
            encoder_hidden_states.to(dtype), self.training, force_drop_ids=force_drop_ids
        )  # [B, Lc, D]
        mask = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.to(x.device) != 0  # [B, Lc] bool
            if not bool(mask.any(dim=1).all()):
                raise ValueError("encoder_attention_mask hides every condition token of a sample")

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, cond, mask)
            else:
                x = block(x, c, cond, mask)  # [B, N, D]

        x = self.final_layer(x, t)  # [B, N, p*p*out]
        out = unpatchify(x, p, h, w, self.out_channels)  # [B, out, H, W]
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
