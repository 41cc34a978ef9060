"""The TE spec's packed cross-attention plumbing equals the local spec's.

TransformerEngine cannot run here, so its THD attention is replaced by a per-sample reference
driven by the same ``PackedSeqParams``; what is checked is the project's part: which queries
reach TE, the cu_seqlens they come with, and zeros for samples without condition tokens (the
pad segment), exactly as ``SDPACoreAttention`` computes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lumos_mcore.models.dit.attention import _packed_cross_attention
from lumos_mcore.models.dit.layout import SequenceLayout
from lumos_mcore.models.dit.te_attention import packed_cross_attention

NP, HN = 2, 4
SCALE = HN**-0.5


def thd_reference(q, k, v, psp):
    """TE's THD attention per sample: q [t, np, hn], k/v [tk, np, hn] -> [t, np*hn]."""
    cq, ck = psp.cu_seqlens_q.tolist(), psp.cu_seqlens_kv.tolist()
    assert cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
    assert min(b - a for a, b in zip(ck, ck[1:])) > 0  # no sample attends to nothing
    outs = []
    for i in range(len(cq) - 1):
        qs, ks, vs = (t.transpose(0, 1) for t in (q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]],
                                                    v[ck[i] : ck[i + 1]]))  # fmt: skip
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=SCALE).transpose(0, 1))
    return torch.cat(outs).flatten(1)


@pytest.mark.parametrize(
    "cond_lens, cp, pad_to",
    [
        ([2, 3], 1, 16),  # a trailing pad segment: the kept queries are a prefix
        ([2, 3], 2, 16),  # zig-zag CP shares (rank 0 and 1)
        ([2, 0, 3], 1, None),  # a sample without condition tokens in the middle: indexed rows
    ],
)
def test_te_packed_cross_attention_matches_the_local_spec(cond_lens, cp, pad_to):
    shapes = [(1, 2, 4), (1, 2, 2), (1, 2, 2)][: len(cond_lens)]
    g = torch.Generator().manual_seed(0)
    lc = sum(cond_lens)
    k = torch.randn(lc, 1, NP, HN, generator=g, dtype=torch.float64)
    v = torch.randn(lc, 1, NP, HN, generator=g, dtype=torch.float64)
    for rank in range(cp):
        layout = SequenceLayout.for_pack(
            shapes, cond_lens, cp_size=cp, cp_rank=rank, pad_to=pad_to,
            cp_mode="zigzag" if cp > 1 else "contiguous",
        ).bind()  # fmt: skip
        q = torch.randn(layout.local_tokens, 1, NP, HN, generator=g, dtype=torch.float64)
        q.requires_grad_()
        got = packed_cross_attention(q, k, v, layout, thd_reference)  # [t, 1, np*hn]
        want = _packed_cross_attention(q, k, v, layout, SCALE).flatten(2)  # [t, 1, np*hn]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got.abs().sum() > 0
        (dq,) = torch.autograd.grad(got.sum(), q)
        (dq_want,) = torch.autograd.grad(want.sum(), q)
        torch.testing.assert_close(dq, dq_want, rtol=1e-12, atol=1e-12)
