"""Embeddings, (un)patchify, output layer and size registry against independent references
(diffusers' own functions where they exist, explicit loops otherwise)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.embeddings import get_2d_sincos_pos_embed as hf_2d_sincos
from diffusers.models.embeddings import get_3d_sincos_pos_embed as hf_3d_sincos

from lumos_mcore.models.common import (
    MODEL_SIZES,
    ConditionEmbedder,
    DiTSize,
    FinalLayer,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    get_3d_sincos_pos_embed,
    get_model_size,
    modulate,
    patchify,
    timestep_embedding,
    unpatchify,
)


# ---------------------------------------------------------------------------------------------
# sin-cos tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grid_hw", "base_size", "interp"),
    [
        ((16, 16), 16, 1.0),
        ((8, 8), 16, 2.0),
        ((3, 5), 4, 1.0),
        ((6, 2), 3, 0.5),
        ((16, 12), 8, 1.0),
    ],
)
def test_2d_sincos_matches_diffusers(grid_hw, base_size, interp):
    ours = get_2d_sincos_pos_embed(32, grid_hw, base_size, interp, dtype=torch.float64)
    ref = hf_2d_sincos(32, grid_hw, base_size=base_size, interpolation_scale=interp)
    assert ours.shape == (grid_hw[0] * grid_hw[1], 32)
    torch.testing.assert_close(ours, ref.to(torch.float64), rtol=0, atol=0)
    # default dtype is float32 with the same numbers
    torch.testing.assert_close(
        get_2d_sincos_pos_embed(32, grid_hw, base_size, interp), ref.float(), rtol=0, atol=0
    )


def test_2d_sincos_row_major_token_order():
    """Token n = i*w + j: first half of channels encodes column j, second half row i."""
    h, w, d = 3, 5, 8
    table = get_2d_sincos_pos_embed(d, (h, w), base_size=h, interpolation_scale=1.0)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for i in range(h):
        for j in range(w):
            row_pos = i / (h / h)
            col_pos = j / (w / h)
            expect = torch.cat(
                [
                    torch.sin(col_pos * omega),
                    torch.cos(col_pos * omega),
                    torch.sin(row_pos * omega),
                    torch.cos(row_pos * omega),
                ]
            ).float()
            torch.testing.assert_close(table[i * w + j], expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("thw", "interp", "t_interp"), [((3, 4, 5), 1.5, 2.0), ((2, 4, 4), 1.0, 1.0)]
)
def test_3d_sincos_matches_diffusers(thw, interp, t_interp):
    t, h, w = thw
    ours = get_3d_sincos_pos_embed(32, thw, None, interp, t_interp, dtype=torch.float64)
    # diffusers takes the spatial size as (width, height) and returns [T, H*W, D]
    ref = hf_3d_sincos(32, (w, h), t, interp, t_interp).reshape(t * h * w, 32)
    torch.testing.assert_close(ours, ref.to(torch.float64), rtol=0, atol=0)


def test_3d_sincos_with_base_size_is_2d_table_per_frame():
    t, h, w, d = 3, 4, 6, 48
    table = get_3d_sincos_pos_embed(d, (t, h, w), 8, 1.0, 1.0).reshape(t, h * w, d)
    spatial = get_2d_sincos_pos_embed(3 * d // 4, (h, w), 8, 1.0)
    for f in range(t):
        torch.testing.assert_close(table[f, :, d // 4 :], spatial, rtol=0, atol=0)
        # temporal channels constant over the frame's tokens, sin(0)=0 / cos(0)=1 at frame 0
        assert torch.equal(table[f, :, : d // 4], table[f, :1, : d // 4].expand(h * w, -1))
    assert torch.equal(table[0, 0, : d // 8], torch.zeros(d // 8))
    assert torch.equal(table[0, 0, d // 8 : d // 4], torch.ones(d // 8))


def test_sincos_rejects_bad_dims():
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(30, (4, 4), 4)
    with pytest.raises(ValueError, match="divisible by 16"):
        get_3d_sincos_pos_embed(40, (2, 4, 4), 4)


# ---------------------------------------------------------------------------------------------
# timestep / size embedding
# ---------------------------------------------------------------------------------------------
def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 17.25, 500.0, 999.0])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(timestep_embedding(t, 256), ref, rtol=0, atol=0)


def test_timestep_embedding_odd_dim_and_max_period():
    t = torch.tensor([3.0, 42.0])
    emb = timestep_embedding(t, 7, max_period=100)
    half = 3
    freqs = torch.exp(-math.log(100) * torch.arange(half) / half)
    expect = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb[:, :6], expect)
    assert torch.equal(emb[:, 6], torch.zeros(2))


def test_timestep_embedder_any_leading_shape():
    torch.manual_seed(0)
    emb = TimestepEmbedder(24)
    t = torch.rand(2, 3) * 1000
    out = emb(t)
    assert out.shape == (2, 3, 24)
    flat = emb.mlp(timestep_embedding(t.reshape(-1), 256)).reshape(2, 3, 24)
    torch.testing.assert_close(out, flat)
    torch.testing.assert_close(out[1, 2], emb(t[1, 2:3])[0])


def test_size_embedder_per_scalar_concat_and_repeat():
    torch.manual_seed(0)
    emb = SizeEmbedder(8)
    s = torch.tensor([[256.0, 512.0], [1024.0, 768.0]])
    out = emb(s, 2)
    assert out.shape == (2, 16)
    for b in range(2):
        for k in range(2):
            ref = emb.mlp(timestep_embedding(s[b, k : k + 1], 256))[0]
            torch.testing.assert_close(out[b, 8 * k : 8 * (k + 1)], ref)
    # a [B] aspect-ratio vector is [B, 1]; a batch-1 size is repeated to the batch
    torch.testing.assert_close(emb(torch.tensor([1.5, 0.5]), 2), emb(torch.tensor([[1.5], [0.5]])))
    torch.testing.assert_close(emb(s[:1], 3), emb(s[:1]).expand(3, -1))


# ---------------------------------------------------------------------------------------------
# patch embedding, (un)patchify, modulate, final layer
# ---------------------------------------------------------------------------------------------
def _unpatchify_loop(x, p, h, w, c):
    out = torch.empty(x.shape[0], c, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        out[:, ch, i * p + a, j * p + b] = x[:, i * w + j, (a * p + b) * c + ch]
    return out


def test_unpatchify_matches_loop_and_roundtrips():
    torch.manual_seed(0)
    p, h, w, c = 2, 3, 4, 5
    x = torch.randn(2, h * w, p * p * c)
    img = unpatchify(x, p, h, w, c)
    assert img.shape == (2, c, h * p, w * p)
    torch.testing.assert_close(img, _unpatchify_loop(x, p, h, w, c), rtol=0, atol=0)
    assert torch.equal(patchify(img, p), x)
    y = torch.randn(3, 4, 8, 12)
    assert torch.equal(unpatchify(patchify(y, 4), 4, 2, 3, 4), y)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 4, 5, 4), 2)


def test_patch_embed_is_linear_on_patchified_input():
    """The strided conv equals a Linear applied to each (p, q, c)-ordered patch vector."""
    torch.manual_seed(0)
    pe = PatchEmbed(2, 3, 16)
    pe.initialize_weights()
    x = torch.randn(2, 3, 6, 8)
    tokens = pe(x)
    assert tokens.shape == (2, 12, 16)
    w_lin = pe.proj.weight.permute(0, 2, 3, 1).reshape(16, -1)  # [D, p*p*C] in (p, q, c) order
    ref = patchify(x, 2) @ w_lin.T + pe.proj.bias
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)
    # xavier on the flattened [D, C*p*p] weight: bound sqrt(6 / (D + C*p*p))
    bound = math.sqrt(6 / (16 + 12))
    assert pe.proj.weight.abs().max() <= bound and torch.equal(pe.proj.bias, torch.zeros(16))


def test_modulate_and_final_layer():
    torch.manual_seed(0)
    layer = FinalLayer(hidden_size=8, patch_size=2, out_channels=3)
    x, t = torch.randn(2, 5, 8), torch.randn(2, 8)
    assert torch.equal(layer(x, t), torch.zeros(2, 5, 12))  # zero-initialised projection
    torch.nn.init.normal_(layer.linear.weight)
    torch.nn.init.normal_(layer.linear.bias)
    out = layer(x, t)
    for b in range(2):
        shift = layer.scale_shift_table[0] + t[b]
        scale = layer.scale_shift_table[1] + t[b]
        xn = (x[b] - x[b].mean(-1, keepdim=True)) / torch.sqrt(
            x[b].var(-1, unbiased=False, keepdim=True) + 1e-6
        )
        ref = (xn * (1 + scale) + shift) @ layer.linear.weight.T + layer.linear.bias
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)
    s, c = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, s, c), x + x * c + s)


# ---------------------------------------------------------------------------------------------
# condition embedding with dropout
# ---------------------------------------------------------------------------------------------
def _cond_embedder(p: float) -> ConditionEmbedder:
    torch.manual_seed(0)
    emb = ConditionEmbedder(in_channels=6, hidden_size=8, num_tokens=3, dropout_prob=p)
    emb.initialize_weights()
    return emb


def test_condition_embedder_projection_and_forced_drop():
    emb = _cond_embedder(0.1)
    cond = torch.randn(4, 3, 6)
    out = emb(cond, train=False)
    fc1, fc2 = emb.y_proj.fc1, emb.y_proj.fc2
    ref = torch.nn.functional.gelu(cond @ fc1.weight.T + fc1.bias, approximate="tanh")
    ref = ref @ fc2.weight.T + fc2.bias
    torch.testing.assert_close(out, ref)
    drop = torch.tensor([True, False, False, True])
    forced = emb(cond, train=False, force_drop_ids=drop)
    null = emb.y_proj(emb.y_embedding)
    for b in range(4):
        torch.testing.assert_close(forced[b], null if drop[b] else ref[b])
    # 0/1 integer ids behave like booleans
    torch.testing.assert_close(emb(cond, False, force_drop_ids=drop.long()), forced)


def test_condition_embedder_training_dropout():
    cond = torch.randn(4000, 3, 6)
    emb = _cond_embedder(0.25)
    null = emb.y_proj(emb.y_embedding)
    out = emb(cond, train=True, generator=torch.Generator().manual_seed(7))
    dropped = (out - null).abs().amax(dim=(1, 2)) < 1e-6
    expect = torch.rand(4000, generator=torch.Generator().manual_seed(7)) < 0.25
    assert torch.equal(dropped, expect)
    assert 0.2 < dropped.float().mean().item() < 0.3
    # no dropout at eval, or with probability 0
    assert torch.equal(emb(cond[:8], train=False), emb.y_proj(cond[:8]))
    emb0 = _cond_embedder(0.0)
    assert torch.equal(emb0(cond[:8], train=True), emb0.y_proj(cond[:8]))
    with pytest.raises(ValueError, match="null condition"):
        emb(torch.randn(2, 5, 6), train=False, force_drop_ids=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="dropout_prob"):
        ConditionEmbedder(6, 8, 3, dropout_prob=1.5)


# ---------------------------------------------------------------------------------------------
# size registry
# ---------------------------------------------------------------------------------------------
def test_model_size_registry():
    assert get_model_size("Lumos-XL/2") == DiTSize(28, 1152, 16, 2, 4.0)
    assert get_model_size("Lumos-S/8") == DiTSize(12, 384, 6, 8)
    assert get_model_size("Lumos-L/4").head_dim == 64
    assert get_model_size("Lumos-Tiny/2") == DiTSize(4, 64, 4, 2)
    assert get_model_size("Lumos-Micro/2") == DiTSize(2, 32, 2, 2)
    assert len(MODEL_SIZES) == 14
    with pytest.raises(ValueError, match=r"model.name='Lumos-XXL/2': unknown size; choose one of"):
        get_model_size("Lumos-XXL/2")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTSize(2, 30, 4, 2)
