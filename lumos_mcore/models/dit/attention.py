"""Core attention for the megatron "local" DiT spec: PyTorch SDPA, bidirectional, CP-aware.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in Python and
refuses context parallelism (only TransformerEngine implements it). Diffusion attention is
bidirectional, so we can use ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory
efficient kernels on GPU, a fused kernel on CPU) and implement context parallelism ourselves by
all-gathering keys and values over the CP group: every rank keeps its own query shard, attends to
the whole sequence, and the backward of the all-gather reduce-scatters the K/V gradients.

Layout in and out follows megatron's core-attention contract:
query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> output ``[sq, b, np * hn]``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SDPACoreAttention(MegatronModule):
    """Bidirectional multi-head attention on SDPA with all-gather context parallelism.

    Masks follow megatron's convention (``True`` = masked out) and are inverted for SDPA. The
    cross-attention keys (condition tokens) are replicated on every CP rank, so only
    self-attention gathers over CP.
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
        **kwargs,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attention_type = attention_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_size = config.context_parallel_size

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
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences need the packed-sequence attention path; pass a block mask"
            )
        if self.cp_size > 1 and self.attention_type == "self":
            # Every CP rank holds an equal sequence shard: gather K/V along the sequence dim.
            key = gather_from_sequence_parallel_region(
                key, True, group=self.cp_group
            )  # [sk*cp, b, ng, hn]
            value = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        sq, b, np_, hn = query.shape
        ng = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        if ng != np_:  # grouped-query attention: share each K/V head across its query group
            k = k.repeat_interleave(np_ // ng, dim=1)  # [b, np, sk, hn]
            v = v.repeat_interleave(np_ // ng, dim=1)
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # [b|1, 1|np, sq|1, sk], True = attend
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, np*hn]
