"""Self-attention of the DiT: megatron's ``SelfAttention`` with the 3-D RoPE on ``lumos_mcore.ops``.

megatron applies ``rotary_pos_emb`` itself, between the QKV projection (and the q/k norms) and
the core attention, through a module-level function of its attention module: unfused PyTorch in
the input dtype, or TransformerEngine's fused RoPE when ``apply_rope_fusion`` is set (interleaved
pairs need TE >= 2.3). :class:`DiTSelfAttention` rotates ``q`` and ``k`` at the same point --
right after :meth:`get_query_key_value_tensors` -- through :func:`lumos_mcore.ops.apply_rope3d`:
the Triton kernel of ``kernels/lumos_kernels/rope3d.py`` on CUDA where it was measured faster (forward and
backward, one pass over q / k reading megatron's strided views without a copy), the PyTorch
reference otherwise. The reference computes in float32 and rounds once; in float32 it gives the
same values as megatron's interleaved path (same products, same sums), so every parity test
against megatron's own attention holds.

``rotary_pos_emb`` keeps megatron's layout ``[s, 1, 1, hn]`` (each pair's angle repeated for its
two channels, ``rotary_interleaved=True``) so the model feeds a plain megatron ``SelfAttention``
the same tensor; it holds the angles of this rank's tokens (context-parallel shard, any order).
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

from lumos_mcore import ops

__all__ = ["DiTSelfAttention", "rope_angles"]


def rope_angles(rotary_pos_emb: Tensor) -> Tensor:
    """megatron's interleaved ``rotary_pos_emb`` ``[s, 1, 1, hn]`` -> pair angles ``[s, hn/2]``."""
    if rotary_pos_emb.dim() != 4 or rotary_pos_emb.shape[1] != 1 or rotary_pos_emb.shape[2] != 1:
        raise ValueError(
            f"rotary_pos_emb: shape {tuple(rotary_pos_emb.shape)} must be [s, 1, 1, hn] "
            "(one angle list for every sample of the micro-batch)"
        )
    return rotary_pos_emb[:, 0, 0, ::2].float().contiguous()  # [s, hn/2]


class DiTSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` whose RoPE runs on ``ops.apply_rope3d`` (module docs)."""

    _rope: Tensor | None = None  # pair angles [s, hn/2] of the forward in progress

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        *args,
        rotary_pos_emb: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(rotary_pos_emb, tuple):
            raise ValueError("DiTSelfAttention takes one rotary_pos_emb for queries and keys")
        if rotary_pos_emb is None or self.config.flash_decode:
            return super().forward(
                hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs
            )
        self._rope = rope_angles(rotary_pos_emb)  # [s, hn/2]
        try:
            # megatron sees no RoPE; get_query_key_value_tensors rotates q and k instead.
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, hidden_states: Tensor, *args, **kwargs):
        """megatron's q/k/v ``[s, b, n, hn]`` (after the q/k norms), q and k rotated."""
        out = super().get_query_key_value_tensors(hidden_states, *args, **kwargs)
        freqs = self._rope
        if freqs is None:
            return out
        if not isinstance(out, tuple) or len(out) < 3 or not isinstance(out[1], Tensor):
            raise RuntimeError(
                "DiTSelfAttention needs split q/k/v; turn off config.fused_single_qkv_rope"
            )
        query, key = out[0], out[1]
        if query.shape[0] != freqs.shape[0]:
            raise ValueError(
                f"rotary_pos_emb holds {freqs.shape[0]} tokens; the attention sees "
                f"{query.shape[0]} (pass the angles of this rank's tokens)"
            )
        query = ops.apply_rope3d(query, freqs)  # [s, b, np, hn]
        key = ops.apply_rope3d(key, freqs)  # [s, b, ng, hn]
        return (query, key, *out[2:])
