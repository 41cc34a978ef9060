"""Cross-attention of the DiT: megatron's ``CrossAttention`` plus an exact single-token path.

Lumos I2I, I2V and NVS condition on *one* token (the DINO CLS feature of the image / first frame /
input view). Softmax over one key is exactly 1, so every query of a sample receives that token's
value and the layer's output is ``linear_proj(V(cond))`` -- the same vector for every token of
the sample. The query projection, the attention core and the out-projection over ``L`` tokens
(together ``4·L·D²`` of the ≈ ``28·L·D²`` FLOPs of a block, ~14 % of a train step) compute a
result known in advance; :class:`DiTCrossAttention` projects one token per sample instead and
broadcasts it over the sequence.

The path is taken when the condition has one token and no padding mask (a masked single token
would make the attention undefined) and the batch is not a pack (a pack's samples each have
their own condition tokens; the general path handles them). Exactness details:

* the query projection's parameters still receive a gradient -- exactly zero, as in the general
  path where ``d softmax / d q = 0`` for one key -- so megatron's DDP (overlapped grad reduce
  waits for every parameter's gradient) sees every parameter used;
* tanh-gated cross-attention (Flag-DiT) applies the core attention's per-head gate to ``V``;
* tensor parallelism: ``V`` is column-parallel (heads split), the out-projection is row-parallel,
  so its local partial products are all-reduced over TP. Under sequence parallelism the result is
  used by every rank's *own* sequence shard, so the gradient flowing back into it is a partial
  sum: it is all-reduced over TP in backward (megatron's ``copy_to_tensor_model_parallel_region``),
  and the bias comes back separately so that megatron's SP gradient reduction of the bias (it
  carries ``sequence_parallel=True``) is not applied twice.

Layout: hidden states ``[s, b, h]`` in, output ``[1, b, h]`` (broadcast over ``s`` by the caller's
residual add) plus the out-projection bias ``[h]`` or None.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import CrossAttention
from torch import Tensor

from lumos_mcore.models.dit.layout import SequenceLayout

__all__ = ["DiTCrossAttention"]


class DiTCrossAttention(CrossAttention):
    """megatron ``CrossAttention`` with the single-condition-token shortcut (module docs)."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        key_value_states: Tensor | None = None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        if self._single_token(key_value_states, attention_mask, packed_seq_params):
            return self._single_token_forward(hidden_states, key_value_states)
        return super().forward(
            hidden_states,
            attention_mask,
            key_value_states=key_value_states,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )

    def _single_token(self, context: Tensor | None, mask: Tensor | None, packed_seq_params) -> bool:
        if context is None or context.shape[0] != 1 or mask is not None:
            return False
        if type(self.linear_proj.weight) is not torch.nn.Parameter:  # e.g. FP8 model weights
            return False
        if packed_seq_params is None:
            return True
        return isinstance(packed_seq_params, SequenceLayout) and not packed_seq_params.packed

    def _single_token_forward(self, hidden_states: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        b = context.shape[1]
        kv, _ = self.linear_kv(context)  # [1, b, np * 2 * hn]
        kv = kv.view(1, b, self.num_attention_heads_per_partition, -1)  # [1, b, np, 2*hn]
        value = kv[..., self.hidden_size_per_attention_head :]  # [1, b, np, hn]
        gate = getattr(self.core_attention, "gate", None)
        if gate is not None:
            value = value * torch.tanh(gate).to(value.dtype)[:, None]  # [1, b, np, hn]
        value = value.reshape(1, b, -1)  # [1, b, np*hn]

        proj = self.linear_proj
        out = torch.matmul(value, proj.weight.t())  # [1, b, h] partial over TP
        out = reduce_from_tensor_model_parallel_region(out, group=proj.tp_group)  # [1, b, h]
        if proj.sequence_parallel:
            # Every rank's own sequence shard uses ``out``: sum their gradients in backward.
            out = copy_to_tensor_model_parallel_region(out, group=proj.tp_group)
        out = out + self._zero_grad_anchor(out)  # [1, b, h]
        bias = getattr(proj, "bias", None)
        return out, bias if bias is not None and bias.numel() else None

    def _zero_grad_anchor(self, like: Tensor) -> Tensor:
        """0 · Σ(query params): gives them their exact zero gradient at O(D²) cost."""
        anchor = like.new_zeros(())
        for p in self.linear_q.parameters():
            if p.requires_grad:
                anchor = anchor + p.sum().to(like.dtype) * 0.0
        return anchor
