"""Diffusers-style Lumos-I2V: the Hugging Face export format of the image-to-video models and
their pure-PyTorch numerical reference.

The blocks, embedders and names are those of :mod:`lumos_mcore.hf.lumos_transformer_2d`; a
video block adds, in the spatial + temporal mode (Lumos / Stable-Video-Diffusion recipe), a
temporal self-attention after the per-frame self-attention::

    x = x + gate1 * SelfAttn_per_frame(modulate(Norm(x), shift1, scale1))
    x = x + TemporalAttn(Norm(x) [+ 1-D sin-cos of the frame index])   # out-proj zero-init
    x = x + CrossAttn(x, cond)
    x = x + gate2 * MLP(modulate(Norm(x), shift2, scale2))

(``blocks.{i}.temporal_attn.{qkv,proj}``, plus ``q_norm`` / ``k_norm`` with QK-norm), so an
I2I export inflated to video starts as the image model on every frame. ``video_attention=
"full_3d"`` instead runs one self-attention over all frames' tokens with a 3-D sin-cos table.
Tokens are frame-major ``(t, h, w)``; per-frame timesteps ``[B, T]`` (the clean conditioning
frame at 0) give per-frame adaLN rows.

Nothing here imports megatron: the exported model runs wherever diffusers runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from lumos_mcore.hf.lumos_transformer_2d import (
    LumosBlock,
    LumosSelfAttention,
    LumosTransformer2DModel,
    _norm,
    per_token,
)
from lumos_mcore.models.common.embeddings import (
    get_1d_sincos_pos_embed,
    get_3d_sincos_pos_embed,
    unpatchify_video,
)

__all__ = ["LumosTransformer3DModel", "LumosVideoBlock", "VideoGrid"]

VIDEO_ATTENTION = ("spatial_temporal", "full_3d")


@dataclass
class VideoGrid:
    """Token grid of a video batch: ``frames`` x ``hw`` tokens per sample (frame-major), and the
    temporal attention's additive positions ``[1, N, D]`` (sin-cos mode) or None."""

    frames: int
    hw: int
    temporal_pos: Tensor | None = None


class LumosVideoBlock(LumosBlock):
    """:class:`LumosBlock` over video tokens ``[B, T*hw, D]`` (module docstring).

    ``temporal_attention=True``: per-frame self-attention plus ``temporal_attn`` (each spatial
    position attends to itself in every frame); False: full 3-D self-attention.
    """

    def __init__(self, *args: Any, temporal_attention: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.has_temporal = temporal_attention
        if temporal_attention:
            hidden, heads = self.attn.qkv.in_features, self.attn.num_heads
            eps = self.norm1.eps
            self.temporal_norm = _norm(kwargs.get("norm_type", "layernorm"), hidden, eps, False)
            self.temporal_attn = LumosSelfAttention(hidden, heads, kwargs.get("qk_norm"), eps)

    def self_attention(self, h: Tensor, rope: Tensor | None, grid: VideoGrid) -> Tensor:
        if not self.has_temporal:
            return self.attn(h, rope)  # [B, N, D] full 3-D
        b, n, d = h.shape
        t, hw = grid.frames, grid.hw
        frames = h.reshape(b * t, hw, d)  # [B*T, hw, D]
        angles = None
        if rope is not None:
            angles = rope.reshape(t, hw, -1).repeat(b, 1, 1)  # [B*T, hw, P]
        return self.attn(frames, angles).reshape(b, n, d)  # [B, N, D]

    def temporal(self, x: Tensor, rope: Tensor | None, grid: VideoGrid) -> Tensor:
        if not self.has_temporal:
            return x
        b, n, d = x.shape
        t, hw = grid.frames, grid.hw
        h = self.temporal_norm(x)  # [B, N, D]
        if grid.temporal_pos is not None:
            h = h + grid.temporal_pos.to(h.dtype)
        h = h.reshape(b, t, hw, d).transpose(1, 2).reshape(b * hw, t, d)  # [B*hw, T, D]
        angles = None
        if rope is not None:
            angles = rope.reshape(t, hw, -1).transpose(0, 1).repeat(b, 1, 1)  # [B*hw, T, P]
        out = self.temporal_attn(h, angles)  # [B*hw, T, D]
        return x + out.reshape(b, hw, t, d).transpose(1, 2).reshape(b, n, d)  # [B, N, D]


class LumosTransformer3DModel(LumosTransformer2DModel):
    """Lumos-I2V diffusion transformer over per-frame VAE latents (diffusers ``ModelMixin``).

    ``forward(hidden_states [B, C, T, H, W], timestep [B] | [B, T], encoder_hidden_states
    [B, Lc, Cc])`` returns ``Transformer2DModelOutput(sample=[B, out_channels, T, H, W])``.

    Config: every :class:`LumosTransformer2DModel` field except ``camera_dim``, plus
    ``num_frames`` (latent frames trained on; other counts run too), ``video_attention``
    (``"spatial_temporal"`` | ``"full_3d"``) and ``first_frame_condition`` (recorded for
    samplers: frame 0 is the clean condition at timestep 0; the network itself just takes the
    per-frame timesteps it is given).
    """

    _no_split_modules = ["LumosVideoBlock"]

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
        norm_type: str = "layernorm",
        qk_norm: bool = False,
        pos_embed_type: str = "sincos",
        rope_theta: float = 10000.0,
        rope_ntk_factor: float = 1.0,
        cross_attn_gate: bool = False,
        num_frames: int = 16,
        video_attention: str = "spatial_temporal",
        first_frame_condition: bool = True,
    ) -> None:
        # The image model's registered __init__ would register its own fields again: build
        # from this class's config directly.
        super(LumosTransformer2DModel, self).__init__()
        self._build(self.config, self._blocks_kwargs(self.config))

    @staticmethod
    def _blocks_kwargs(config: Any) -> dict[str, Any]:
        if config.video_attention not in VIDEO_ATTENTION:
            raise ValueError(
                f"config.video_attention={config.video_attention!r}: choose one of "
                f"{VIDEO_ATTENTION}"
            )
        if config.num_frames <= 0:
            raise ValueError(f"config.num_frames={config.num_frames} must be positive")
        sincos_3d = config.pos_embed_type == "sincos" and config.video_attention == "full_3d"
        if sincos_3d and config.hidden_size % 16:
            raise ValueError(
                f"config.hidden_size={config.hidden_size}: a 3-D sin-cos table needs a "
                "multiple of 16; choose another width or pos_embed_type='rope'"
            )
        kwargs = LumosTransformer2DModel._blocks_kwargs(config)
        kwargs["temporal_attention"] = config.video_attention == "spatial_temporal"
        return kwargs

    def _make_block(self, config: Any, **kwargs: Any) -> nn.Module:
        return LumosVideoBlock(
            config.hidden_size,
            config.num_heads,
            config.mlp_ratio,
            config.adaln_type,
            config.norm_eps,
            **kwargs,
        )

    def initialize_weights(self) -> None:
        """The image model's initialisation, with every temporal attention's output
        projection zero (a fresh video block is the image block on every frame)."""
        super().initialize_weights()
        for block in self.blocks:
            if block.has_temporal:
                nn.init.zeros_(block.temporal_attn.proj.weight)
                nn.init.zeros_(block.temporal_attn.proj.bias)

    def _positions(
        self, t: int, h: int, w: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(additive [1, N, D], temporal [1, N, D], rope [1, N, P])`` positions (Nones where a
        mode has none) of a ``t x h x w`` token grid."""
        c = self.config
        if c.pos_embed_type == "rope":
            return None, None, self.rope_angles(t, h, w, device)
        if c.video_attention == "full_3d":
            table = get_3d_sincos_pos_embed(
                c.hidden_size,
                (t, h, w),
                base_size=self.pos_base_size,
                interpolation_scale=c.pos_interpolation_scale,
                device=device,
            )
            return table[None], None, None
        spatial = self.get_pos_embed(h, w, device).repeat(1, t, 1)  # [1, N, D]
        frame_index = torch.arange(t, device=device).repeat_interleave(h * w)  # [N]
        temporal = get_1d_sincos_pos_embed(c.hidden_size, frame_index).float()  # [N, D]
        return spatial, temporal[None], None

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        force_drop_ids: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Predict the model output for noisy video latents (arguments as the image model's;
        ``timestep`` may be per frame ``[B, T]``)."""
        if kwargs.get("camera") is not None or kwargs.get("input_latent") is not None:
            raise ValueError("the video model takes no camera / input_latent")
        if hidden_states.ndim != 5:
            raise ValueError(
                f"hidden_states of shape {tuple(hidden_states.shape)}: the video model takes "
                "[B, C, T, H, W]"
            )
        b, ch, t, hh, ww = hidden_states.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        dtype = self.x_embedder.proj.weight.dtype
        ts = torch.as_tensor(timestep, device=hidden_states.device)
        if ts.ndim == 2 and ts.shape[1] != t:
            raise ValueError(f"per-frame timestep has {ts.shape[1]} frames; the latents have {t}")

        frames = hidden_states.to(dtype).transpose(1, 2).reshape(b * t, ch, hh, ww)
        x = self.x_embedder(frames).reshape(b, t * h * w, -1)  # [B, N, D] frame-major
        add, temporal, rope = self._positions(t, h, w, x.device)
        if add is not None:
            x = x + add.to(dtype)  # [B, N, D]
        grid = VideoGrid(frames=t, hw=h * w, temporal_pos=temporal)
        t_emb, c = self._timestep_conditioning(ts, b, x.device, added_cond_kwargs)
        cond, mask = self._condition_tokens(
            encoder_hidden_states, encoder_attention_mask, force_drop_ids, None
        )
        x = self._run_blocks(x, c, cond, mask, rope, grid)  # [B, N, D]
        x = self.final_layer(x, per_token(t_emb, x.shape[1]) if t_emb.ndim == 3 else t_emb)
        out = unpatchify_video(x, p, t, h, w, self.out_channels)  # [B, out, T, H, W]
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
