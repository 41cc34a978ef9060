"""LumosTransformer2DModel against an independent re-implementation of the Lumos / PixArt math
(explicit per-head loops over raw state-dict tensors; diffusers' own sin-cos and timestep
functions), plus save/load, initialisation, CFG dropout and resolution change."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.embeddings import get_2d_sincos_pos_embed as hf_2d_sincos

from lumos_mcore.hf import LumosTransformer2DModel

TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=48,
    depth=2,
    num_heads=4,
    cond_channels=12,
    cond_tokens=5,
    cond_dropout_prob=0.1,
)


# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------
def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * torch.sigmoid(x)


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _mlp(x, sd, name):
    return _lin(_gelu_tanh(_lin(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def _t_mlp(x, sd, name):
    return _lin(_silu(_lin(x, sd, f"{name}.mlp.0")), sd, f"{name}.mlp.2")


def _heads_attention(q, k, v, heads, key_mask=None):
    """q [B, N, D], k/v [B, L, D]; one head at a time, softmax(q k^T / sqrt(hd)) v."""
    d = q.shape[-1]
    hd = d // heads
    out = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = torch.einsum("bnd,bld->bnl", q[..., sl], k[..., sl]) / math.sqrt(hd)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        out[..., sl] = torch.einsum("bnl,bld->bnd", torch.softmax(scores, dim=-1), v[..., sl])
    return out


def reference_forward(sd, cfg, latents, t, cond, mask=None, resolution=None, aspect_ratio=None):
    sd = {k: v.detach().double() for k, v in sd.items()}
    latents, cond = latents.double(), cond.double()
    b, cin, hh, ww = latents.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    h, w = hh // p, ww // p
    out_ch = 2 * cin
    # patch embedding: one linear per patch on its (c, p, q)-flattened pixels
    wp = sd["x_embedder.proj.weight"].reshape(d, -1)
    tokens = []
    for i in range(h):
        for j in range(w):
            patch = latents[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(b, -1)
            tokens.append(patch @ wp.T + sd["x_embedder.proj.bias"])
    x = torch.stack(tokens, dim=1)
    base = cfg["sample_size"] // p
    x = x + hf_2d_sincos(d, (h, w), base_size=base, interpolation_scale=1.0).double()[None]

    temb = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    tt = _t_mlp(temb(t).double(), sd, "t_embedder")
    if resolution is not None:
        parts = [_t_mlp(temb(resolution[:, k]).double(), sd, "csize_embedder") for k in range(2)]
        parts.append(_t_mlp(temb(aspect_ratio[:, 0]).double(), sd, "ar_embedder"))
        tt = tt + torch.cat(parts, dim=1)
    single = "t_block.1.weight" in sd
    t0 = _lin(_silu(tt), sd, "t_block.1") if single else None

    y = _mlp(cond, sd, "y_embedder.y_proj")
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        if single:
            mod = sd[f"{pre}.scale_shift_table"][None] + t0.reshape(b, 6, d)
            chunks = [mod[:, k][:, None] for k in range(6)]
        else:
            mod = _lin(_silu(tt), sd, f"{pre}.adaLN_modulation.1")
            chunks = [mod[:, k * d : (k + 1) * d][:, None] for k in range(6)]
        sh1, sc1, g1, sh2, sc2, g2 = chunks
        hmod = _ln(x) * (1 + sc1) + sh1
        qkv = _lin(hmod, sd, f"{pre}.attn.qkv")
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        x = x + g1 * _lin(_heads_attention(q, k, v, heads), sd, f"{pre}.attn.proj")
        q = _lin(x, sd, f"{pre}.cross_attn.q_linear")
        kv = _lin(y, sd, f"{pre}.cross_attn.kv_linear")
        ca = _heads_attention(q, kv[..., :d], kv[..., d:], heads, mask)
        x = x + _lin(ca, sd, f"{pre}.cross_attn.proj")
        x = x + g2 * _mlp(_ln(x) * (1 + sc2) + sh2, sd, f"{pre}.mlp")

    sst = sd["final_layer.scale_shift_table"]
    shift, scale = sst[0] + tt[:, None], sst[1] + tt[:, None]
    o = _lin(_ln(x) * (1 + scale) + shift, sd, "final_layer.linear")  # [B, N, p*p*out]
    img = torch.empty(b, out_ch, hh, ww, dtype=o.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for q_ in range(p):
                    base_c = (a * p + q_) * out_ch
                    img[:, :, i * p + a, j * p + q_] = o[:, i * w + j, base_c : base_c + out_ch]
    return img.float()


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * std)


def _inputs(b=2, hh=8, ww=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, hh, ww, generator=g)
    t = torch.tensor([3.0, 741.0])[:b]
    cond = torch.randn(b, TINY["cond_tokens"], TINY["cond_channels"], generator=g)
    return latents, t, cond


# ---------------------------------------------------------------------------------------------
# numerical equality with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("adaln_type", "size_cond", "use_mask"),
    [
        ("zero", False, False),
        ("zero", False, True),
        ("single", True, True),
        ("single", False, False),
    ],
)
def test_matches_independent_reference(adaln_type, size_cond, use_mask):
    cfg = dict(TINY, adaln_type=adaln_type, use_size_conditioning=size_cond)
    model = LumosTransformer2DModel(**cfg).eval()
    _randomise(model)
    latents, t, cond = _inputs()
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if use_mask else None
    extra = {}
    res = ar = None
    if size_cond:
        res = torch.tensor([[512.0, 256.0], [256.0, 256.0]])
        ar = torch.tensor([[2.0], [1.0]])
        extra = {"resolution": res, "aspect_ratio": ar}
    with torch.no_grad():
        out = model(latents, t, cond, encoder_attention_mask=mask, added_cond_kwargs=extra).sample
    ref = reference_forward(model.state_dict(), cfg, latents, t, cond, mask, res, ar)
    assert out.shape == (2, 8, 8, 8)
    assert out.abs().mean() > 1e-2  # the comparison is not between two zero tensors
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if use_mask:  # masked condition tokens really are ignored
        cond2 = cond.clone()
        cond2[0, 2] += 5.0
        with torch.no_grad():
            out2 = model(latents, t, cond2, encoder_attention_mask=mask, added_cond_kwargs=extra)
        torch.testing.assert_close(out2.sample, out, rtol=0, atol=1e-6)


def test_other_resolution_recomputes_pos_embed():
    """A sample_size-8 model run on a 16x12 latent: (8, 6) token grid stretched to base 4."""
    model = LumosTransformer2DModel(**TINY).eval()
    _randomise(model, seed=3)
    latents, t, cond = _inputs(hh=16, ww=12)
    with torch.no_grad():
        out = model(latents, t, cond).sample
    assert out.shape == (2, 8, 16, 12)
    ref = reference_forward(model.state_dict(), TINY, latents, t, cond)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the cached table is the training-grid table and is not saved
    torch.testing.assert_close(
        model.pos_embed[0], hf_2d_sincos(48, (4, 4), base_size=4).float(), rtol=0, atol=0
    )
    assert "pos_embed" not in model.state_dict()


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------
def test_fresh_model_outputs_zero_and_blocks_start_as_identity():
    torch.manual_seed(0)
    model = LumosTransformer2DModel(**TINY).eval()
    latents, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(model(latents, t, cond).sample, torch.zeros(2, 8, 8, 8))
        # open the final projection only: adaLN-Zero gates and the zero cross-attention
        # out-projection make every block the identity, so the output is the final layer
        # applied to patch embedding + position embedding, independent of the condition
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        out = model(latents, t, cond).sample
        out_other_cond = model(latents, t, torch.randn_like(cond)).sample
        x = model.x_embedder(latents) + model.pos_embed
        direct = model.final_layer(x, model.t_embedder(t))
        p = 2
        direct = direct.reshape(2, 4, 4, p, p, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 8, 8)
    assert out.abs().mean() > 1e-3
    torch.testing.assert_close(out, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_other_cond, out, rtol=0, atol=0)
    for blk in model.blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(blk.cross_attn.proj.weight) == 0
    # DiT init statistics: xavier linears, normal(0.02) embedder MLPs
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (48 + 144)) + 1e-7
    assert 0.01 < model.t_embedder.mlp[0].weight.std() < 0.03
    assert 0.01 < model.y_embedder.y_proj.fc1.weight.std() < 0.03


# ---------------------------------------------------------------------------------------------
# condition dropout / CFG
# ---------------------------------------------------------------------------------------------
def test_force_drop_ids_uses_null_condition():
    model = LumosTransformer2DModel(**TINY).eval()
    _randomise(model, seed=5)
    latents, t, cond = _inputs()
    drop = torch.tensor([True, False])
    with torch.no_grad():
        dropped = model(latents, t, cond, force_drop_ids=drop).sample
        null_cond = cond.clone()
        null_cond[0] = model.y_embedder.y_embedding
        manual = model(latents, t, null_cond).sample
        plain = model(latents, t, cond).sample
    torch.testing.assert_close(dropped, manual, rtol=0, atol=0)
    torch.testing.assert_close(dropped[1], plain[1], rtol=0, atol=0)
    assert (dropped[0] - plain[0]).abs().max() > 1e-3
    # training with dropout probability 1 drops every sample; eval never drops
    always = LumosTransformer2DModel(**dict(TINY, cond_dropout_prob=1.0))
    always.load_state_dict(model.state_dict())
    with torch.no_grad():
        all_null = always.train()(latents, t, cond).sample
        forced = model(latents, t, cond, force_drop_ids=torch.tensor([True, True])).sample
        assert torch.equal(always.eval()(latents, t, cond).sample, plain)
    torch.testing.assert_close(all_null, forced, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# save / load, gradient checkpointing, validation
# ---------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    cfg = dict(TINY, adaln_type="single", use_size_conditioning=True)
    model = LumosTransformer2DModel(**cfg).eval()
    _randomise(model, seed=7)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LumosTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.adaln_type == "single" and loaded.config.use_size_conditioning
    latents, t, cond = _inputs()
    extra = {"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    with torch.no_grad():
        a = model(latents, t, cond, added_cond_kwargs=extra).sample
        b = loaded(latents, t, cond, added_cond_kwargs=extra).sample
    assert a.abs().mean() > 1e-2
    assert torch.equal(a, b)
    assert model.state_dict().keys() == loaded.state_dict().keys()


def test_gradient_checkpointing_same_gradients():
    model = LumosTransformer2DModel(**TINY).train()
    _randomise(model, seed=9)
    latents, t, cond = _inputs()
    drop = torch.tensor([False, False])  # deterministic: no random condition dropout

    def grads():
        model.zero_grad()
        model(latents, t, cond, force_drop_ids=drop).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_config_validation_and_defaults():
    model = LumosTransformer2DModel(**dict(TINY, learn_sigma=False, depth=1))
    assert model.out_channels == 4
    with pytest.raises(ValueError, match=r"config.hidden_size=50 is not divisible by num_heads"):
        LumosTransformer2DModel(**dict(TINY, hidden_size=50))
    with pytest.raises(ValueError, match=r"config.adaln_type='ada'"):
        LumosTransformer2DModel(**dict(TINY, adaln_type="ada"))
    with pytest.raises(ValueError, match=r"config.use_size_conditioning"):
        LumosTransformer2DModel(**dict(TINY, hidden_size=64, use_size_conditioning=True))
    with pytest.raises(ValueError, match="hides every condition token"):
        latents, t, cond = _inputs()
        model(latents, t, cond, encoder_attention_mask=torch.zeros(2, 5, dtype=torch.bool))
