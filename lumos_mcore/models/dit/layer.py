"""The DiT transformer layer on megatron-core: non-affine norm + adaLN modulation around
megatron's SelfAttention, CrossAttention and MLP.

Lumos block (adaLN-Zero per block, released Lumos code)::

    shift1, scale1, gate1, shift2, scale2, gate2 = adaLN(c)
    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)
    x = x + CrossAttn(q = x, kv = cond_tokens)            # no norm, no gate
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

PixArt adaLN-single has the same block; only where the six modulation vectors come from differs
(a shared projection ``t0`` plus a per-block table), so it is a different ``adaln`` submodule.

Video blocks (spatial + temporal mode) add a temporal self-attention after the (per-frame)
self-attention, Stable-Video-Diffusion style::

    x = x + TemporalAttn(Norm(x) [+ temporal sin-cos position])   # out-proj zero-initialised

so a block built from an image block starts out as that image block applied to every frame.

Layout: hidden states ``[s, b, h]`` (``s`` is the local shard under sequence / context
parallelism). The adaLN conditioning ``c`` is ``[1, b, h]`` (one timestep per sample, broadcast
over ``s``), ``[s, b, h]`` (one row per token), or ``[U, b, h]`` rows indexed per token by
``packed_seq_params.adaln_index`` — per-frame timesteps (a clean condition frame at timestep 0;
the samples of a pack) cost one adaLN projection per *frame*, and the indexed modulation keeps
only the ``U`` rows for backward, not ``s`` gathered copies.

How the conditioning reaches the layer: megatron's ``TransformerBlock`` calls every layer with a
fixed argument list, and under full activation recompute only the tensor arguments
(hidden_states, attention_mask, context, context_mask, rotary_pos_emb) travel through the
checkpoint. The self-attention of a DiT is unmasked (packed sequences use ``packed_seq_params``),
so the block's ``attention_mask`` slot carries ``c`` — it then reaches every layer, with
gradients, on the plain and the recomputed paths alike. ``LumosDiT`` is the only caller.

``DiTLayer`` is a megatron ``TransformerLayer`` to megatron's code: from megatron-core 0.19 the
full-recompute loop passes ``context`` / ``context_mask`` only to ``TransformerLayer`` instances
(other layers are treated as Mamba layers and lose the condition tokens). It builds its own
submodules, so ``TransformerLayer.__init__`` (whose submodule builders change between releases)
is not run; the methods it would have set up for (CUDA graphs, MoE, fused TP inference) are not
used by the DiT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import GraphableMegatronModule, MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import make_viewless_tensor
from torch import Tensor, nn

from lumos_mcore import ops


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (shift/scale broadcast over tokens)."""
    return x * (1 + scale) + shift


class _RowModulate(torch.autograd.Function):
    """``x * (1 + scale[idx]) + shift[idx]`` saving ``x`` and the ``[U, b, h]`` rows only."""

    @staticmethod
    def forward(ctx, x, shift, scale, index):
        ctx.save_for_backward(x, scale, index)
        return torch.addcmul(shift.index_select(0, index), x, 1 + scale.index_select(0, index))

    @staticmethod
    def backward(ctx, grad):
        x, scale, index = ctx.saved_tensors
        gx = grad * (1 + scale.index_select(0, index))
        gshift = grad.new_zeros(scale.shape).index_add_(0, index, grad)
        gscale = grad.new_zeros(scale.shape).index_add_(0, index, grad * x)
        return gx, gshift, gscale, None


class _RowGate(torch.autograd.Function):
    """``gate[idx] * y`` saving ``y`` and the ``[U, b, h]`` gate rows only."""

    @staticmethod
    def forward(ctx, y, gate, index):
        ctx.save_for_backward(y, gate, index)
        return y * gate.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        y, gate, index = ctx.saved_tensors
        gy = grad * gate.index_select(0, index)
        ggate = grad.new_zeros(gate.shape).index_add_(0, index, grad * y)
        return gy, ggate, None


def modulate_rows(x: Tensor, shift: Tensor, scale: Tensor, index: Tensor | None) -> Tensor:
    """:func:`modulate` with per-token rows ``shift/scale[index]`` (``index`` None: broadcast)."""
    if index is None:
        return modulate(x, shift, scale)
    return _RowModulate.apply(x, shift, scale, index)  # [s, b, h]


def gate_rows(y: Tensor, gate: Tensor, index: Tensor | None) -> Tensor:
    """``gate * y`` with per-token rows ``gate[index]`` (``index`` None: broadcast)."""
    if index is None:
        return gate * y
    return _RowGate.apply(y, gate, index)  # [s, b, h]


def norm_modulate(
    norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, index: Tensor | None
) -> Tensor:
    """``modulate(norm(x), shift, scale)``: one fused op (Triton on CUDA when measured faster,
    see :mod:`lumos_mcore.ops`) for the project's non-affine norms with per-sample or per-token
    modulation; row-indexed modulation and other norm modules run unfused."""
    kind = getattr(norm, "kind", None)
    if index is None and kind is not None:
        return ops.norm_modulate(x, shift, scale, eps=norm.eps, norm=kind)  # [s, b, h]
    return modulate_rows(norm(x), shift, scale, index)  # [s, b, h]


def gated_residual(
    x: Tensor, out: Tensor, bias: Tensor | None, gate: Tensor, index: Tensor | None
) -> Tensor:
    """``x + gate * (out + bias)``: fused (:mod:`lumos_mcore.ops`) unless the gate is
    row-indexed."""
    if index is None:
        return ops.gated_residual(x, out, gate, bias)  # [s, b, h]
    return x + gate_rows(_add_bias(out, bias), gate, index)  # [s, b, h]


@contextlib.contextmanager
def init_rng(key: int) -> Iterator[None]:
    """Seed parameter initialisation by a stable ``key`` (e.g. the global layer number).

    A pipeline stage builds only its own layers; drawing their initial weights from one running
    CPU generator would make layer ``k``'s weights depend on how many layers the stage built
    before it, i.e. on the pipeline layout. Inside this block the generator is seeded from the
    run's seed (``torch.initial_seed()``, set by ``build_model``) and ``key``; the outer
    generator's state is restored afterwards.
    """
    seed = (torch.initial_seed() + 1_000_003 * (key + 1)) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def mark_sequence_parallel(module: nn.Module, config: TransformerConfig) -> None:
    """Mark replicated params whose grads are partial sums under sequence parallelism.

    Modules applied to the local sequence shard of every TP rank (adaLN, final layer, timestep
    embedder) get a different gradient on each TP rank when SP is on; megatron all-reduces the
    grads of params carrying ``sequence_parallel=True`` over the TP group.
    """
    for p in module.parameters():
        p.sequence_parallel = config.sequence_parallel


class NonAffineLayerNorm(nn.Module):
    """LayerNorm without weight/bias: adaLN supplies the affine part."""

    kind = "layernorm"  # the fused norm + modulate op of ``lumos_mcore.ops``

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.hidden_size,), eps=self.eps)  # [s, b, h]


class NonAffineRMSNorm(nn.Module):
    """RMSNorm without weight (Flag-DiT option); adaLN supplies the scale."""

    kind = "rmsnorm"

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [s, b, h]
        return out.to(x.dtype)


class AdaLNZero(MegatronModule):
    """Per-block adaLN-Zero (Lumos/DiT): ``Linear(SiLU(c))`` -> 6 modulation vectors.

    Replicated on every TP rank (its output is needed in full); zero-initialised so each block
    starts as the identity.
    """

    num_chunks = 6

    def __init__(self, config: TransformerConfig, **kwargs) -> None:
        super().__init__(config=config)
        h = config.hidden_size
        self.linear = nn.Linear(h, self.num_chunks * h, dtype=config.params_dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        mark_sequence_parallel(self, config)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        mod = self.linear(F.silu(c))  # [1|s, b, 6h]
        return mod.chunk(self.num_chunks, dim=-1)  # 6 x [1|s, b, h]


class AdaLNSingle(MegatronModule):
    """PixArt adaLN-single: a per-block table added to the shared projection ``t0``.

    ``c`` here is ``t0 = t_block(t)`` of shape ``[1|s, b, 6h]``, computed once by the model.
    """

    num_chunks = 6

    def __init__(self, config: TransformerConfig, **kwargs) -> None:
        super().__init__(config=config)
        h = config.hidden_size
        table = torch.randn(self.num_chunks, h, dtype=config.params_dtype) / h**0.5
        self.scale_shift_table = nn.Parameter(table)
        mark_sequence_parallel(self, config)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        mod = c.unflatten(-1, (self.num_chunks, -1)) + self.scale_shift_table  # [1|s, b, 6, h]
        return mod.unbind(dim=-2)  # 6 x [1|s, b, h]


@dataclass
class DiTLayerSubmodules:
    """Submodules of one DiT layer; spec functions in ``layer_spec`` fill them."""

    adaln: ModuleSpec | type = AdaLNZero
    norm1: ModuleSpec | type = NonAffineLayerNorm
    self_attention: ModuleSpec | type | None = None
    temporal_norm: ModuleSpec | type = NonAffineLayerNorm
    temporal_attention: ModuleSpec | type | None = None  # video spatial + temporal mode only
    cross_attention: ModuleSpec | type | None = None
    norm2: ModuleSpec | type = NonAffineLayerNorm
    mlp: ModuleSpec | type | None = None


class DiTLayer(TransformerLayer):
    """One Lumos/PixArt DiT block built from megatron-core attention and MLP modules.

    ``zero_init_cross_proj`` (spec parameter): zero the cross-attention output projection as the
    released Lumos code does; a tanh-gated cross-attention (Flag-DiT) keeps it and zeroes the
    gate instead (zeroing both would leave both without gradient).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: DiTLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection=None,
        vp_stage: int | None = None,
        zero_init_cross_proj: bool = True,
        **kwargs,
    ) -> None:
        if config.cuda_graph_impl != "none":
            raise ValueError(
                f"cuda_graph_impl={config.cuda_graph_impl!r}: the DiT layer does not support "
                "megatron's CUDA graphs; leave cuda_graph_impl='none'"
            )
        # TransformerLayer's own __init__ builds GPT submodules: skipped (module docstring).
        GraphableMegatronModule.__init__(self, config=config)
        # Global 1-based index, as megatron's TransformerLayer keeps it (FP8 recipes and
        # checkpoint keys use it); TransformerBlock passes the stage-local number.
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage)
        self.submodules_config = submodules
        extra = {} if pg_collection is None else {"pg_collection": pg_collection}
        cp_comm_type = config.cp_comm_type
        if isinstance(cp_comm_type, list):  # one entry per layer
            cp_comm_type = cp_comm_type[self.layer_number - 1]
        extra["cp_comm_type"] = cp_comm_type
        with init_rng(self.layer_number):  # the layer's weights do not depend on the layout
            self._build(config, submodules, layer_number, extra, zero_init_cross_proj)

    def _build(self, config, submodules, layer_number, extra, zero_init_cross_proj) -> None:
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.adaln = build_module(submodules.adaln, config=config)
        self.norm1 = build_module(submodules.norm1, config=config, hidden_size=h, eps=eps)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number, **extra
        )
        self.temporal_norm = self.temporal_attention = None
        if submodules.temporal_attention is not None:
            self.temporal_norm = build_module(
                submodules.temporal_norm, config=config, hidden_size=h, eps=eps
            )
            self.temporal_attention = build_module(
                submodules.temporal_attention, config=config, layer_number=layer_number, **extra
            )
            # Zero output: a video block starts as the image block on every frame.
            with torch.no_grad():
                self.temporal_attention.linear_proj.weight.zero_()
                if self.temporal_attention.linear_proj.bias is not None:
                    self.temporal_attention.linear_proj.bias.zero_()
        self.cross_attention = build_module(
            submodules.cross_attention, config=config, layer_number=layer_number, **extra
        )
        self.norm2 = build_module(submodules.norm2, config=config, hidden_size=h, eps=eps)
        self.mlp = build_module(submodules.mlp, config=config)
        if zero_init_cross_proj:
            # Zero-init the cross-attention output so a fresh block ignores the condition
            # (released Lumos code); megatron already zeroes the bias.
            with torch.no_grad():
                self.cross_attention.linear_proj.weight.zero_()

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        c = attention_mask  # adaLN conditioning [1|s|U, b, h] (see module docstring)
        x = hidden_states  # [s, b, h]
        index = getattr(packed_seq_params, "adaln_index", None)  # [s] rows of c, or None
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c)  # 6 x [1|s|U, b, h]

        h = norm_modulate(self.norm1, x, shift1, scale1, index)  # [s, b, h]
        out, bias = self.self_attention(
            h,
            attention_mask=None,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
        )  # [s, b, h]
        x = gated_residual(x, out, bias, gate1, index)  # [s, b, h]

        if self.temporal_attention is not None:
            h = self.temporal_norm(x)  # [s, b, h]
            pos = getattr(packed_seq_params, "temporal_pos", None)  # [s, 1, h] or None
            if pos is not None:
                h = h + pos.to(h.dtype)
            out, bias = self.temporal_attention(
                h,
                attention_mask=None,
                rotary_pos_emb=rotary_pos_emb,
                packed_seq_params=packed_seq_params,
            )  # [s, b, h]
            x = x + _add_bias(out, bias)  # [s, b, h]

        out, bias = self.cross_attention(
            x,
            attention_mask=context_mask,
            key_value_states=context,
            packed_seq_params=packed_seq_params,
        )  # [s, b, h]
        x = x + _add_bias(out, bias)  # [s, b, h]

        h = norm_modulate(self.norm2, x, shift2, scale2, index)  # [s, b, h]
        out, bias = self.mlp(h)  # [s, b, h]
        x = gated_residual(x, out, bias, gate2, index)  # [s, b, h]

        # Pipeline sends and activation deallocation need a tensor that is not a view.
        x = make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True)
        return x, context

    # MegatronModule's sharded state dict (the submodules' own keys); TransformerLayer's
    # remaps GPT layer-norm names that the DiT layer does not have.
    sharded_state_dict = MegatronModule.sharded_state_dict


def _add_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    return out if bias is None else out + bias
