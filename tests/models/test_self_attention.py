"""DiTSelfAttention applies the 3-D RoPE through lumos_mcore.ops exactly as megatron's own
SelfAttention applies ``rotary_pos_emb``: same outputs, same gradients (float32)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

I2V = dict(
    name="Lumos-Tiny/2", latent_size=8, cond_tokens=3, cond_channels=48, variant="i2v",
    num_frames=3, pos_embed="rope",
)  # fmt: skip
CASES = {
    "full_3d_qk_norm": dict(I2V, video_attention="full_3d", qk_norm=True),
    "spatial_temporal": dict(I2V, video_attention="spatial_temporal"),
}


def _run(model, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.rand(2, 3, generator=g) * 999
    cond = torch.randn(2, 3, 48, generator=g)
    out = model(video, t, cond)  # [B, C, T, H, W]
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _compare(rank, world, kw):
    import copy

    from megatron.core.transformer.attention import SelfAttention

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.layer_spec import get_lumos_layer_spec
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.models.dit.self_attention import DiTSelfAttention
    from lumos_mcore.parallel.state import initialize_parallel

    cfg = ModelConfig(**kw)
    initialize_parallel(ParallelConfig(), num_attention_heads=cfg.num_heads_, num_layers=cfg.depth_)
    config = build_transformer_config(cfg)
    ours = LumosDiT(config, cfg)
    spec = copy.deepcopy(get_lumos_layer_spec(cfg))
    spec.submodules.self_attention.module = SelfAttention
    if spec.submodules.temporal_attention is not None:
        spec.submodules.temporal_attention.module = SelfAttention
    theirs = LumosDiT(config, cfg, spec=spec)
    layer = ours.decoder.layers[0]
    kinds = [type(layer.self_attention), type(theirs.decoder.layers[0].self_attention)]
    assert kinds == [DiTSelfAttention, SelfAttention]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.load_state_dict(ours.state_dict())
    return _run(ours, 2), _run(theirs, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_equals_megatron_rotary_pos_emb(case):
    (((out, grads), (ref, ref_grads)),) = run_distributed(_compare, 1, CASES[case])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert any("linear_qkv" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rope_angles_layout_and_errors():
    from lumos_mcore.models.common.rope import rope_freqs
    from lumos_mcore.models.dit.self_attention import rope_angles

    coords = torch.tensor([[0, 1, 2], [3, 4, 5]])
    emb = rope_freqs(coords, 12)  # [2, 12], each angle twice
    angles = rope_angles(emb[:, None, None])
    assert angles.shape == (2, 6) and angles.is_contiguous()
    assert torch.equal(angles.repeat_interleave(2, dim=1), emb)
    with pytest.raises(ValueError, match=r"must be \[s, 1, 1, hn\]"):
        rope_angles(emb[:, None, None].expand(2, 3, 1, 12))
