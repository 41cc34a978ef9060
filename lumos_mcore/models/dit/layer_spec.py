"""Spec functions for the DiT layer: variants are specs, not flags inside modules.

``get_dit_layer_local_spec`` uses megatron's tensor-parallel linears and SDPA core attention and
runs everywhere (CPU included); ``get_dit_layer_te_spec`` uses TransformerEngine linears and
``TEDotProductAttention`` (fused/flash attention, FP8, TE context parallelism). The non-affine
norms stay outside TE's fused LayerNorm-Linear because adaLN modulates between norm and linear.

Options shared by both (every Lumos variant can use them):

* ``video``: ``None`` (images, or full 3-D attention over all frames' tokens) or
  ``"spatial_temporal"`` (per-frame self-attention + a temporal self-attention per block);
* Flag-DiT: ``norm`` (``layernorm`` | ``rmsnorm``), ``qk_norm`` (per-head norm of q and k,
  megatron's ``q_layernorm`` / ``k_layernorm``), ``cross_attn_gate`` (tanh-gated cross-attention).

``get_lumos_layer_spec(model_cfg)`` reads all of them from a :class:`ModelConfig`.
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache, partial

from megatron.core.transformer.attention import CrossAttentionSubmodules, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from lumos_mcore.models.dit.attention import SDPACoreAttention
from lumos_mcore.models.dit.cross_attention import DiTCrossAttention
from lumos_mcore.models.dit.layer import (
    AdaLNSingle,
    AdaLNZero,
    DiTLayer,
    DiTLayerSubmodules,
    NonAffineLayerNorm,
    NonAffineRMSNorm,
)
from lumos_mcore.models.dit.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
from lumos_mcore.models.dit.self_attention import DiTSelfAttention

log = logging.getLogger(__name__)

ADALN = {"zero": AdaLNZero, "single": AdaLNSingle}
NORMS = {"layernorm": NonAffineLayerNorm, "rmsnorm": NonAffineRMSNorm}


def without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """Shallow copy of ``config`` with SP off, for layers whose input is replicated."""
    cfg = copy.copy(config)
    cfg.sequence_parallel = False
    return cfg


class ContextColumnParallelLinear(FusedBiasColumnParallelLinear):
    """K/V projection of the condition tokens.

    The condition tokens (1 DINO token, 120 T5 tokens) are replicated on every TP and CP rank
    rather than sequence-split, so this projection must not all-gather its input under sequence
    parallelism; the backward all-reduce of a plain column-parallel input is what it needs.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kw):
        super().__init__(input_size, output_size, config=without_sequence_parallel(config), **kw)


@lru_cache(maxsize=1)
def te_available() -> bool:
    """True when TransformerEngine and megatron's TE extension import cleanly.

    megatron's extension swallows a failing TE sub-import (e.g. a TE built for another torch)
    and only sets ``HAVE_TE = False``; building the TE spec would then fail much later.
    """
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te
    except Exception:  # a partial TE install raises RuntimeError, not ImportError
        return False
    return bool(getattr(_te, "HAVE_TE", True))


VIDEO_MODES = (None, "spatial_temporal")


def _self_attention_spec(linear_col, linear_row, core_attention, qk_norm) -> ModuleSpec:
    return ModuleSpec(
        module=DiTSelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_col,
            core_attention=core_attention,
            linear_proj=linear_row,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _dit_spec(
    *,
    linear_col: type,
    linear_row: type,
    linear_ctx: type,
    core_attention: type,
    adaln_type: str,
    norm: str,
    qk_norm: type | None,
    video: str | None,
    cross_attn_gate: bool,
) -> ModuleSpec:
    if video not in VIDEO_MODES:
        raise ValueError(
            f"video mode {video!r}: choose None (full attention) or 'spatial_temporal'"
        )
    st = video == "spatial_temporal"

    def core(pattern: str | None = None, gated: bool = False):
        # megatron's Attention calls ``submodules.core_attention(...)`` directly (no
        # build_module), so spec parameters are bound with partial.
        params = {}
        if pattern is not None:
            params["pattern"] = pattern
        if gated:
            params["gated"] = True
        return partial(core_attention, **params) if params else core_attention

    return ModuleSpec(
        module=DiTLayer,
        params={"zero_init_cross_proj": not cross_attn_gate},
        submodules=DiTLayerSubmodules(
            adaln=ADALN[adaln_type],
            norm1=NORMS[norm],
            self_attention=_self_attention_spec(
                linear_col, linear_row, core("spatial" if st else None), qk_norm
            ),
            temporal_norm=NORMS[norm],
            temporal_attention=(
                _self_attention_spec(linear_col, linear_row, core("temporal"), qk_norm)
                if st
                else None
            ),
            cross_attention=ModuleSpec(
                module=DiTCrossAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=CrossAttentionSubmodules(
                    linear_q=linear_col,
                    linear_kv=linear_ctx,
                    core_attention=core(gated=cross_attn_gate),
                    linear_proj=linear_row,
                ),
            ),
            norm2=NORMS[norm],
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=linear_col, linear_fc2=linear_row),
            ),
        ),
    )


def get_dit_layer_local_spec(
    adaln_type: str = "zero",
    norm: str = "layernorm",
    qk_norm: bool = False,
    *,
    video: str | None = None,
    cross_attn_gate: bool = False,
) -> ModuleSpec:
    """megatron tensor-parallel linears (bias folded into the GEMM where that is exact, see
    :mod:`~lumos_mcore.models.dit.linear`) + SDPA core attention (CPU and GPU without TE)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return _dit_spec(
        linear_col=FusedBiasColumnParallelLinear,
        linear_row=FusedBiasRowParallelLinear,
        linear_ctx=ContextColumnParallelLinear,
        core_attention=SDPACoreAttention,
        adaln_type=adaln_type,
        norm=norm,
        qk_norm=WrappedTorchNorm if qk_norm else None,
        video=video,
        cross_attn_gate=cross_attn_gate,
    )


def get_dit_layer_te_spec(
    adaln_type: str = "zero",
    norm: str = "layernorm",
    qk_norm: bool = False,
    *,
    video: str | None = None,
    cross_attn_gate: bool = False,
) -> ModuleSpec:
    """TransformerEngine linears + ``TEDotProductAttention`` (fused attention, FP8, TE CP)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    from lumos_mcore.models.dit.te_attention import TEVideoDotProductAttention
    from lumos_mcore.ops.te_fp8 import without_fp8

    @without_fp8  # 1-120 condition tokens per sample: too few rows for FP8 GEMMs
    class TEContextColumnParallelLinear(TEColumnParallelLinear):
        """TE twin of :class:`ContextColumnParallelLinear` (replicated condition tokens)."""

        def __init__(self, input_size, output_size, *, config, **kw):
            super().__init__(
                input_size, output_size, config=without_sequence_parallel(config), **kw
            )

    return _dit_spec(
        linear_col=TEColumnParallelLinear,
        linear_row=TERowParallelLinear,
        linear_ctx=TEContextColumnParallelLinear,
        core_attention=TEVideoDotProductAttention,
        adaln_type=adaln_type,
        norm=norm,
        qk_norm=TENorm if qk_norm else None,
        video=video,
        cross_attn_gate=cross_attn_gate,
    )


def use_te_spec(spec: str = "auto") -> bool:
    """Whether ``model.spec`` resolves to the TransformerEngine spec on this machine."""
    if spec == "te" and not te_available():
        raise ValueError("model.spec='te': TransformerEngine is not importable on this machine")
    return spec == "te" or (spec == "auto" and te_available())


def get_dit_layer_spec(
    spec: str = "auto",
    adaln_type: str = "zero",
    norm: str = "layernorm",
    qk_norm: bool = False,
    *,
    video: str | None = None,
    cross_attn_gate: bool = False,
) -> ModuleSpec:
    """Pick the TE spec when TransformerEngine imports (``auto``), else the local spec."""
    use_te = use_te_spec(spec)
    log.info("DiT layer spec: %s", "transformer_engine" if use_te else "local (megatron + SDPA)")
    build = get_dit_layer_te_spec if use_te else get_dit_layer_local_spec
    return build(
        adaln_type=adaln_type,
        norm=norm,
        qk_norm=qk_norm,
        video=video,
        cross_attn_gate=cross_attn_gate,
    )


def get_lumos_layer_spec(model_cfg) -> ModuleSpec:
    """The layer spec a :class:`~lumos_mcore.config.model.ModelConfig` asks for."""
    return get_dit_layer_spec(
        model_cfg.spec,
        adaln_type=model_cfg.adaln_type,
        norm=model_cfg.norm,
        qk_norm=model_cfg.qk_norm,
        video="spatial_temporal" if model_cfg.temporal_attention else None,
        cross_attn_gate=model_cfg.cross_attn_gate,
    )
