"""Core attention for the megatron "local" DiT spec: PyTorch SDPA, bidirectional, layout- and
context-parallel-aware.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in Python and
refuses context parallelism (only TransformerEngine implements it). Diffusion attention is
bidirectional, so ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU, a fused kernel on CPU) does the work, and context parallelism is ours:

* **Token patterns** (spec parameter ``pattern``) over a :class:`SequenceLayout` passed as
  ``packed_seq_params``: ``full`` — every token attends to all tokens of its own sample (packed
  samples never see each other: a block-diagonal mask, run as one SDPA call per sample or per
  run of identically-shaped samples); ``spatial`` — to the tokens of its own frame; ``temporal``
  — to the tokens at its own spatial position in every frame of its sample.
* **Context parallelism**: each rank keeps its query shard and all-gathers keys and values over
  the CP group when the pattern needs other ranks' tokens (``spatial`` with frame-aligned shards
  needs none). The gathered K/V are *not* kept for backward: the backward re-gathers them and
  recomputes the attention, then reduce-scatters the K/V gradients, so per-rank activation
  memory scales with the local shard (as with ring attention) — the price is one extra attention
  forward per layer in backward.
* **Cross-attention**: the condition tokens are replicated on every CP rank, so nothing is
  gathered; in a pack every sample attends only to its own condition tokens.
* **Gated cross-attention** (Flag-DiT, spec parameter ``gated``): the output of each head is
  multiplied by ``tanh(gate_h)`` with ``gate`` zero-initialised (a fresh block ignores the
  condition; the output projection keeps its normal init so the gate can learn).

Layout in and out follows megatron's core-attention contract:
query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> output ``[sq, b, np * hn]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor, nn

from lumos_mcore.models.dit.layout import SequenceLayout
from lumos_mcore.ops.flash_attention import attend_mask

__all__ = ["PATTERNS", "SDPACoreAttention", "core_attention_sharded_state_dict", "layout_attention"]

PATTERNS = ("full", "spatial", "temporal")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``q [B', np, Lq, hn]``, ``k/v [B', ng, Lk, hn]`` -> ``[B', np, Lq, hn]`` (GQA expanded).

    On CUDA the call goes through ``ops.flash_attention.attention`` (flash-attn when installed
    and the inputs suit it, key-padding masks as varlen; SDPA otherwise).
    """
    if q.is_cuda:
        from lumos_mcore.ops.flash_attention import attention

        return attention(q, k, v, mask, scale)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def core_attention_sharded_state_dict(
    module: nn.Module, prefix: str = "", sharded_offsets: tuple = ()
) -> dict:
    """Sharded state of a DiT core attention: its whole ``state_dict`` (the per-head ``gate``,
    TransformerEngine's ``_extra_state`` and learnable ``softmax_offset``), with the per-head
    tensors split over tensor-parallel ranks along dim 0 like the heads.

    megatron's default would mark ``gate`` replicated, so a checkpoint kept TP rank 0's heads
    only and gave them to every rank on load; megatron's TE core attention saves only
    ``softmax_offset``, dropping ``gate`` and the ``_extra_state`` a strict load expects.
    """
    state = module.state_dict(prefix="", keep_vars=True)
    return make_sharded_tensors_for_checkpoint(
        state, prefix, {"gate": 0, "softmax_offset": 0}, sharded_offsets
    )


def _pad_to_frames(q: Tensor, rel: int, hw: int) -> tuple[Tensor, int, int, int]:
    """Zero-pad queries ``[G, n, ...]`` at in-sample positions ``[rel, rel + n)`` to whole frames.

    Returns ``(padded [G, F*hw, ...], first_frame, frames, lead)`` where ``lead`` padding rows
    precede the real queries. Padded queries are computed and dropped (at most two frames).
    """
    n = q.shape[1]
    fa, fb = rel // hw, -(-(rel + n) // hw)
    lead, tail = rel - fa * hw, fb * hw - rel - n
    if lead or tail:
        pad = [0, 0] * (q.ndim - 2) + [lead, tail]
        q = F.pad(q, pad)
    return q, fa, fb - fa, lead


def _group_attention(
    q: Tensor,
    kv: Callable[[int, int], tuple[Tensor, Tensor]],
    pattern: str,
    shape: tuple[int, int, int],
    rel: int,
    scale: float,
) -> Tensor:
    """Attention of ``G`` query runs ``q [G, n, b, np, hn]`` at in-sample positions
    ``[rel, rel + n)`` of samples shaped ``(frames, h, w)``; ``kv(a, c)`` returns the samples'
    keys/values at in-sample positions ``[a, c)`` as ``[G, c - a, b, ng, hn]``."""
    g, n, b, np_, hn = q.shape
    t, h, w = shape
    hw = h * w
    if pattern == "full":
        k, v = kv(0, t * hw)  # [G, m, b, ng, hn]
        qq = q.permute(0, 2, 3, 1, 4).reshape(g * b, np_, n, hn)  # [G*b, np, n, hn]
        kk = k.permute(0, 2, 3, 1, 4).reshape(g * b, k.shape[3], -1, hn)  # [G*b, ng, m, hn]
        vv = v.permute(0, 2, 3, 1, 4).reshape(g * b, v.shape[3], -1, hn)
        out = _sdpa(qq, kk, vv, None, scale)  # [G*b, np, n, hn]
        return out.reshape(g, b, np_, n, hn).permute(0, 3, 1, 2, 4)  # [G, n, b, np, hn]

    qp, fa, nf, lead = _pad_to_frames(q, rel, hw)  # [G, F*hw, b, np, hn]
    qp = qp.reshape(g, nf, hw, b, np_, hn)
    if pattern == "spatial":
        k, v = kv(fa * hw, (fa + nf) * hw)  # [G, F*hw, b, ng, hn]
        ng = k.shape[3]
        qq = qp.permute(0, 1, 3, 4, 2, 5).reshape(g * nf * b, np_, hw, hn)  # [G*F*b, np, hw, hn]
        kk = k.reshape(g, nf, hw, b, ng, hn).permute(0, 1, 3, 4, 2, 5).reshape(-1, ng, hw, hn)
        vv = v.reshape(g, nf, hw, b, ng, hn).permute(0, 1, 3, 4, 2, 5).reshape(-1, ng, hw, hn)
        out = _sdpa(qq, kk, vv, None, scale)  # [G*F*b, np, hw, hn]
        out = out.reshape(g, nf, b, np_, hw, hn).permute(0, 1, 4, 2, 3, 5)  # [G, F, hw, b, np, hn]
    elif pattern == "temporal":
        k, v = kv(0, t * hw)  # [G, T*hw, b, ng, hn]
        ng = k.shape[3]
        qq = qp.permute(0, 2, 3, 4, 1, 5).reshape(g * hw * b, np_, nf, hn)  # [G*hw*b, np, F, hn]
        kk = k.reshape(g, t, hw, b, ng, hn).permute(0, 2, 3, 4, 1, 5).reshape(-1, ng, t, hn)
        vv = v.reshape(g, t, hw, b, ng, hn).permute(0, 2, 3, 4, 1, 5).reshape(-1, ng, t, hn)
        out = _sdpa(qq, kk, vv, None, scale)  # [G*hw*b, np, F, hn]
        out = out.reshape(g, hw, b, np_, nf, hn).permute(0, 4, 1, 2, 3, 5)  # [G, F, hw, b, np, hn]
    else:
        raise ValueError(f"attention pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
    out = out.reshape(g, nf * hw, b, np_, hn)
    return out[:, lead : lead + n]  # [G, n, b, np, hn]


def layout_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: SequenceLayout,
    pattern: str,
    scale: float,
    kv_global: bool,
) -> Tensor:
    """Self-attention of the local queries ``[s_loc, b, np, hn]`` under ``pattern``.

    ``key``/``value`` are either the whole sequence in global order (``kv_global``, after the CP
    all-gather) or only the local tokens (when ``layout.local_only(pattern)``).
    Returns ``[s_loc, b, np, hn]``.
    """
    outs = []
    for grp in layout.groups:
        p, cnt = grp.first, grp.count
        seg, off = layout.segments[p.segment], layout.offsets[p.segment]
        n = p.size
        rel = p.start - off
        q = query[p.local : p.local + cnt * n].unflatten(0, (cnt, n))  # [G, n, b, np, hn]

        def kv(a: int, c: int, p=p, cnt=cnt, n=n, off=off, rel=rel, seg=seg):
            m = seg.num_tokens
            if kv_global:
                rows = slice(off, off + cnt * m)
                k = key[rows].unflatten(0, (cnt, m))[:, a:c]
                v = value[rows].unflatten(0, (cnt, m))[:, a:c]
                return k, v
            if a < rel or c > rel + n:
                raise RuntimeError(
                    f"attention needs keys [{a}, {c}) of a sample held partly on other CP ranks"
                )
            rows = slice(p.local, p.local + cnt * n)
            k = key[rows].unflatten(0, (cnt, n))[:, a - rel : c - rel]
            v = value[rows].unflatten(0, (cnt, n))[:, a - rel : c - rel]
            return k, v

        out = _group_attention(q, kv, pattern, seg.shape, rel, scale)  # [G, n, b, np, hn]
        outs.append(out.flatten(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # [s_loc, b, np, hn]


def _packed_cross_attention(
    query: Tensor, key: Tensor, value: Tensor, layout: SequenceLayout, scale: float
) -> Tensor:
    """Each sample's queries attend to its own condition tokens (``[Lc_total, b, ng, hn]``)."""
    outs = []
    valid = layout.context_valid
    for grp in layout.groups:
        p, cnt = grp.first, grp.count
        seg, n = layout.segments[p.segment], p.size
        q = query[p.local : p.local + cnt * n]  # [G*n, b, np, hn]
        lc = seg.cond_len
        if lc == 0:
            outs.append(torch.zeros_like(q))
            continue
        c0 = layout.cond_offsets[p.segment]
        g, b, np_, hn = cnt, q.shape[1], q.shape[2], q.shape[3]
        qq = q.unflatten(0, (g, n)).permute(0, 2, 3, 1, 4).reshape(g * b, np_, n, hn)
        k = key[c0 : c0 + g * lc].unflatten(0, (g, lc))  # [G, lc, b, ng, hn]
        v = value[c0 : c0 + g * lc].unflatten(0, (g, lc))
        kk = k.permute(0, 2, 3, 1, 4).reshape(g * b, k.shape[3], lc, hn)
        vv = v.permute(0, 2, 3, 1, 4).reshape(g * b, v.shape[3], lc, hn)
        mask = None
        if valid is not None:  # one mask per group and forward: flash-attn memoises on it
            mask = layout._memoised(
                f"cross_keep:{p.local}:{b}", partial(_group_keep, valid, c0, g, lc, b)
            )  # [G*b, 1, 1, lc], True = attend
        out = _sdpa(qq, kk, vv, mask, scale)  # [G*b, np, n, hn]
        outs.append(out.reshape(g, b, np_, n, hn).permute(0, 3, 1, 2, 4).flatten(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # [s_loc, b, np, hn]


def _group_keep(valid: Tensor, c0: int, g: int, lc: int, b: int) -> Tensor:
    keep = valid[c0 : c0 + g * lc].reshape(g, 1, 1, 1, lc).expand(g, b, 1, 1, lc)
    return keep.reshape(g * b, 1, 1, lc)  # [G*b, 1, 1, lc]


def _all_gather(x: Tensor, group, order: Tensor | None) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out if order is None else out.index_select(0, order)


def _reduce_scatter(x: Tensor, group, order: Tensor | None) -> Tensor:
    if order is not None:  # back from global to rank-gathered order
        x = torch.empty_like(x).index_copy_(0, order, x)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class _GatheredKVAttention(torch.autograd.Function):
    """``fn(q, all_gather(k), all_gather(v))`` keeping only the local K/V for backward.

    Backward re-gathers K/V, recomputes ``fn`` under autograd and reduce-scatters the K/V
    gradients (each rank's gradient for another rank's keys is a partial sum).
    """

    @staticmethod
    def forward(ctx, q, k, v, fn, group, order):
        ctx.fn, ctx.group, ctx.order = fn, group, order
        ctx.save_for_backward(q, k, v)
        return fn(q, _all_gather(k, group, order), _all_gather(v, group, order))

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        kg = _all_gather(k, ctx.group, ctx.order)
        vg = _all_gather(v, ctx.group, ctx.order)
        with torch.enable_grad():
            q_ = q.detach().requires_grad_(True)
            k_ = kg.detach().requires_grad_(True)
            v_ = vg.detach().requires_grad_(True)
            out = ctx.fn(q_, k_, v_)
            dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), grad)
        dk = _reduce_scatter(dk, ctx.group, ctx.order)
        dv = _reduce_scatter(dv, ctx.group, ctx.order)
        return dq, dk, dv, None, None, None


class SDPACoreAttention(MegatronModule):
    """Bidirectional multi-head attention on SDPA with layout patterns and CP (module docs).

    Spec parameters: ``pattern`` (``full`` | ``spatial`` | ``temporal``, self-attention only)
    and ``gated`` (tanh-gated output per head, Flag-DiT cross-attention). Masks follow
    megatron's convention (``True`` = masked out) and are inverted for SDPA.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        pattern: str = "full",
        gated: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(config=config)
        if pattern not in PATTERNS:
            raise ValueError(f"attention pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
        self.layer_number = layer_number
        self.attention_type = attention_type
        self.pattern = pattern
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: the SDPA core attention of the DiT is dropout-free "
                "(its context-parallel backward recomputes the forward)"
            )
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_size = config.context_parallel_size
        self.gate = None
        if gated:
            tp = config.tensor_model_parallel_size
            heads = config.num_attention_heads // tp
            self.gate = nn.Parameter(torch.zeros(heads, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.gate, True, 0, 1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """The gate split over TP ranks (see :func:`core_attention_sharded_state_dict`)."""
        return core_attention_sharded_state_dict(self, prefix, sharded_offsets)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        layout = packed_seq_params if isinstance(packed_seq_params, SequenceLayout) else None
        if packed_seq_params is not None and layout is None:
            raise NotImplementedError(
                "the SDPA core attention takes a SequenceLayout as packed_seq_params (THD "
                "PackedSeqParams belong to the TransformerEngine spec)"
            )
        sq, b, np_, hn = query.shape
        if self.attention_type == "cross":
            if layout is not None and layout.packed:
                out = _packed_cross_attention(query, key, value, layout, self.softmax_scale)
            else:
                out = self._dense(query, key, value, attention_mask, attention_bias)
        elif layout is None:
            out = self._self_without_layout(query, key, value, attention_mask, attention_bias)
        else:
            fn = partial(
                layout_attention, layout=layout, pattern=self.pattern, scale=self.softmax_scale
            )
            if self.cp_size > 1 and not layout.local_only(self.pattern):
                order = layout.kv_order
                out = _GatheredKVAttention.apply(
                    query, key, value, partial(fn, kv_global=True), self.cp_group, order
                )
            else:
                out = fn(query, key, value, kv_global=self.cp_size == 1)
        if self.gate is not None:
            out = out * torch.tanh(self.gate).to(out.dtype)[:, None]  # [sq, b, np, hn]
        return out.reshape(sq, b, np_ * hn)  # [sq, b, np*hn]

    def _self_without_layout(self, query, key, value, attention_mask, attention_bias) -> Tensor:
        """Plain full attention of one sequence (contiguous CP shards when CP is on)."""
        if self.cp_size > 1:
            if attention_mask is not None or attention_bias is not None:
                raise NotImplementedError("masked self-attention under context parallelism")
            fn = partial(self._dense, attention_mask=None, attention_bias=None)
            return _GatheredKVAttention.apply(query, key, value, fn, self.cp_group, None)
        return self._dense(query, key, value, attention_mask, attention_bias)

    def _dense(self, query, key, value, attention_mask=None, attention_bias=None) -> Tensor:
        """One SDPA call over the whole ``[s, b, ...]`` tensors -> ``[sq, b, np, hn]``."""
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        mask = None
        if attention_mask is not None:
            mask = attend_mask(attention_mask)  # [b|1, 1|np, sq|1, sk], True = attend
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = _sdpa(q, k, v, mask, self.softmax_scale)  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3)  # [sq, b, np, hn]
