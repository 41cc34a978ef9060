"""TransformerEngine core attention for the DiT's token patterns (TE spec only; needs CUDA).

``TEVideoDotProductAttention`` is megatron's ``TEDotProductAttention`` (fused / flash attention,
FP8, TE context parallelism with ``cp_comm_type`` p2p | all_gather | a2a | a2a+p2p) that also
understands the :class:`SequenceLayout` the DiT passes as ``packed_seq_params``:

* ``full`` self-attention: an unpacked batch goes to TE as ``sbhd`` (bidirectional, so TE's CP
  needs no particular token order); a pack goes as ``thd`` with the samples' global
  ``cu_seqlens`` — TE then expects each sample split over the CP ranks in its zig-zag layout,
  which is why ``model.cp_layout: auto`` picks ``zigzag`` for this spec;
* ``spatial`` (per-frame) self-attention: every rank holds whole frames, so frames become the
  batch dimension (``[h*w, frames*b]``) and TE runs *without* CP;
* ``temporal`` self-attention: spatial positions become the batch dimension
  (``[frames_local, h*w*b]``) and TE's CP gathers the other ranks' frames;
* cross-attention: condition tokens are replicated on every CP rank, so TE runs without CP; a
  padded condition (T5 tokens) goes as TE's ``(query mask, key/value mask)`` pair with
  ``padding``, an unpadded one as ``no_mask``; a pack goes as ``thd`` with query / condition
  ``cu_seqlens`` per sample.

Requirements (checked): spatial/temporal need an unpacked batch whose CP shards hold whole
frames (``frames % (2 cp) == 0`` in the zig-zag layout); packs (THD) under TE context
parallelism cannot use ``cp_comm_type='a2a+p2p'`` (no THD support in TE), and older TE releases
support THD only with ``p2p``. Not checked: TE turns a padding mask into per-sample lengths, so
padded condition tokens must be right-padded (T5 captions are). A megatron THD
``PackedSeqParams`` (query ``[t, np, hn]``) passes straight to TE. This module is
imported only by the TE spec and is exercised on GPU machines; the CPU test-suite covers the
same layouts through the SDPA core attention.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor, nn

from lumos_mcore.config.parallel import check_te_packed_cp
from lumos_mcore.models.dit.attention import PATTERNS, core_attention_sharded_state_dict
from lumos_mcore.models.dit.layout import SequenceLayout

__all__ = ["TEVideoDotProductAttention", "packed_cross_attention"]


def packed_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SequenceLayout,
    attend: Callable[[Tensor, Tensor, Tensor, PackedSeqParams], Tensor],
) -> Tensor:
    """A pack's cross-attention in THD (``q [t, 1, np, hn]``, ``k/v [Lc_total, 1, ng, hn]``):
    ``attend`` (TE's attention) runs on the queries of samples with condition tokens; the pad
    segment's queries get zeros, as in the local spec -> ``[t, 1, np*hn]``."""
    psp, rows = layout.te_cross_packed_seq_params()
    qs = q.squeeze(1)  # [t, np, hn]
    width = qs.shape[1] * qs.shape[2]
    if psp is None:  # no sample with condition tokens in this rank's share
        return qs.new_zeros(q.shape[0], 1, width)
    prefix = isinstance(rows, int)
    kept = qs[:rows] if prefix else qs.index_select(0, rows)  # [rows, np, hn]
    out = attend(kept, k.squeeze(1), v.squeeze(1), psp)  # [rows, np*hn]
    if prefix and rows < qs.shape[0]:
        out = torch.cat([out, out.new_zeros(qs.shape[0] - rows, width)])
    elif not prefix:
        out = out.new_zeros(qs.shape[0], width).index_copy(0, rows, out)
    return out.reshape(q.shape[0], 1, -1)  # [t, 1, np*hn]


class TEVideoDotProductAttention(TEDotProductAttention):
    """``TEDotProductAttention`` with the DiT token patterns and tanh-gated heads (module docs)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = "p2p",
        pg_collection=None,
        pattern: str = "full",
        gated: bool = False,
        **kwargs,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"attention pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
        self.pattern = pattern
        self.dit_attention_type = attention_type
        self.dit_cp_comm_type = cp_comm_type or "p2p"
        self.uses_cp = config.context_parallel_size > 1
        if self.uses_cp and (pattern == "spatial" or attention_type == "cross"):
            # Frames (spatial) and condition tokens (cross) are local to every CP rank.
            config = copy.copy(config)
            config.context_parallel_size = 1
            self.uses_cp = False
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **kwargs,
        )
        self.gate = None
        if gated:
            heads = config.num_attention_heads // config.tensor_model_parallel_size
            self.gate = nn.Parameter(torch.zeros(heads, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.gate, True, 0, 1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """The gate split over TP ranks, plus TE's ``_extra_state`` (megatron's TE core
        attention saves only ``softmax_offset``; see :func:`core_attention_sharded_state_dict`)."""
        return core_attention_sharded_state_dict(self, prefix, sharded_offsets)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
        **kwargs,
    ) -> Tensor:
        layout = packed_seq_params if isinstance(packed_seq_params, SequenceLayout) else None
        # [sq, b, np, hn], or [t, np, hn] for a megatron THD PackedSeqParams (batch squeezed)
        lead, (np_, hn) = query.shape[:-2], query.shape[-2:]
        if self.dit_attention_type == "cross" and (layout is not None or packed_seq_params is None):
            out = self._cross(query, key, value, attention_mask, layout)
        elif layout is None:
            out = super().forward(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                **kwargs,
            )
        elif self.pattern == "full":
            out = self._full(query, key, value, layout)
        else:
            out = self._factorised(query, key, value, layout)
        if self.gate is not None:
            out = out.reshape(*lead, np_, hn) * torch.tanh(self.gate).to(out.dtype)[:, None]
        return out.reshape(*lead, np_ * hn)  # [sq, b, np*hn] (THD: [t, np*hn], as TE returns)

    def _full(self, q: Tensor, k: Tensor, v: Tensor, layout: SequenceLayout) -> Tensor:
        if not layout.packed:
            return super().forward(q, k, v, None, AttnMaskType.no_mask)  # [s, b, np*hn]
        if self.uses_cp:
            check_te_packed_cp(self.dit_cp_comm_type, layout.cp_mode)
        psp = layout.te_packed_seq_params()
        out = super().forward(
            q.squeeze(1),
            k.squeeze(1),
            v.squeeze(1),
            None,
            AttnMaskType.no_mask,
            packed_seq_params=psp,
        )  # [t, np*hn]
        return out.reshape(q.shape[0], 1, -1)

    def _factorised(self, q: Tensor, k: Tensor, v: Tensor, layout: SequenceLayout) -> Tensor:
        if layout.packed or not layout.local_only("spatial"):
            raise NotImplementedError(
                "spatial/temporal attention on TransformerEngine needs an unpacked batch whose "
                "context-parallel shards hold whole frames; use model.video_attention="
                "'full_3d' for packs or the local spec"
            )
        seg = layout.segments[0]
        hw = seg.frame_tokens
        s, b, np_, hn = q.shape
        f = s // hw
        if self.pattern == "spatial":  # frames into the batch: [hw, F*b, heads, hn]

            def fold(x: Tensor) -> Tensor:
                return (
                    x.reshape(f, hw, b, *x.shape[2:])
                    .transpose(0, 1)
                    .reshape(hw, f * b, *x.shape[2:])
                )

            out = super().forward(fold(q), fold(k), fold(v), None, AttnMaskType.no_mask)
            out = out.reshape(hw, f, b, -1).transpose(0, 1)  # [F, hw, b, np*hn]
            return out.reshape(s, b, -1)
        # temporal: positions into the batch, frames are the (CP-split) sequence: [F, hw*b, ...]
        out = super().forward(
            q.reshape(f, hw * b, np_, hn),
            k.reshape(f, hw * b, *k.shape[2:]),
            v.reshape(f, hw * b, *v.shape[2:]),
            None,
            AttnMaskType.no_mask,
        )  # [F, hw*b, np*hn]
        return out.reshape(s, b, -1)

    def _cross(self, q, k, v, attention_mask, layout: SequenceLayout | None) -> Tensor:
        if layout is None or not layout.packed:
            if attention_mask is None:  # every condition token is real
                return super().forward(q, k, v, None, AttnMaskType.no_mask)
            # TE's padding mask for cross-attention is a (query, key/value) pair of
            # [b, 1, 1, s] masks, True = masked out; no query is padding. TE derives per-sample
            # lengths from it (valid tokens first): right-padded captions only.
            q_mask = torch.zeros(q.shape[1], 1, 1, q.shape[0], dtype=torch.bool, device=q.device)
            kv_mask = attention_mask.bool().reshape(k.shape[1], 1, 1, k.shape[0])
            return super().forward(q, k, v, (q_mask, kv_mask), AttnMaskType.padding)

        def attend(qs: Tensor, ks: Tensor, vs: Tensor, psp: PackedSeqParams) -> Tensor:
            return super(TEVideoDotProductAttention, self).forward(
                qs, ks, vs, None, AttnMaskType.padding, packed_seq_params=psp
            )  # [rows, np*hn]

        return packed_cross_attention(q, k, v, layout, attend)  # [t, 1, np*hn]
