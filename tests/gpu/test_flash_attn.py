"""flash-attn on CUDA (head dim 72, bf16): dense, key padding, packed varlen, in a DiT block.

References are PyTorch SDPA on the same bf16 inputs with explicit masks (block-diagonal for the
packs), compared in float32; both use flash-style kernels, so agreement is to bf16 rounding.
"""

from __future__ import annotations

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


def _rand(*shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").bfloat16().requires_grad_()


def _sdpa32(q, k, v, mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=HN**-0.5
    )


def test_backend_found_and_dense_gqa():
    from lumos_mcore.ops.flash_attention import attention, flash_attn_backend

    assert flash_attn_backend() is not None
    q, k, v = (
        _rand(2, NP, 300, HN, seed=0),
        _rand(2, 4, 300, HN, seed=1),
        _rand(2, 4, 300, HN, seed=2),
    )
    out = attention(q, k, v, None, HN**-0.5)
    ref = _sdpa32(q, k, v)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2


def test_key_padding_goes_varlen():
    from lumos_mcore.ops.flash_attention import attention

    q, k, v = (
        _rand(3, NP, 64, HN, seed=3),
        _rand(3, NG, 120, HN, seed=4),
        _rand(3, NG, 120, HN, seed=5),
    )
    keep = torch.zeros(3, 1, 1, 120, dtype=torch.bool, device="cuda")
    keep[0, ..., :120] = True
    keep[1, ..., :17] = True  # T5 caption of 17 tokens
    keep[2, ..., :1] = True
    out = attention(q, k, v, keep, HN**-0.5)
    ref = _sdpa32(q, k, v, keep)
    assert rel_err(out, ref) < 1e-2


def test_varlen_pack_is_block_diagonal():
    from lumos_mcore.ops.flash_attention import varlen_attention

    lens = [256, 1024, 64]
    cu = torch.tensor([0, 256, 1280, 1344], dtype=torch.int32, device="cuda")
    q, k, v = (_rand(1344, NP, HN, seed=s) for s in (6, 7, 8))
    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), HN**-0.5)
    seg = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor(lens, device="cuda"))
    mask = (seg[:, None] == seg[None, :])[None, None]
    ref = _sdpa32(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)
    assert rel_err(out, ref[0].transpose(0, 1)) < 1e-2


def test_flash_core_attention_in_a_dit_block():
    """A local-spec DiT block stack with flash-attn core attention equals the SDPA one."""
    import copy

    from megatron.core.transformer.transformer_block import TransformerBlock

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.dit.layer_spec import get_dit_layer_local_spec
    from lumos_mcore.models.dit.model import build_transformer_config
    from lumos_mcore.ops.flash_attention import FlashAttnCoreAttention
    from lumos_mcore.parallel.state import destroy_parallel
    from tests.gpu.helpers import randomize_, single_gpu_parallel

    single_gpu_parallel()
    try:
        mcfg = ModelConfig(
            name="Lumos-Tiny/2", depth=2, hidden_size=NP * HN, num_heads=NP, precision="bf16"
        )
        config = build_transformer_config(mcfg, bf16=True)
        spec = get_dit_layer_local_spec()
        flash_spec = copy.deepcopy(spec)
        flash_spec.submodules.self_attention.submodules.core_attention = FlashAttnCoreAttention
        flash_spec.submodules.cross_attention.submodules.core_attention = FlashAttnCoreAttention
        blocks = []
        for s in (spec, flash_spec):
            torch.manual_seed(0)
            blk = TransformerBlock(config, s, post_layer_norm=False).cuda()
            randomize_(blk)
            blocks.append(blk)
        x = _rand(512, 2, NP * HN, seed=9)
        c = _rand(1, 2, NP * HN, seed=10)
        ctx = _rand(1, 2, NP * HN, seed=11)
        outs = [blk(hidden_states=x, attention_mask=c, context=ctx) for blk in blocks]
        assert rel_err(outs[1], outs[0]) < 2e-2
    finally:
        destroy_parallel()
