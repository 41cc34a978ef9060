"""FlashAttnCoreAttention's layout plumbing (dense, key padding -> varlen, THD packs, GQA).

flash-attn needs CUDA, so here the module drives a stand-in backend with flash-attn's calling
convention (``[b, s, h, d]`` dense, ``[total, h, d]`` + ``cu_seqlens`` varlen, FA3-style tuple
returns) computed per sequence in float64; results must equal the SDPA core attention of the
local spec (``SDPACoreAttention``) and a per-sample reference. The real kernels are checked
against SDPA in tests/gpu/test_flash_attn.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from lumos_mcore.models.dit.attention import SDPACoreAttention
from lumos_mcore.ops import flash_attention as fa

NP, NG, HN = 4, 2, 8


def _attend(q, k, v, scale):
    """One sequence: q [sq, h, d], k/v [sk, hk, d] -> [sq, h, d] (GQA by repetition)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).double(),
        k.transpose(0, 1).double(),
        v.transpose(0, 1).double(),
        scale=scale,
    )
    return out.transpose(0, 1).to(q.dtype)


def fake_func(q, k, v, softmax_scale=None, causal=False):
    assert not causal
    out = torch.stack([_attend(q[i], k[i], v[i], softmax_scale) for i in range(q.shape[0])])
    return out, None  # FA3 returns (out, lse)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and not causal
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    outs = [
        _attend(
            q[cu_q[i] : cu_q[i + 1]],
            k[cu_k[i] : cu_k[i + 1]],
            v[cu_k[i] : cu_k[i + 1]],
            softmax_scale,
        )
        for i in range(cu_q.numel() - 1)
    ]
    return torch.cat(outs)


FAKE = fa.FlashBackend(
    "stand-in",
    fake_func,
    fake_varlen,
    device_type="cpu",
    dtypes=(torch.float32, torch.float64),
)


@pytest.fixture
def config():
    return TransformerConfig(
        num_layers=1,
        hidden_size=NP * HN,
        num_attention_heads=NP,
        num_query_groups=NG,
        kv_channels=HN,
        attention_dropout=0.0,
    )


def build(config, monkeypatch, backend, attention_type="self"):
    monkeypatch.setattr(fa, "flash_attn_backend", lambda: backend)
    return fa.FlashAttnCoreAttention(config, layer_number=1, attention_type=attention_type)


def qkv(g, sq, sk, b, requires_grad=True):
    q = torch.randn(sq, b, NP, HN, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(sk, b, NG, HN, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    v = torch.randn(sk, b, NG, HN, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("backend", ["stand-in", "none"])
def test_dense_and_key_padding_match_sdpa_core_attention(config, monkeypatch, backend):
    g = torch.Generator().manual_seed(0)
    flash = build(config, monkeypatch, FAKE if backend == "stand-in" else None, "cross")
    sdpa = SDPACoreAttention(config, layer_number=1, attention_type="cross")
    q, k, v = qkv(g, 5, 6, 3)
    mask = torch.zeros(3, 1, 1, 6, dtype=torch.bool)  # True = masked (megatron convention)
    mask[0, ..., 4:] = True
    mask[2, ..., 1:] = True  # one valid key
    mask[1, ..., 0] = True  # padding not at the end
    for m in (None, mask):
        out = flash(q, k, v, m)
        want = sdpa(q, k, v, m)
        assert out.shape == (5, 3, NP * HN)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), dout)
        ref = torch.autograd.grad(want, (q, k, v), dout)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["stand-in", "none"])
def test_packed_thd_is_per_sample_attention(config, monkeypatch, backend):
    """Three samples of 3, 5 and 2 tokens in one pack never attend across samples."""
    g = torch.Generator().manual_seed(1)
    flash = build(config, monkeypatch, FAKE if backend == "stand-in" else None)
    lens = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    q, k, v = (t[:, 0] for t in qkv(g, 10, 10, 1, requires_grad=False))  # THD: [t, h, d]
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5
    )
    out = flash(q, k, v, None, packed_seq_params=psp)
    assert out.shape == (10, NP * HN)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        want = _attend(q[s], k[s], v[s], HN**-0.5).reshape(n, NP * HN)
        torch.testing.assert_close(out[s], want, rtol=1e-10, atol=1e-10)
        start += n


def test_unpacked_layout_is_dense_and_packs_are_refused(config, monkeypatch):
    """LumosDiT passes its SequenceLayout as packed_seq_params: unpacked ones mean plain
    attention over the batch, packed ones belong to SDPACoreAttention."""
    g = torch.Generator().manual_seed(4)
    flash = build(config, monkeypatch, FAKE)
    q, k, v = qkv(g, 6, 6, 2, requires_grad=False)
    dense = flash(q, k, v, None)
    torch.testing.assert_close(
        flash(q, k, v, None, packed_seq_params=SimpleNamespace(packed=False)), dense
    )
    with pytest.raises(NotImplementedError, match="SequenceLayout"):
        flash(q, k, v, None, packed_seq_params=SimpleNamespace(packed=True))


def test_rejects_padded_packs(config, monkeypatch):
    g = torch.Generator().manual_seed(2)
    flash = build(config, monkeypatch, FAKE)
    q, k, v = qkv(g, 4, 4, 2, requires_grad=False)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=torch.tensor([0, 3, 6], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="padded"):
        flash(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)


def test_functional_attention_flash_only_where_it_applies():
    """SDPA layout in/out; key-padding masks go to flash varlen, other masks to SDPA."""

    def refuse(*args, **kwargs):
        raise AssertionError("a general mask must not reach flash-attn")

    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, NP, 5, HN, generator=g, dtype=torch.float64)
    k = torch.randn(3, NG, 7, HN, generator=g, dtype=torch.float64)
    v = torch.randn(3, NG, 7, HN, generator=g, dtype=torch.float64)
    keep = torch.rand(3, 1, 1, 7, generator=g) > 0.4
    keep[..., 0] = True
    kr, vr = k.repeat_interleave(NP // NG, 1), v.repeat_interleave(NP // NG, 1)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(fa.attention(q, k, v, keep, 0.3, FAKE), want)
    general = torch.rand(3, 1, 5, 7, generator=g) > 0.3
    general[..., 0] = True
    strict = fa.FlashBackend("refuse", refuse, refuse, device_type="cpu", dtypes=(torch.float64,))
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=general, scale=0.3)
    torch.testing.assert_close(fa.attention(q, k, v, general, 0.3, strict), want)


def test_backend_env_validation(monkeypatch):
    monkeypatch.setenv(fa.ENV, "fa9")
    fa.flash_attn_backend.cache_clear()
    try:
        with pytest.raises(ValueError, match="LUMOS_FLASH_ATTN='fa9'"):
            fa.flash_attn_backend()
    finally:
        monkeypatch.delenv(fa.ENV)
        fa.flash_attn_backend.cache_clear()
