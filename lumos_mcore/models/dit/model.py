"""LumosDiT: the Lumos image DiT (I2I / T2I) as a megatron-core module.

Data flow (one pipeline stage shown whole)::

    latents [B, C, H, W] --x_embedder + 2-D sin-cos--> [B, N, D] --> [N, B, D] (SP: [N/tp, B, D])
    timesteps [B] --t_embedder (+ size/aspect)--> t [B, D] --(adaLN-single: t_block)--> c [1, B, *]
    cond [B, Lc, Cc] --y_embedder (null-token dropout)--> context [Lc, B, D] (replicated on TP/CP)
    TransformerBlock of DiTLayer (adaLN conditioning c in the block's attention_mask slot)
    final layer on the local shard --> gather over SP --> unpatchify --> [B, C_out, H, W]

Pipeline parallelism: the patch embedder lives on the first stage and the final layer on the
last; the timestep / condition embedders are tiny and are *replicated on every stage* (each stage
needs ``c`` and ``context``). Their params carry ``pipeline_parallel=True`` and
``config.has_cond_embedder`` is set, so megatron's ``finalize_model_grads`` all-reduces their
grads over the pipeline group and the replicas never drift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.models.common.embeddings import (
    ConditionEmbedder,
    FinalLayer,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    unpatchify,
)
from lumos_mcore.models.dit.layer import mark_sequence_parallel
from lumos_mcore.models.dit.layer_spec import get_dit_layer_spec


def build_transformer_config(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    bf16: bool = False,
    **overrides,
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for a Lumos DiT; only fields a DiT uses are set.

    Weights are initialised on CPU from the full (unsharded) matrices with Xavier-uniform, as
    the released code does, so a model's initial weights do not depend on the TP layout.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = {}
    if cfg.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers,
        )
    elif cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    config = TransformerConfig(
        num_layers=cfg.depth_,
        hidden_size=cfg.hidden_size_,
        num_attention_heads=cfg.num_heads_,
        ffn_hidden_size=int(cfg.hidden_size_ * cfg.mlp_ratio),
        activation_func=_gelu_tanh,
        gated_linear_unit=False,
        bias_activation_fusion=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=cfg.norm_eps,
        init_method=nn.init.xavier_uniform_,
        output_layer_init_method=nn.init.xavier_uniform_,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=bf16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **recompute,
        **overrides,
    )
    # Replicated timestep/condition embedders on every pipeline stage (see module docstring).
    config.has_cond_embedder = pp > 1
    return config


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class LumosDiT(MegatronModule):
    """Lumos DiT for images (I2I: DINO condition, T2I: T5 condition) on megatron-core."""

    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        *,
        spec: ModuleSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        d, p = config.hidden_size, model_cfg.patch_size
        self.patch_size = p
        self.out_channels = model_cfg.out_channels
        self.pos_base_size = model_cfg.latent_size // p

        # Embedders replicated on every pipeline stage.
        self.t_embedder = TimestepEmbedder(d)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.y_embedder = ConditionEmbedder(model_cfg.cond_channels, d, model_cfg.cond_tokens)
        self.y_embedder.initialize_weights()
        replicated = [self.t_embedder, self.y_embedder]
        # Params fed by the local sequence shard only (partial grads under SP).
        sp_partial = [self.t_embedder]
        if model_cfg.use_size_conditioning:
            self.csize_embedder = SizeEmbedder(d // 3)
            self.ar_embedder = SizeEmbedder(d // 3)
            replicated += [self.csize_embedder, self.ar_embedder]
            sp_partial += [self.csize_embedder, self.ar_embedder]
        if model_cfg.adaln_type == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            nn.init.normal_(self.t_block[1].weight, std=0.02)
            nn.init.zeros_(self.t_block[1].bias)
            replicated.append(self.t_block)
            sp_partial.append(self.t_block)

        if pre_process:
            self.x_embedder = PatchEmbed(p, model_cfg.in_channels, d)
            self.x_embedder.initialize_weights()
        self.decoder = TransformerBlock(
            config=config,
            spec=spec or get_dit_layer_spec(model_cfg.spec, adaln_type=model_cfg.adaln_type),
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.final_layer = FinalLayer(d, p, self.out_channels, eps=model_cfg.norm_eps)
            sp_partial.append(self.final_layer)

        self._replicated_prefixes = tuple(
            name + "." for name, m in self.named_children() if any(m is r for r in replicated)
        )
        for module in replicated:
            for param in module.parameters():
                param.pipeline_parallel = True
        for module in sp_partial:
            mark_sequence_parallel(module, config)
        self.to(config.params_dtype)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    # -- pipeline plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Called by megatron's schedules on non-first stages with the received activation."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron sharded state dict; the embedders replicated on every pipeline stage are
        saved by the first stage only (other stages mark their copies as non-main replicas)."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.pre_process:
            pp_size = parallel_state.get_pipeline_model_parallel_world_size()
            stage = (
                self.vp_stage or 0
            ) * pp_size + parallel_state.get_pipeline_model_parallel_rank()
            for key, sh in sharded.items():
                if key[len(prefix) :].startswith(self._replicated_prefixes):
                    rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                    sh.replica_id = (stage, *rid[1:]) if len(rid) > 1 else (stage,)
        return sharded

    # -- helpers ----------------------------------------------------------------------------
    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Fixed 2-D sin-cos positions for an ``h x w`` token grid, ``[h*w, D]`` (cached)."""
        key = (h, w)
        if key not in self._pos_cache:
            self._pos_cache[key] = get_2d_sincos_pos_embed(
                self.config.hidden_size,
                (h, w),
                base_size=self.pos_base_size,
                interpolation_scale=self.model_cfg.pos_interpolation_scale,
            ).float()
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def condition(
        self,
        timesteps: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Timestep + condition embeddings: ``(t [B, D], c [1, B, D|6D], context, ctx_mask)``."""
        dtype = self.config.params_dtype
        b = timesteps.shape[0]
        t = self.t_embedder(timesteps.float())  # [B, D]
        if self.model_cfg.use_size_conditioning:
            if resolution is None or aspect_ratio is None:
                raise ValueError(
                    "model.use_size_conditioning=True: pass resolution [B, 2] and aspect_ratio "
                    "[B, 1] with every batch"
                )
            size = torch.cat(
                [
                    self.csize_embedder(resolution.float(), b),
                    self.ar_embedder(aspect_ratio.float(), b),
                ],
                dim=1,
            )  # [B, D]
            t = t + size.to(t.dtype)  # [B, D]
        c = self.t_block(t) if self.model_cfg.adaln_type == "single" else t  # [B, D|6D]
        # Dropout decisions come from the caller (identical on all ranks of a model replica).
        context = self.y_embedder(cond.to(dtype), train=False, force_drop_ids=force_drop_ids)
        context = context.transpose(0, 1).contiguous()  # [Lc, B, D]
        context_mask = None
        if cond_mask is not None:
            context_mask = ~cond_mask.bool()[:, None, None, :]  # [B, 1, 1, Lc], True = masked
        return t, c[None], context, context_mask  # c: [1, B, D|6D]

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> Tensor:
        """Predict noise (+ variance) for ``latents [B, C, H, W]`` at ``timesteps [B]``.

        ``cond [B, Lc, Cc]`` are the condition tokens (``cond_mask [B, Lc]``, True = real
        token); ``force_drop_ids [B]`` swaps a sample's condition for the learned null one.
        Returns ``[B, C_out, H, W]`` on the last pipeline stage, the stage's hidden states
        ``[s, B, D]`` elsewhere.
        """
        b, _, hh, ww = latents.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        t, c, context, context_mask = self.condition(
            timesteps, cond, cond_mask, force_drop_ids, resolution, aspect_ratio
        )
        x = None
        if self.pre_process:
            dtype = self.config.params_dtype
            x = self.x_embedder(latents.to(dtype))  # [B, N, D]
            x = x + self.pos_embed(h, w, x.device, x.dtype)  # [B, N, D]
            x = x.transpose(0, 1).contiguous()  # [N, B, D]
            if self.config.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x)  # [N/tp, B, D]

        x = self.decoder(
            hidden_states=x, attention_mask=c, context=context, context_mask=context_mask
        )  # [s, B, D]
        if not self.post_process:
            return x

        out = self.final_layer(x.transpose(0, 1), t)  # [B, s, p*p*C_out]
        out = out.transpose(0, 1).contiguous()  # [s, B, p*p*C_out]
        if self.config.sequence_parallel:
            # The final layer ran on the local shard; every TP rank needs the whole prediction,
            # and its gradient w.r.t. the gathered output is identical on all TP ranks.
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        out = out.transpose(0, 1)  # [B, N, p*p*C_out]
        return unpatchify(out, self.patch_size, h, w, self.out_channels)  # [B, C_out, H, W]


def is_pipeline_first(vp_stage: int | None = None) -> bool:
    """First pipeline stage (of the given virtual stage) in the current parallel state."""
    try:
        return parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    except TypeError:  # older signature without vp_stage
        return parallel_state.is_pipeline_first_stage()


def is_pipeline_last(vp_stage: int | None = None) -> bool:
    """Last pipeline stage (of the given virtual stage) in the current parallel state."""
    try:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    except TypeError:
        return parallel_state.is_pipeline_last_stage()


def build_lumos_dit(
    model_cfg: ModelConfig, config: TransformerConfig, vp_stage: int | None = None
) -> LumosDiT:
    """Build this rank's pipeline stage of a Lumos DiT (parallel state must be initialised)."""
    return LumosDiT(
        config,
        model_cfg,
        pre_process=is_pipeline_first(vp_stage),
        post_process=is_pipeline_last(vp_stage),
        vp_stage=vp_stage,
    )
