"""LumosDiT: the Lumos DiT family (I2I / T2I / NVS images, I2V video) as a megatron-core module.

Data flow (one pipeline stage shown whole)::

    latents [B, C, (T,) H, W] --patchify (frame-major)--> tokens [B, S, p*p*C]
        (training feeds tokens directly: this CP rank's share [B, S/cp, p*p*C], see ``layout``)
    tokens --x_embedder + sin-cos positions--> [B, s, D] --> [s, B, D] (SP: [s/tp, B, D])
    timesteps [B] or per frame [B, F] --t_embedder (+ size/aspect)--> t --(t_block)--> c
        c: [1, B, *] (one row per sample) or [F, B, *] with a per-token row index
    cond [B, Lc, Cc] --y_embedder (null dropout) (+ camera)--> context [Lc, B, D] (replicated)
    TransformerBlock of DiTLayer (adaLN rows c in the block's attention_mask slot, the
        SequenceLayout in packed_seq_params, 3-D RoPE in rotary_pos_emb)
    final layer on the local shard --> gather over SP --> tokens [B, s, p*p*C_out]
        (dense API: gather over CP --> unpatchify --> [B, C_out, (T,) H, W])

Token order, sharding and packing are described by a :class:`SequenceLayout`; the same model
runs an image batch, a video batch or a pack of mixed samples. Variants are config choices
(``ModelConfig.variant``, ``video_attention``, Flag-DiT options) realised as layer specs
(``layer_spec.get_lumos_layer_spec``) and a few extra embedders:

* ``i2v``: per-frame timesteps (the clean first frame gets timestep 0), spatial + temporal or
  full 3-D attention, 3-D sin-cos or 3-D RoPE positions;
* ``nvs``: the input view's latent is concatenated channel-wise (``in_channels * 2`` patch
  embedder channels) and the relative camera is embedded and added to the condition tokens.

Pipeline parallelism: the patch embedder lives on the first stage and the final layer on the
last; the timestep / condition / camera embedders are tiny and are *replicated on every stage*
(each stage needs ``c`` and ``context``). Their params carry ``pipeline_parallel=True`` and
``config.has_cond_embedder`` is set, so megatron's ``finalize_model_grads`` all-reduces their
grads over the pipeline group and the replicas never drift; the copies past the first stage
carry ``shared=True`` so the gradient norm (clipping) counts each of them once.
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

from lumos_mcore.config.model import ModelConfig, fp8_row_multiple
from lumos_mcore.models.common.embeddings import (
    CameraEmbedder,
    ConditionEmbedder,
    FinalLayer,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    patchify,
    patchify_video,
    sincos_pos_embed_from_coords,
    unpatchify,
    unpatchify_video,
)
from lumos_mcore.models.common.rope import rope_freqs
from lumos_mcore.models.dit.layer import init_rng, mark_sequence_parallel
from lumos_mcore.models.dit.layer_spec import get_lumos_layer_spec, use_te_spec
from lumos_mcore.models.dit.layout import Segment, SequenceLayout


def build_transformer_config(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    bf16: bool = False,
    cp_comm_type: str | None = None,
    **overrides,
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for a Lumos DiT; only fields a DiT uses are set.

    Weights are initialised on CPU from the full (unsharded) matrices with Xavier-uniform, as
    the released code does, so a model's initial weights do not depend on the TP layout.
    ``cp_comm_type`` (``parallel.cp_comm_type``) selects TransformerEngine's CP algorithm.
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
        # Flag-DiT QK-norm: megatron's per-head q/k norms (their grads are summed over TP).
        qk_layernorm=cfg.qk_norm,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        cp_comm_type=cp_comm_type if cp > 1 else None,
        # 3-D RoPE rotates adjacent channel pairs (models.common.rope).
        rotary_interleaved=cfg.pos_embed == "rope",
        **recompute,
        **{**_fp8_overrides(cfg, bf16), **overrides},
    )
    # Replicated timestep/condition embedders on every pipeline stage (see module docstring).
    config.has_cond_embedder = pp > 1
    return config


def _fp8_overrides(cfg: ModelConfig, bf16: bool) -> dict:
    """megatron's FP8 fields for ``model.fp8`` (empty without it); refused where FP8 cannot run."""
    if cfg.fp8 is None:
        return {}
    from lumos_mcore.ops.te_fp8 import fp8_config_overrides

    if not bf16:
        raise ValueError(
            f"model.fp8={cfg.fp8!r}: needs bf16 weights and activations, but this run is fp32 "
            "(model.precision=auto is fp32 without CUDA); set model.precision=bf16 on a GPU"
        )
    if not torch.cuda.is_available() or not use_te_spec(cfg.spec):
        raise ValueError(
            f"model.fp8={cfg.fp8!r}: needs TransformerEngine on a CUDA GPU (here: "
            f"{'TransformerEngine is not importable' if torch.cuda.is_available() else 'no CUDA'})"
            "; drop model.fp8 to train in bf16"
        )
    return fp8_config_overrides(
        cfg.fp8, fp8_format=cfg.fp8_format, bf16_layers_at_ends=cfg.fp8_bf16_layers_
    )


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def fp8_pack_length(
    shapes: list[tuple[int, int, int]], pad_to: int | None, ranks: int, rows: int = 16
) -> int:
    """Padded length of an FP8 pack of ``(frames, h, w)`` samples split over ``ranks`` (CP x SP).

    A pack's token count varies from step to step, and TE asserts when an FP8 GEMM's row count
    is not a multiple of ``rows`` (16, MXFP8 32: :func:`~lumos_mcore.config.model.fp8_row_multiple`):
    an unpadded pack would stop the run at the first odd-sized step. Each pack is padded so every
    rank's share is a multiple of ``rows`` tokens; a fixed length (``pad_to``, pipeline
    parallelism) must already be one (``JobConfig`` checks it).
    """
    multiple = rows * ranks
    if pad_to is not None:
        if pad_to % multiple:
            raise ValueError(
                f"FP8 packs of {pad_to} tokens split over {ranks} ranks (cp x sp): the length "
                f"must be a multiple of {multiple} ({rows} rows per rank for FP8 GEMMs)"
            )
        return pad_to
    total = sum(f * h * w for f, h, w in shapes)
    return -(-total // multiple) * multiple


class LumosDiT(MegatronModule):
    """Lumos DiT (I2I, T2I, NVS, I2V) on megatron-core; see the module docstring."""

    # Sequences split over context-parallel ranks (SequenceLayout); read by the benchmarks.
    supports_context_parallel = True

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
        te = use_te_spec(model_cfg.spec) if spec is None else False
        self.cp_mode = model_cfg.cp_layout
        if self.cp_mode == "auto":
            self.cp_mode = "zigzag" if te else "contiguous"

        # Embedders replicated on every pipeline stage (and on every virtual stage of a rank):
        # seeded alike so all replicas start equal (finalize_model_grads keeps them equal).
        with init_rng(0):
            replicated, sp_partial = self._build_replicated(config, model_cfg)

        if pre_process:
            with init_rng(-1):
                self.x_embedder = PatchEmbed(p, model_cfg.model_in_channels, d)
                self.x_embedder.initialize_weights()
        self.decoder = TransformerBlock(
            config=config,
            spec=spec or get_lumos_layer_spec(model_cfg),
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            with init_rng(config.num_layers + 1):  # same weights at every pipeline layout
                self.final_layer = FinalLayer(d, p, self.out_channels, eps=model_cfg.norm_eps)
            sp_partial.append(self.final_layer)

        self._replicated_prefixes = tuple(
            name + "." for name, m in self.named_children() if any(m is r for r in replicated)
        )
        for module in replicated:
            for param in module.parameters():
                param.pipeline_parallel = True
                # After finalize_model_grads every replica holds the full gradient; megatron's
                # grad norm (clipping) and zero count skip ``shared`` params, so only the first
                # stage's copy counts -- as megatron marks its duplicated word embeddings.
                param.shared = not pre_process
        for module in sp_partial:
            mark_sequence_parallel(module, config)
        self.to(config.params_dtype)
        self._pos_cache: dict[tuple, Tensor] = {}

    def _build_replicated(self, config: TransformerConfig, model_cfg: ModelConfig):
        """Timestep / condition (/ size, camera, adaLN-single) embedders of every stage;
        returns ``(replicated, sp_partial)`` module lists."""
        d = config.hidden_size
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
        if model_cfg.variant == "nvs":
            self.camera_embedder = CameraEmbedder(model_cfg.camera_dim, d)
            replicated.append(self.camera_embedder)  # feeds the (replicated) context
        if model_cfg.adaln_type == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            nn.init.normal_(self.t_block[1].weight, std=0.02)
            nn.init.zeros_(self.t_block[1].bias)
            replicated.append(self.t_block)
            sp_partial.append(self.t_block)
        return replicated, sp_partial

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

    # -- layouts ----------------------------------------------------------------------------
    def make_layout(
        self,
        shape: tuple[int, int, int] | None = None,
        *,
        packed_shapes: list[tuple[int, int, int]] | None = None,
        cond_lens: list[int] | None = None,
        pad_to: int | None = None,
        device: torch.device | str | None = None,
    ) -> SequenceLayout:
        """The layout of a micro-batch on this rank (CP share, SP slice) from the parallel state.

        ``shape = (frames, h, w)`` in tokens for an unpacked batch; ``packed_shapes`` (and the
        samples' ``cond_lens``) for a pack, padded to split evenly over the CP x SP ranks (and
        to ``pad_to`` tokens when given; with FP8 to a multiple of 16 (MXFP8: 32) per rank).
        """
        cp_size = cp_rank = sp_rank = 0
        if parallel_state.model_parallel_is_initialized():
            cp_size = parallel_state.get_context_parallel_world_size()
            cp_rank = parallel_state.get_context_parallel_rank()
            sp_rank = parallel_state.get_tensor_model_parallel_rank()
        cp_size = max(cp_size, 1)
        sp_size = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        sp_rank = sp_rank if sp_size > 1 else 0
        kw = dict(
            cp_size=cp_size, cp_rank=cp_rank, cp_mode=self.cp_mode, sp_size=sp_size, sp_rank=sp_rank
        )
        if packed_shapes is not None:
            lens = cond_lens if cond_lens is not None else [0] * len(packed_shapes)
            if self.config.fp8:
                rows = fp8_row_multiple(self.config.fp8_recipe)
                pad_to = fp8_pack_length(packed_shapes, pad_to, cp_size * sp_size, rows)
            layout = SequenceLayout.for_pack(packed_shapes, lens, pad_to=pad_to, **kw)
        else:
            layout = SequenceLayout([Segment(*shape)], **kw)
        return layout.to(device) if device is not None else layout

    # -- helpers ----------------------------------------------------------------------------
    def _cached(self, key: tuple, build) -> Tensor:
        if key not in self._pos_cache:
            if len(self._pos_cache) > 64:  # layouts vary with packing: keep the cache small
                self._pos_cache.clear()
            self._pos_cache[key] = build()
        return self._pos_cache[key]

    def sincos_positions(self, layout: SequenceLayout) -> Tensor:
        """Additive sin-cos positions of the CP-local tokens ``[s, D]`` (float32).

        Images and the spatial + temporal video mode use the 2-D table of each frame (so a video
        model starts from the image model per frame); full 3-D attention uses the 3-D table.
        """
        video3d = self.model_cfg.is_video and not self.model_cfg.temporal_attention

        def build() -> Tensor:
            d, cfg = self.config.hidden_size, self.model_cfg
            rows = []
            for p in layout.pieces:
                seg = layout.segments[p.segment]
                coords = layout.local_coords[p.local : p.local + p.size].cpu()
                rows.append(
                    sincos_pos_embed_from_coords(
                        d,
                        coords,
                        (seg.height, seg.width),
                        base_size=self.pos_base_size,
                        interpolation_scale=cfg.pos_interpolation_scale,
                        video=video3d,
                    )
                )
            return torch.cat(rows).float().to(layout.device)

        return self._cached(("sincos", video3d, *layout.key()), build)

    def temporal_positions(self, layout: SequenceLayout) -> Tensor:
        """1-D sin-cos of each SP-local token's frame index ``[s_sp, 1, D]`` (temporal attention
        input in the spatial + temporal mode with sin-cos positions)."""

        def build() -> Tensor:
            frames = layout.sp_slice(layout.local_coords[:, 0]).cpu()
            table = get_1d_sincos_pos_embed(self.config.hidden_size, frames)
            return table.float()[:, None].to(layout.device)

        return self._cached(("temporal", *layout.key()), build)

    def rope(self, layout: SequenceLayout) -> Tensor:
        """3-D RoPE angles of the CP-local tokens ``[s, 1, 1, hn]`` (megatron's layout)."""

        def build() -> Tensor:
            cfg = self.model_cfg
            freqs = rope_freqs(
                layout.local_coords.cpu(),
                self.config.kv_channels,
                theta=cfg.rope_theta,
                ntk_factor=cfg.rope_ntk_factor,
            )
            return freqs[:, None, None].to(layout.device)

        return self._cached(("rope", *layout.key()), build)

    def condition(
        self,
        timesteps: Tensor,
        layout: SequenceLayout,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Timestep embeddings: ``(t_final, c, adaln_index)``.

        ``timesteps [B]``: ``c [1, B, D|6D]``, ``t_final [B, D]``, no index. ``timesteps [B, F]``
        (one per frame of the layout, e.g. frame 0 of an I2V sample at 0; every frame of a
        pack): ``c [F, B, D|6D]`` rows, ``t_final [B, s_sp, D]`` and the SP-local token -> row
        index ``[s_sp]``.
        """
        b = timesteps.shape[0]
        per_frame = timesteps.ndim == 2
        if per_frame and timesteps.shape[1] != layout.num_frames:
            raise ValueError(
                f"per-frame timesteps have {timesteps.shape[1]} frames; the sequence has "
                f"{layout.num_frames}"
            )
        t = self.t_embedder(timesteps.float())  # [B, D] or [B, F, D]
        if self.model_cfg.use_size_conditioning:
            if resolution is None or aspect_ratio is None:
                raise ValueError(
                    "model.use_size_conditioning=True: pass resolution [B, 2] and aspect_ratio "
                    "[B, 1] with every batch (one row per sample of a pack)"
                )
            n = layout.num_real_segments if layout.packed else b
            size = torch.cat(
                [
                    self.csize_embedder(resolution.float(), n),
                    self.ar_embedder(aspect_ratio.float(), n),
                ],
                dim=1,
            ).to(t.dtype)  # [n, D]
            if layout.packed:  # per segment -> per frame (pad segments get none)
                frames = torch.tensor(
                    [s.frames for s in layout.segments[: layout.num_real_segments]],
                    device=size.device,
                )
                size = size.repeat_interleave(frames, dim=0)  # [F_real, D]
                size = F.pad(size, (0, 0, 0, layout.num_frames - size.shape[0]))[None]
                t = t + size  # [1, F, D]
            else:
                t = t + (size[:, None] if per_frame else size)  # [B, (F,) D]
        c = self.t_block(t) if self.model_cfg.adaln_type == "single" else t  # [B, (F,) D|6D]
        if not per_frame:
            return t, c[None], None  # c: [1, B, D|6D]
        index = layout.sp_slice(layout.local_frame)  # [s_sp]
        return t[:, index], c.transpose(0, 1).contiguous(), index

    def context(
        self,
        cond: Tensor,
        layout: SequenceLayout,
        cond_mask: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        camera: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Condition tokens: ``(context [Lc, B, D], context_mask [B, 1, 1, Lc] | None,
        context_valid [Lc_total] | None)``; a pack's tokens are its samples' concatenated."""
        dtype = self.config.params_dtype
        cond = cond.to(dtype)
        if layout.packed:
            if cond.shape[:2] != (1, layout.cond_total):
                raise ValueError(
                    f"packed cond must be [1, {layout.cond_total}, Cc] (the samples' condition "
                    f"tokens concatenated), got {tuple(cond.shape)}"
                )
            if force_drop_ids is not None:
                cond = self._drop_packed(cond, layout, force_drop_ids.bool())
            context = self.y_embedder.y_proj(cond)  # [1, Lc_total, D]
        else:
            # Dropout decisions come from the caller (identical on all ranks of a replica).
            context = self.y_embedder(cond, train=False, force_drop_ids=force_drop_ids)
        if camera is not None:
            cam = self.camera_embedder(camera)  # [n, D]
            if layout.packed:
                lens = torch.tensor(
                    [s.cond_len for s in layout.segments[: cam.shape[0]]], device=cam.device
                )
                cam = cam.repeat_interleave(lens, dim=0)[None]  # [1, Lc_total, D]
            else:
                cam = cam[:, None]  # [B, 1, D]
            context = context + cam.to(context.dtype)
        elif self.model_cfg.variant == "nvs":
            raise ValueError("model.variant='nvs': pass camera [B, 12] (R flattened, then T)")
        context = context.transpose(0, 1).contiguous()  # [Lc, B, D]
        if layout.packed:
            valid = None if cond_mask is None else cond_mask.reshape(-1).bool()
            return context, None, valid
        context_mask = None
        if cond_mask is not None:
            context_mask = ~cond_mask.bool()[:, None, None, :]  # [B, 1, 1, Lc], True = masked
        return context, context_mask, None

    def _drop_packed(self, cond: Tensor, layout: SequenceLayout, drop: Tensor) -> Tensor:
        """Swap the condition tokens of dropped pack samples for the first ``cond_len`` tokens
        of the learned null condition."""
        null = self.y_embedder.y_embedding.to(cond.dtype)  # [cond_tokens, Cc]
        rows, flags = [], []
        for i, seg in enumerate(layout.segments[: drop.shape[0]]):
            if seg.cond_len > null.shape[0]:
                raise ValueError(
                    f"pack sample {i} has {seg.cond_len} condition tokens; the null condition "
                    f"has model.cond_tokens={null.shape[0]}"
                )
            rows.append(null[: seg.cond_len])
            flags.append(drop[i].expand(seg.cond_len))
        null_cat = torch.cat(rows)  # [Lc_real, Cc]
        flag = torch.cat(flags).to(cond.device)  # [Lc_real]
        n = null_cat.shape[0]
        head = torch.where(flag[:, None], null_cat, cond[0, :n])
        return torch.cat([head, cond[0, n:]])[None]  # [1, Lc_total, Cc]

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        latents: Tensor | None = None,
        timesteps: Tensor | None = None,
        cond: Tensor | None = None,
        cond_mask: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
        camera: Tensor | None = None,
        input_latent: Tensor | None = None,
        tokens: Tensor | None = None,
        layout: SequenceLayout | None = None,
    ) -> Tensor:
        """Dense API (``latents``) or token API (``tokens`` + ``layout``).

        Dense: ``latents [B, C, H, W]`` (or ``[B, C, T, H, W]`` for I2V) at ``timesteps [B]``
        (or per frame ``[B, T]``); NVS also takes ``input_latent`` (the input view, same shape)
        and ``camera [B, 12]``. Returns ``[B, C_out, (T,) H, W]`` on the last pipeline stage
        (gathered over CP), the stage's hidden states ``[s, B, D]`` elsewhere.

        Tokens: ``tokens [B, s, p*p*C_in]`` are this CP rank's share of ``layout`` (``None`` on
        non-first stages); returns the share's prediction ``[B, s, p*p*C_out]``.

        ``cond [B, Lc, Cc]`` are the condition tokens (``cond_mask [B, Lc]``, True = real
        token); ``force_drop_ids [B]`` swaps a sample's condition for the learned null one.
        """
        if layout is not None:
            return self.forward_tokens(
                tokens,
                layout,
                timesteps,
                cond,
                cond_mask,
                force_drop_ids=force_drop_ids,
                resolution=resolution,
                aspect_ratio=aspect_ratio,
                camera=camera,
            )
        if self.model_cfg.variant == "nvs":
            if input_latent is None:
                raise ValueError("model.variant='nvs': pass input_latent (the input view)")
            latents = torch.cat([latents, input_latent.to(latents.dtype)], dim=1)
        p = self.patch_size
        video = latents.ndim == 5
        frames = latents.shape[2] if video else 1
        h, w = latents.shape[-2] // p, latents.shape[-1] // p
        layout = self.make_layout((frames, h, w), device=latents.device)
        tokens = None
        if self.pre_process:
            tokens = patchify_video(latents, p) if video else patchify(latents, p)  # [B, S, F]
            tokens = layout.shard(tokens, dim=1)  # [B, S/cp, F]
        out = self.forward_tokens(
            tokens,
            layout,
            timesteps,
            cond,
            cond_mask,
            force_drop_ids=force_drop_ids,
            resolution=resolution,
            aspect_ratio=aspect_ratio,
            camera=camera,
        )
        if not self.post_process:
            return out
        if layout.cp_size > 1:
            # Every CP rank returns the whole prediction; its gradient reaches each rank's
            # own tokens (the backward of the gather keeps the local part).
            full = gather_from_sequence_parallel_region(
                out.transpose(0, 1).contiguous(),
                tensor_parallel_output_grad=False,
                group=parallel_state.get_context_parallel_group(),
            )  # [S, B, F] in rank order
            if layout.kv_order is not None:
                full = full.index_select(0, layout.kv_order)
            out = full.transpose(0, 1)  # [B, S, F]
        if video:
            return unpatchify_video(out, p, frames, h, w, self.out_channels)  # [B, C, T, H, W]
        return unpatchify(out, p, h, w, self.out_channels)  # [B, C_out, H, W]

    def forward_tokens(
        self,
        tokens: Tensor | None,
        layout: SequenceLayout,
        timesteps: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
        camera: Tensor | None = None,
    ) -> Tensor:
        """The model on this rank's tokens of ``layout`` (see :meth:`forward`)."""
        device = timesteps.device
        if layout.device != device:
            layout = layout.to(device)
        t_final, c, index = self.condition(timesteps, layout, resolution, aspect_ratio)
        context, context_mask, context_valid = self.context(
            cond, layout, cond_mask, force_drop_ids, camera
        )
        cfg = self.model_cfg
        temporal_pos = None
        if cfg.temporal_attention and cfg.pos_embed == "sincos":
            temporal_pos = self.temporal_positions(layout)  # [s_sp, 1, D]
        bound = layout.bind(
            adaln_index=index, temporal_pos=temporal_pos, context_valid=context_valid
        )
        rope = self.rope(layout) if cfg.pos_embed == "rope" else None  # [s, 1, 1, hn]

        x = None
        if self.pre_process:
            if tokens.shape[1] != layout.local_tokens:
                raise ValueError(
                    f"got {tokens.shape[1]} tokens; this rank's share of {layout} is "
                    f"{layout.local_tokens}"
                )
            x = self.x_embedder.forward_tokens(tokens.to(self.config.params_dtype))  # [B, s, D]
            if cfg.pos_embed == "sincos":
                x = x + self.sincos_positions(layout).to(x.dtype)  # [B, s, D]
            x = x.transpose(0, 1).contiguous()  # [s, B, D]
            if self.config.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x)  # [s/tp, B, D]

        x = self.decoder(
            hidden_states=x,
            attention_mask=c,
            context=context,
            context_mask=context_mask,
            rotary_pos_emb=rope,
            packed_seq_params=bound,
        )  # [s(/tp), B, D]
        if not self.post_process:
            return x

        out = self.final_layer(x.transpose(0, 1), t_final)  # [B, s(/tp), p*p*C_out]
        out = out.transpose(0, 1).contiguous()  # [s(/tp), B, p*p*C_out]
        if self.config.sequence_parallel:
            # The final layer ran on the local shard; every TP rank needs the whole prediction,
            # and its gradient w.r.t. the gathered output is identical on all TP ranks.
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out.transpose(0, 1)  # [B, s, p*p*C_out]


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
