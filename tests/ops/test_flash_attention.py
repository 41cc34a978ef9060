"""FlashAttnCoreAttention's layout plumbing (dense, key padding -> varlen, THD packs, GQA), the
backend choice (head-dim probe, fallback order, LUMOS_FLASH_ATTN), batch chunking, cu_seqlens
checks and the deterministic flag.

flash-attn needs CUDA, so here the module drives a stand-in backend with flash-attn's calling
convention (``[b, s, h, d]`` dense, ``[total, h, d]`` + ``cu_seqlens`` varlen, FA3-style tuple
returns) computed per sequence in float64; results must equal the SDPA core attention of the
local spec (``SDPACoreAttention``) and a per-sample reference. The backend choice runs with the
GPU's compute capability and the imports replaced by stand-ins. The real kernels are checked
against SDPA in tests/gpu/test_flash_attn.py.
"""

from __future__ import annotations

import dataclasses
import logging
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
    """FlashAttnCoreAttention on ``backend``; it must ask for the backend of its head dim."""
    asked = []

    def choose(head_dim=None):
        asked.append(head_dim)
        return backend

    monkeypatch.setattr(fa, "flash_attn_backend", choose)
    module = fa.FlashAttnCoreAttention(config, layer_number=1, attention_type=attention_type)
    assert asked == [config.kv_channels]
    return module


def recording(backend=FAKE):
    """``backend`` noting every call as ``(kind, batch, flags)``; ``deterministic`` is taken off
    before the stand-in runs (the stand-ins, like older flash-attn builds, lack the keyword)."""
    calls = []

    def func(q, k, v, **kw):
        calls.append(("dense", q.shape[0], {n: kw.pop(n) for n in list(kw) if n not in SIG}))
        return backend.func(q, k, v, **kw)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(("varlen", cu_q.numel() - 1, {n: kw.pop(n) for n in list(kw) if n not in SIG}))
        return backend.varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    return dataclasses.replace(
        backend, name=f"recording {backend.name}", func=func, varlen=varlen
    ), calls


SIG = ("softmax_scale", "causal")  # the keywords every call passes


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


# --- backend choice -------------------------------------------------------------------------


def _only_head_dims(dims, func):
    """``func`` that refuses other head dims, as older FA3 builds do."""

    def limited(q, *args, **kw):
        if q.shape[-1] not in dims:
            raise RuntimeError("Only support head size 64, 128, and 256")
        return func(q, *args, **kw)

    return limited


def _stand_in(name, dims=None):
    func, varlen = fake_func, fake_varlen
    if dims is not None:
        func, varlen = _only_head_dims(dims, func), _only_head_dims(dims, varlen)
    return fa.FlashBackend(name, func, varlen, device_type="cpu", dtypes=(torch.bfloat16,))


FA3_OLD = _stand_in("flash-attn 3 stand-in", dims=(64, 128, 256))
FA2 = _stand_in("flash-attn 2 stand-in")


@pytest.fixture
def choice(monkeypatch):
    """A fresh backend choice on a stand-in Hopper GPU whose imports yield ``loads[name]``
    (a backend, or an exception to raise); ``loaded`` lists the imports tried."""
    state = SimpleNamespace(loads={"fa3": FA3_OLD, "fa2": FA2}, loaded=[], cap=(9, 0))

    def load(name):
        state.loaded.append(name)
        got = state.loads[name]
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.delenv(fa.ENV, raising=False)
    monkeypatch.setattr(fa, "_capability", lambda: state.cap)
    monkeypatch.setattr(fa, "_load", load)
    fa.flash_attn_backend.cache_clear()
    yield state
    fa.flash_attn_backend.cache_clear()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_probe_falls_back_in_order_and_warns(choice, caplog):
    """Head dim 72 (Lumos-XL) on an FA3 build with only 64 / 128 / 256: FA2 serves it, with a
    warning naming FA3; head dim 64 stays on FA3; each head dim is chosen once."""
    caplog.set_level(logging.DEBUG, logger=fa.__name__)
    assert fa.flash_attn_backend(72) is FA2
    (warning,) = _warnings(caplog)
    assert "flash-attn 3 stand-in" in warning and "head dim 72" in warning
    assert "Only support head size" in warning
    assert fa.flash_attn_backend(64) is FA3_OLD
    assert choice.loaded == ["fa3", "fa2", "fa3"]
    assert fa.flash_attn_backend(72) is FA2 and len(choice.loaded) == 3  # cached

    fa.flash_attn_backend.cache_clear()
    choice.loads["fa2"] = _stand_in("flash-attn 2 stand-in", dims=(64,))
    caplog.clear()
    assert fa.flash_attn_backend(72) is None  # FA3 -> FA2 -> SDPA
    assert len(_warnings(caplog)) == 2


def test_head_dim_none_only_imports(choice):
    assert fa.flash_attn_backend() is FA3_OLD  # no probe: importable is enough
    assert choice.loaded == ["fa3"]


def test_candidates_follow_the_gpu(choice, caplog):
    caplog.set_level(logging.INFO, logger=fa.__name__)
    choice.cap = (8, 0)  # A100: FA3 is Hopper-only
    assert fa.flash_attn_backend(72) is FA2 and choice.loaded == ["fa2"]
    for cap, why in (((7, 0), "compute capability >= 8.0"), (None, "no CUDA device")):
        fa.flash_attn_backend.cache_clear()
        choice.cap, choice.loaded[:] = cap, []
        caplog.clear()
        assert fa.flash_attn_backend(72) is None and choice.loaded == []
        assert any(why in r.getMessage() for r in caplog.records)


def test_head_dims_without_kernels_take_sdpa(choice):
    for hn in (36, 264):  # not a multiple of 8; above 256
        assert fa.flash_attn_backend(hn) is None
    assert choice.loaded == []


def test_forced_backend_raises_instead_of_falling_back(choice, monkeypatch):
    monkeypatch.setenv(fa.ENV, "fa3")
    with pytest.raises(RuntimeError, match="LUMOS_FLASH_ATTN=fa3: flash-attn 3 stand-in cannot"):
        fa.flash_attn_backend(72)  # the probe fails at 72: no silent FA2
    assert fa.flash_attn_backend(64) is FA3_OLD
    choice.loads["fa3"] = ModuleNotFoundError("No module named 'x'", name="flash_attn_interface")
    fa.flash_attn_backend.cache_clear()
    with pytest.raises(RuntimeError, match=r"LUMOS_FLASH_ATTN=fa3: flash-attn 3 \(module"):
        fa.flash_attn_backend(64)
    monkeypatch.setenv(fa.ENV, "fa2")
    choice.loads["fa2"] = ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
    with pytest.raises(RuntimeError, match=r"LUMOS_FLASH_ATTN=fa2: flash-attn 2 \(pip package"):
        fa.flash_attn_backend(72)
    choice.cap = (7, 5)
    fa.flash_attn_backend.cache_clear()
    with pytest.raises(RuntimeError, match="LUMOS_FLASH_ATTN=fa2: flash-attn needs compute"):
        fa.flash_attn_backend(72)


def test_env_sdpa_turns_flash_attn_off(choice, monkeypatch):
    monkeypatch.setenv(fa.ENV, "sdpa")
    assert fa.flash_attn_backend(72) is None and fa.flash_attn_backend() is None
    assert choice.loaded == []


def test_import_failures_absent_is_quiet_broken_warns(monkeypatch, caplog):
    """The real imports: a package that is not installed is logged at DEBUG, one that is
    installed and fails to import at WARNING; FA3's top-level copy is imported only when TE's
    path is absent."""
    tried = []
    errors = {}
    top_level_fa3 = SimpleNamespace(flash_attn_func=fake_func, flash_attn_varlen_func=fake_varlen)

    def import_module(name):
        tried.append(name)
        if name in errors:
            raise errors[name]
        if name == "flash_attn_interface":
            return top_level_fa3
        root = name.split(".")[0]
        raise ModuleNotFoundError(f"No module named {root!r}", name=root)

    monkeypatch.delenv(fa.ENV, raising=False)
    monkeypatch.setattr(fa, "importlib", SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(fa, "_capability", lambda: (9, 0))
    caplog.set_level(logging.DEBUG, logger=fa.__name__)
    fa.flash_attn_backend.cache_clear()
    try:
        backend = fa.flash_attn_backend()  # TE's FA3 path absent -> the top-level copy
        assert backend.name == "flash-attn 3" and backend.func is fake_func
        assert tried == ["flash_attn_3.flash_attn_interface", "flash_attn_interface"]

        errors["flash_attn_3.flash_attn_interface"] = ImportError("undefined symbol: fa3_fwd")
        errors["flash_attn_interface"] = ModuleNotFoundError("no", name="flash_attn_interface")
        fa.flash_attn_backend.cache_clear()
        tried.clear()
        assert fa.flash_attn_backend() is None
        assert "flash_attn_interface" not in tried  # a broken TE-path FA3 is not doubled
        (warning,) = _warnings(caplog)  # FA3 broken; FA2 merely absent
        assert "flash-attn 3" in warning and "undefined symbol" in warning
        assert any("flash-attn 2" in r.getMessage() for r in caplog.records)  # at DEBUG

        errors["flash_attn"] = ImportError("flash_attn_2_cuda: undefined symbol")
        fa.flash_attn_backend.cache_clear()
        caplog.clear()
        assert fa.flash_attn_backend() is None
        assert any("flash-attn 2" in w and "undefined symbol" in w for w in _warnings(caplog))
    finally:
        fa.flash_attn_backend.cache_clear()


def test_backend_accepts_only_head_dims_with_kernels():
    for hn, ok in ((8, True), (72, True), (256, True), (12, False), (264, False)):
        t = torch.zeros(1, 2, 1, hn, dtype=torch.float64)
        assert FAKE.accepts(t, t, t) is ok


def test_cpu_inputs_never_ask_for_a_backend(monkeypatch):
    def refuse(head_dim=None):
        raise AssertionError("CPU inputs need no flash-attn backend")

    monkeypatch.setattr(fa, "flash_attn_backend", refuse)
    q = torch.randn(2, NP, 3, HN, dtype=torch.float64)
    k = torch.randn(2, NG, 3, HN, dtype=torch.float64)
    out = fa.attention(q, k, k)
    torch.testing.assert_close(out, fa._sdpa(q, k, k, None, HN**-0.5))
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    fa.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1), cu, cu)


# --- batch chunking -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["dense", "key-padding", "shared-key-padding", "sdpa"])
def test_large_batches_run_in_chunks(monkeypatch, path):
    """Batches above MAX_BATCH (CUDA's grid limit) are split; the result and its gradients
    equal one call, and no kernel sees more than MAX_BATCH rows."""
    g = torch.Generator().manual_seed(5)
    b, lq, lk = 5, 3, 6
    q = torch.randn(b, NP, lq, HN, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, NG, lk, HN, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, NG, lk, HN, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if path in ("key-padding", "shared-key-padding"):
        mask = torch.rand(b if path == "key-padding" else 1, 1, 1, lk, generator=g) > 0.4
        mask[..., 0] = True
    elif path == "sdpa":  # a general mask: SDPA, chunked with the batch
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        mask[..., 0] = True
    backend, calls = recording()
    seen = []

    def sdpa(q, k, v, mask, scale):
        seen.append(q.shape[0])
        return fa.F.scaled_dot_product_attention(
            q, k.repeat_interleave(NP // NG, 1), v.repeat_interleave(NP // NG, 1), mask, scale=scale
        )

    monkeypatch.setattr(fa, "_sdpa", sdpa)
    dout = torch.randn(b, NP, lq, HN, generator=g, dtype=torch.float64)
    results = []
    for limit in (10**6, 2):
        monkeypatch.setattr(fa, "MAX_BATCH", limit)
        calls.clear()
        seen.clear()
        out = fa.attention(q, k, v, mask, 0.3, None if path == "sdpa" else backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
        batches = seen if path == "sdpa" else [n for _, n, _ in calls]
        assert batches == ([b] if limit > b else [2, 2, 1])
        if path != "sdpa":
            assert not seen and {kind for kind, _, _ in calls} == {
                "dense" if mask is None else "varlen"
            }
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- cu_seqlens -----------------------------------------------------------------------------


def test_cu_seqlens_are_int32_contiguous_and_checked():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(10, NP, HN, generator=g, dtype=torch.float64)
    k = torch.randn(10, NG, HN, generator=g, dtype=torch.float64)
    cu64 = torch.tensor([0, 0, 3, 3, 8, 8, 10, 10])[::2]  # int64, not contiguous
    backend, calls = recording()
    out = fa.varlen_attention(q, k, k, cu64, cu64, backend=backend)
    torch.testing.assert_close(out[3:8], _attend(q[3:8], k[3:8], k[3:8], HN**-0.5))
    assert len(calls) == 1  # the stand-in asserts int32
    short = torch.tensor([0, 3, 9], dtype=torch.int32)
    full = torch.tensor([0, 3, 10], dtype=torch.int32)
    for be in (backend, None):  # flash and the SDPA fallback alike
        with pytest.raises(ValueError, match="cu_seqlens_q ends at 9 but the queries hold 10"):
            fa.varlen_attention(q, k, k, short, full, backend=be)
        with pytest.raises(ValueError, match="cu_seqlens_k ends at 9 but the keys hold 10"):
            fa.varlen_attention(q, k, k, full, short, backend=be)
        with pytest.raises(ValueError, match=r"\[samples \+ 1\]"):
            fa.varlen_attention(q, k, k, full, torch.tensor([0, 10], dtype=torch.int32), backend=be)


def test_packed_cross_attention_checks_the_condition_tokens(config, monkeypatch):
    """An image pack's cu_seqlens handed to cross-attention over 6 condition tokens: refused
    (flash-attn would read keys past the end); the pack's own condition cu_seqlens work."""
    g = torch.Generator().manual_seed(7)
    flash = build(config, monkeypatch, FAKE, "cross")
    q, _, _ = (t[:, 0] for t in qkv(g, 10, 10, 1, requires_grad=False))
    _, k, v = (t[:, 0] for t in qkv(g, 6, 6, 1, requires_grad=False))
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 10 but the keys hold 6"):
        flash(q, k, v, None, packed_seq_params=psp)
    cond = torch.tensor([0, 1, 5, 6], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cond)
    out = flash(q, k, v, None, packed_seq_params=psp)
    want = _attend(q[3:8], k[1:5], v[1:5], HN**-0.5).reshape(5, NP * HN)
    torch.testing.assert_close(out[3:8], want, rtol=1e-10, atol=1e-10)


def test_rejects_padded_kv_packs(config, monkeypatch):
    g = torch.Generator().manual_seed(8)
    flash = build(config, monkeypatch, FAKE)
    q, k, v = (t[:, 0] for t in qkv(g, 4, 4, 1, requires_grad=False))
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu.clone(),  # equal: fine
        cu_seqlens_kv_padded=torch.tensor([0, 3, 6], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="cu_seqlens_kv_padded differs"):
        flash(q, k, v, None, packed_seq_params=psp)


# --- deterministic --------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode_reaches_flash_attn_only_when_set(config, monkeypatch, deterministic):
    config.deterministic_mode = deterministic
    g = torch.Generator().manual_seed(9)
    backend, calls = recording()
    flash = build(config, monkeypatch, backend, "cross")
    q, k, v = qkv(g, 5, 6, 2, requires_grad=False)
    mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 3:] = True
    flash(q, k, v, None)  # dense
    flash(q, k, v, mask)  # key padding -> varlen
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    flash(q[:, 0], k[:5, 0], v[:5, 0], None, packed_seq_params=psp)  # THD pack
    want = {"deterministic": True} if deterministic else {}
    assert [(kind, flags) for kind, _, flags in calls] == [
        ("dense", want),
        ("varlen", want),
        ("varlen", want),
    ]


def test_torch_deterministic_algorithms_reach_flash_attn(config, monkeypatch):
    """``torch.use_deterministic_algorithms(True)`` asks for the deterministic backward too
    (SDPACoreAttention's routed calls, which carry no config flag, included)."""
    g = torch.Generator().manual_seed(10)
    backend, calls = recording()
    q, k, v = (t.permute(1, 2, 0, 3) for t in qkv(g, 5, 6, 2, requires_grad=False))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fa.attention(q, k, v, None, 0.3, backend)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    fa.attention(q, k, v, None, 0.3, backend)
    assert [flags for _, _, flags in calls] == [{"deterministic": True}, {}]


# --- host reads once per mask / cu_seqlens --------------------------------------------------


def _counting(monkeypatch, name):
    calls = []
    real = getattr(fa, name)

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(fa, name, wrapper)
    return calls


def test_key_padding_varlen_form_is_built_once_for_all_layers(config, monkeypatch):
    """Every cross-attention layer gets the same mask: its varlen form (a host read) is built
    by the first; an in-place change or a new mask builds it again, results stay exact."""
    g = torch.Generator().manual_seed(11)
    flash = build(config, monkeypatch, FAKE, "cross")
    sdpa = SDPACoreAttention(config, layer_number=1, attention_type="cross")
    builds = _counting(monkeypatch, "_key_padding")
    q, k, v = qkv(g, 5, 6, 3, requires_grad=False)
    mask = torch.zeros(3, 1, 1, 6, dtype=torch.bool)  # True = masked
    mask[0, ..., 4:] = True
    mask[1, ..., 1] = True
    for _ in range(3):  # three layers
        torch.testing.assert_close(flash(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-10, atol=0)
    assert len(builds) == 1
    mask[2, ..., 3:] = True  # written in place: rebuilt
    torch.testing.assert_close(flash(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-10, atol=0)
    other = mask.clone()
    other[0, ..., 4:] = False
    torch.testing.assert_close(flash(q, k, v, other), sdpa(q, k, v, other), rtol=1e-10, atol=0)
    assert len(builds) == 3


def test_cu_seqlens_are_checked_once_per_pack(config, monkeypatch):
    g = torch.Generator().manual_seed(12)
    flash = build(config, monkeypatch, FAKE)
    checks = _counting(monkeypatch, "_checked_bounds")
    q, k, v = (t[:, 0] for t in qkv(g, 10, 10, 1, requires_grad=False))
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    outs = [flash(q, k, v, None, packed_seq_params=psp) for _ in range(3)]
    assert len(checks) == 1
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)
    want = _attend(q[3:8], k[3:8], v[3:8], HN**-0.5).reshape(5, NP * HN)
    torch.testing.assert_close(outs[0][3:8], want, rtol=1e-10, atol=1e-10)
    bad = torch.tensor([0, 3, 9], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bad, cu_seqlens_kv=bad)
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(ValueError, match="ends at 9"):
            flash(q, k, v, None, packed_seq_params=psp)


def test_packed_cross_attention_masks_are_built_once_per_forward(monkeypatch):
    """SDPACoreAttention's packed cross-attention routed to flash-attn (as on CUDA): padded
    condition tokens become one varlen form per sample group and forward, not per layer."""
    from lumos_mcore.models.dit import attention as dit_attention
    from lumos_mcore.models.dit.layout import SequenceLayout

    monkeypatch.setattr(
        dit_attention, "_sdpa", lambda q, k, v, m, s: fa.attention(q, k, v, m, s, FAKE)
    )
    builds = _counting(monkeypatch, "_key_padding")
    g = torch.Generator().manual_seed(13)
    cond_lens = [3, 4]
    lc = sum(cond_lens)
    valid = torch.tensor([True, True, False, True, False, True, True])  # padding inside samples
    layout = SequenceLayout.for_pack([(1, 2, 2), (1, 2, 3)], cond_lens).bind(context_valid=valid)
    q = torch.randn(layout.local_tokens, 1, NP, HN, generator=g, dtype=torch.float64)
    k = torch.randn(lc, 1, NP, HN, generator=g, dtype=torch.float64)
    v = torch.randn(lc, 1, NP, HN, generator=g, dtype=torch.float64)
    outs = [dit_attention._packed_cross_attention(q, k, v, layout, HN**-0.5) for _ in range(3)]
    assert len(builds) == len(layout.groups)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    starts = [0, 4]
    for (c0, n), t0 in zip(((0, 3), (3, 4)), starts):
        keep = valid[c0 : c0 + n]
        rows = slice(t0, t0 + (4 if t0 == 0 else 6))
        want = _attend(q[rows, 0], k[c0 : c0 + n][keep, 0], v[c0 : c0 + n][keep, 0], HN**-0.5)
        torch.testing.assert_close(outs[0][rows, 0], want, rtol=1e-10, atol=1e-10)
    fresh = layout.bind(context_valid=valid)  # the next forward builds its own
    dit_attention._packed_cross_attention(q, k, v, fresh, HN**-0.5)
    assert len(builds) == 2 * len(layout.groups)


def test_masked_cross_attention_runs_under_inference_mode(config):
    """Masks made under torch.inference_mode have no version counter: they are not memoised,
    and the attention gives what it gives under no_grad."""
    g = torch.Generator().manual_seed(14)
    sdpa = SDPACoreAttention(config, layer_number=1, attention_type="cross")
    q, k, v = qkv(g, 5, 6, 2, requires_grad=False)
    with torch.no_grad():
        mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
        mask[0, ..., 3:] = True
        want = sdpa(q, k, v, mask)
    with torch.inference_mode():
        mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
        mask[0, ..., 3:] = True
        got = sdpa(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
