"""flash-attn on CUDA (head dim 72, bf16): dense, key padding, packed varlen, batches above the
grid limit, and in a DiT block, forward and backward.

The functional references are PyTorch attention in float32 on the same bf16 inputs with explicit
masks (block-diagonal for the packs), so agreement is to bf16 rounding. The DiT block reference
is the same block with every attention on SDPA (``LUMOS_FLASH_ATTN=sdpa``: on CUDA the SDPA core
attention also routes through ``flash_attention.attention``, so without it the block would be
compared with itself). The flash backend is wrapped to count its calls, proving the flash path
ran.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.helpers import rel_err, requires_any_package, requires_cuda

# Either backend will do (lumos_mcore.ops.flash_attention prefers FA3 on Hopper).
pytestmark = [
    requires_cuda,
    requires_any_package(
        ("flash_attn", "flash-attn"),
        ("flash_attn_3.flash_attn_interface", "flash-attn 3"),
        ("flash_attn_interface", "flash-attn 3"),
    ),
]

NP, NG, HN = 16, 16, 72
DEVICE = "cuda"


def _rand(*shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).bfloat16().requires_grad_()


def _sdpa32(q, k, v, mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=HN**-0.5
    )


def _counting(backend):
    """``backend`` with its calls counted: ``(backend, {"dense": n, "varlen": n})``."""
    calls = {"dense": 0, "varlen": 0}

    def func(*args, **kwargs):
        calls["dense"] += 1
        return backend.func(*args, **kwargs)

    def varlen(*args, **kwargs):
        calls["varlen"] += 1
        return backend.varlen(*args, **kwargs)

    return dataclasses.replace(backend, func=func, varlen=varlen), calls


@pytest.fixture
def flash():
    """The backend chosen for head dim 72 (probe included), counting its calls."""
    from lumos_mcore.ops import flash_attention as fa

    fa.flash_attn_backend.cache_clear()
    backend = fa.flash_attn_backend(HN)
    if backend is None:
        pytest.skip(
            f"needs a flash-attn build that runs head dim {HN} (the choice is logged by "
            "lumos_mcore.ops.flash_attention)"
        )
    return _counting(backend)


def _grads_close(got, want, tol=3e-2):
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < tol, f"gradient {i}"


def _close_to_reference(out, ref, inputs, tol=1e-2, grad_tol=2e-2):
    """``out`` within ``tol`` of the float32 ``ref``, and the gradients of ``inputs`` too."""
    assert rel_err(out, ref) < tol
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout.float())
    _grads_close(got, want, grad_tol)


def test_backend_found_and_dense_gqa(flash):
    from lumos_mcore.ops.flash_attention import attention

    backend, calls = flash
    q, k, v = (
        _rand(2, NP, 300, HN, seed=0),
        _rand(2, 4, 300, HN, seed=1),
        _rand(2, 4, 300, HN, seed=2),
    )
    out = attention(q, k, v, None, HN**-0.5, backend)
    assert calls == {"dense": 1, "varlen": 0}
    ref = _sdpa32(q, k, v)
    assert out.dtype == torch.bfloat16
    _close_to_reference(out, ref, (q, k, v))


def test_key_padding_goes_varlen(flash):
    from lumos_mcore.ops.flash_attention import attention

    backend, calls = flash
    q, k, v = (
        _rand(3, NP, 64, HN, seed=3),
        _rand(3, NG, 120, HN, seed=4),
        _rand(3, NG, 120, HN, seed=5),
    )
    keep = torch.zeros(3, 1, 1, 120, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :120] = True
    keep[1, ..., :17] = True  # T5 caption of 17 tokens
    keep[2, ..., :1] = True
    out = attention(q, k, v, keep, HN**-0.5, backend)
    assert calls == {"dense": 0, "varlen": 1}
    ref = _sdpa32(q, k, v, keep)
    _close_to_reference(out, ref, (q, k, v))


def test_varlen_pack_is_block_diagonal(flash):
    from lumos_mcore.ops.flash_attention import varlen_attention

    backend, calls = flash
    lens = [256, 1024, 64]
    cu = torch.tensor([0, 256, 1280, 1344], dtype=torch.int32, device=DEVICE)
    q, k, v = (_rand(1344, NP, HN, seed=s) for s in (6, 7, 8))
    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), HN**-0.5, backend)
    assert calls == {"dense": 0, "varlen": 1}
    seg = torch.repeat_interleave(torch.arange(3, device=DEVICE), torch.tensor(lens, device=DEVICE))
    mask = (seg[:, None] == seg[None, :])[None, None]
    ref = _sdpa32(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)
    ref = ref[0].transpose(0, 1)  # [t, np, hn]
    _close_to_reference(out, ref, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batches_above_the_grid_limit(flash, dtype):
    """65544 rows (the temporal pattern's frames-groups * h * w * b): flash-attn in bf16, SDPA
    in float32, both in chunks of MAX_BATCH; equal to plain float32 attention."""
    from lumos_mcore.ops import flash_attention as fa

    backend, calls = flash
    b, heads, lq = 65536 + 8, 2, 8
    q, k, v = (
        _rand(b, heads, lq, HN, seed=s).detach().to(dtype).requires_grad_() for s in (13, 14, 15)
    )
    out = fa.attention(q, k, v, None, HN**-0.5, backend)
    if dtype == torch.bfloat16:
        assert calls["dense"] == math.ceil(b / fa.MAX_BATCH)
    else:
        assert calls == {"dense": 0, "varlen": 0}  # float32 goes to SDPA
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) * HN**-0.5, dim=-1)
    ref = p @ v.float()  # [b, heads, lq, hn]
    _close_to_reference(out, ref, (q, k, v))


def _block_run(config, spec, inputs, dout):
    """A two-layer DiT block (same weights for every spec): output, named gradients."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tests.gpu.helpers import randomize_

    torch.manual_seed(0)
    blk = TransformerBlock(config, spec, post_layer_norm=False).to(DEVICE)
    randomize_(blk)
    out = blk(**inputs)
    names = ["hidden_states", "adaLN input", "context"]
    wrt = [inputs["hidden_states"], inputs["attention_mask"], inputs["context"]]
    for name, p in blk.named_parameters():
        if p.requires_grad:
            names.append(name)
            wrt.append(p)
    grads = torch.autograd.grad(out, wrt, dout)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("core", ["SDPACoreAttention", "FlashAttnCoreAttention"])
def test_dit_block_on_flash_attn_equals_sdpa(flash, monkeypatch, core):
    """A local-spec DiT block on flash-attn -- the SDPA core attention routed through
    ``flash_attention.attention``, or FlashAttnCoreAttention -- equals the block on SDPA alone,
    forward and backward: RoPE'd self-attention (dense flash) and cross-attention over 17
    condition tokens with one caption padded (key padding -> flash varlen)."""
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.common.rope import rope_freqs
    from lumos_mcore.models.dit.layer_spec import get_dit_layer_local_spec
    from lumos_mcore.models.dit.model import build_transformer_config
    from lumos_mcore.ops import flash_attention as fa
    from lumos_mcore.parallel.state import destroy_parallel
    from tests.gpu.helpers import single_gpu_parallel

    backend, calls = flash
    depth, rows, cols = 2, 16, 32
    single_gpu_parallel()
    try:
        mcfg = ModelConfig(
            name="Lumos-Tiny/2",
            depth=depth,
            hidden_size=NP * HN,
            num_heads=NP,
            precision="bf16",
            pos_embed="rope",
        )
        config = build_transformer_config(mcfg, bf16=True)
        spec = get_dit_layer_local_spec()
        flash_spec = spec
        if core == "FlashAttnCoreAttention":
            flash_spec = copy.deepcopy(spec)
            sub = flash_spec.submodules
            sub.self_attention.submodules.core_attention = fa.FlashAttnCoreAttention
            sub.cross_attention.submodules.core_attention = fa.FlashAttnCoreAttention
        t, h, w = torch.meshgrid(
            torch.arange(1), torch.arange(rows), torch.arange(cols), indexing="ij"
        )
        coords = torch.stack((t, h, w), dim=-1).reshape(-1, 3)  # [s, (frame, row, col)]
        context_mask = torch.zeros(2, 1, 1, 17, dtype=torch.bool, device=DEVICE)  # True = pad
        context_mask[1, ..., 9:] = True  # the second caption has 9 tokens
        inputs = dict(
            hidden_states=_rand(rows * cols, 2, NP * HN, seed=9),  # [s, b, h]
            attention_mask=_rand(1, 2, NP * HN, seed=10),  # adaLN conditioning [1, b, h]
            context=_rand(17, 2, NP * HN, seed=11),  # [Lc, b, h]
            context_mask=context_mask,
            rotary_pos_emb=rope_freqs(coords, HN)[:, None, None].to(DEVICE),  # [s, 1, 1, hn]
        )
        dout = _rand(rows * cols, 2, NP * HN, seed=12).detach()

        with monkeypatch.context() as mp:  # the reference: SDPA for every attention
            mp.setenv(fa.ENV, "sdpa")
            fa.flash_attn_backend.cache_clear()
            assert fa.flash_attn_backend(HN) is None
            ref, ref_grads = _block_run(config, spec, inputs, dout)
        fa.flash_attn_backend.cache_clear()
        assert calls == {"dense": 0, "varlen": 0}

        monkeypatch.setattr(fa, "flash_attn_backend", lambda head_dim=None: backend)
        out, grads = _block_run(config, flash_spec, inputs, dout)
        # per layer: self-attention dense, cross-attention (key padding) varlen
        assert calls == {"dense": depth, "varlen": depth}
    finally:
        destroy_parallel()
    assert rel_err(out, ref) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name in ("hidden_states", "adaLN input", "context"):
        assert rel_err(grads[name], ref_grads[name]) < 3e-2, name
    flat = [torch.cat([g[n].flatten().float() for n in g]) for g in (grads, ref_grads)]
    assert rel_err(*flat) < 3e-2  # all gradients together
    for name in grads:  # and each one, loosely: no path may be wrong
        assert rel_err(grads[name], ref_grads[name]) < 1e-1, name
