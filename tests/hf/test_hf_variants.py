"""The HF export classes hold every Lumos variant: I2V (``LumosTransformer3DModel``, spatial +
temporal and full 3-D attention), NVS and the Flag-DiT options (``LumosTransformer2DModel``).

For each case a randomised megatron ``LumosDiT`` (the engine's model, one gloo process) and the
HF class loaded with ``mcore_to_hf`` of its weights (strict) must give the same outputs on the
same inputs (fp32, <= 3e-5 of the output scale), with per-frame timesteps for video, padded
condition tokens, a dropped condition (CFG branch), and a camera plus input view for NVS. The
configs round-trip ModelConfig -> HF config -> ModelConfig, and ``from_pretrained`` of a saved
export gives the same outputs.
"""

from __future__ import annotations

import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.hf import LumosTransformer2DModel, LumosTransformer3DModel
from lumos_mcore.models.dit.hf_adapter import (
    hf_class_name,
    hf_config_from_model_config,
    hf_model_class,
    mcore_to_hf,
    model_config_from_hf_config,
)
from tests.dist_utils import run_distributed

BASE = dict(name="Lumos-Tiny/2", latent_size=8, cond_tokens=3, cond_channels=24, spec="local")
FLAG = dict(norm="rmsnorm", qk_norm=True, pos_embed="rope", cross_attn_gate=True)
CASES = {
    "i2v_st_sincos": dict(BASE, variant="i2v", num_frames=3),
    "i2v_3d_sincos": dict(BASE, variant="i2v", num_frames=3, video_attention="full_3d"),
    "i2v_st_flag_single": dict(
        BASE, variant="i2v", num_frames=3, adaln_type="single", rope_ntk_factor=2.0, **FLAG
    ),
    "i2v_3d_rope_qk": dict(
        BASE,
        variant="i2v",
        num_frames=2,
        video_attention="full_3d",
        pos_embed="rope",
        qk_norm=True,
    ),
    "nvs": dict(BASE, variant="nvs", qk_norm=True),
    "i2i_flag": dict(BASE, **FLAG),
    "t2i_size_gate": dict(
        BASE,
        variant="t2i",
        adaln_type="single",
        use_size_conditioning=True,
        hidden_size=48,
        num_heads=4,
        cross_attn_gate=True,
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(cfg: ModelConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, c, s = 2, cfg.in_channels, cfg.latent_size
    shape = (b, c, cfg.num_frames, s, s) if cfg.is_video else (b, c, s, s)
    batch = {
        "latents": torch.randn(shape, generator=g),
        "cond": torch.randn(b, cfg.cond_tokens, cfg.cond_channels, generator=g),
        "cond_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "force_drop_ids": torch.tensor([False, True]),
    }
    if cfg.is_video:
        t = torch.rand(b, cfg.num_frames, generator=g) * 999
        t[:, 0] = 0.0  # the clean conditioning frame
        batch["timesteps"] = t
    else:
        batch["timesteps"] = torch.rand(b, generator=g) * 999
    if cfg.variant == "nvs":
        batch["input_latent"] = torch.randn(shape, generator=g)
        batch["camera"] = torch.randn(b, 12, generator=g)
    if cfg.use_size_conditioning:
        batch["resolution"] = torch.tensor([[256.0, 256.0], [512.0, 256.0]])
        batch["aspect_ratio"] = torch.tensor([[1.0], [2.0]])
    return batch


def _megatron_job(rank, world, cases):
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=4)
    out = {}
    for i, (name, kw) in enumerate(cases.items()):
        cfg = ModelConfig(**kw)
        model = LumosDiT(build_transformer_config(cfg), cfg).eval()
        _randomise(model, 10 + i)
        with torch.no_grad():
            pred = model(**_inputs(cfg, i))
        out[name] = {"state": model.state_dict(), "out": pred}
    return out


@pytest.fixture(scope="module")
def megatron():
    (res,) = run_distributed(_megatron_job, 1, CASES)
    return res


def _hf_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    extra, view = None, {}
    if "resolution" in batch:
        extra = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
    if "camera" in batch:
        view = {"camera": batch["camera"], "input_latent": batch["input_latent"]}
    with torch.no_grad():
        return model(
            batch["latents"],
            batch["timesteps"],
            batch["cond"],
            encoder_attention_mask=batch["cond_mask"],
            added_cond_kwargs=extra,
            force_drop_ids=batch["force_drop_ids"],
            **view,
        ).sample


def _hf_model(name: str, megatron: dict) -> torch.nn.Module:
    cfg = ModelConfig(**CASES[name])
    cls = hf_model_class(hf_class_name(cfg))
    model = cls(**hf_config_from_model_config(cfg)).eval()
    model.load_state_dict(mcore_to_hf(megatron[name]["state"], cfg), strict=True)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_hf_class_reproduces_megatron(megatron, name):
    cfg = ModelConfig(**CASES[name])
    model = _hf_model(name, megatron)
    assert isinstance(model, LumosTransformer3DModel if cfg.is_video else LumosTransformer2DModel)
    out = _hf_forward(model, _inputs(cfg, list(CASES).index(name)))
    ref = megatron[name]["out"]
    assert out.shape == ref.shape
    assert ref.abs().mean() > 1e-2  # every path carries signal
    err = float((out - ref).abs().max() / ref.abs().max())
    # fp32 rounding: with these random weights each fp32 model sits up to 1.3e-5 of the scale
    # from a float64 run of the HF class (measured), so the two may differ by twice that.
    assert err <= 3e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trip(name):
    cfg = ModelConfig(**CASES[name])
    hf_cfg = hf_config_from_model_config(cfg)
    back = model_config_from_hf_config({"_class_name": hf_class_name(cfg), **hf_cfg}, spec="local")
    for field in (
        "variant",
        "depth_",
        "hidden_size_",
        "num_heads_",
        "num_frames",
        "video_attention",
        "first_frame_condition",
        "norm",
        "qk_norm",
        "pos_embed",
        "rope_theta",
        "rope_ntk_factor",
        "cross_attn_gate",
        "camera_dim",
        "adaln_type",
        "use_size_conditioning",
        "cond_tokens",
        "cond_channels",
        "model_in_channels",
    ):
        assert getattr(back, field) == getattr(cfg, field), field


def test_video_export_saves_and_loads(megatron, tmp_path):
    name = "i2v_st_flag_single"
    model = _hf_model(name, megatron)
    model.save_pretrained(tmp_path)
    loaded = LumosTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.video_attention == "spatial_temporal" and loaded.config.qk_norm
    batch = _inputs(ModelConfig(**CASES[name]), list(CASES).index(name))
    torch.testing.assert_close(_hf_forward(loaded, batch), megatron[name]["out"], rtol=0, atol=1e-4)


def test_fresh_video_model_is_the_image_model_per_frame():
    """Zero-initialised temporal attention: a fresh I2V export with the I2I weights predicts,
    on each frame, what the image model predicts for that frame."""
    kw = dict(sample_size=8, hidden_size=48, depth=2, num_heads=4, cond_channels=24)
    image = LumosTransformer2DModel(**kw).eval()
    _randomise(image, 1)
    video = LumosTransformer3DModel(**kw, num_frames=3).eval()
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and all(".temporal_attn." in k for k in missing)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 1, 24, generator=g)
    t = torch.tensor([[0.0, 500.0, 900.0], [10.0, 20.0, 30.0]])
    with torch.no_grad():
        out = video(x, t, cond).sample
        frames = [image(x[:, :, f], t[:, f], cond).sample for f in range(3)]
    ref = torch.stack(frames, dim=2)
    assert out.abs().mean() > 1e-2
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_bad_video_and_view_inputs_are_refused():
    kw = dict(sample_size=8, hidden_size=48, depth=1, num_heads=4, cond_channels=24)
    with pytest.raises(ValueError, match="video_attention"):
        LumosTransformer3DModel(**kw, video_attention="joint")
    with pytest.raises(ValueError, match="multiple of 16"):
        LumosTransformer3DModel(**dict(kw, hidden_size=40, num_heads=4), video_attention="full_3d")
    video = LumosTransformer3DModel(**kw, num_frames=2)
    cond = torch.randn(1, 1, 24)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        video(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), cond)
    with pytest.raises(ValueError, match="per-frame timestep has 3 frames"):
        video(torch.randn(1, 4, 2, 8, 8), torch.zeros(1, 3), cond)
    nvs = LumosTransformer2DModel(**kw, camera_dim=12)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="input_latent"):
        nvs(x, torch.tensor([1.0]), cond, camera=torch.zeros(1, 12))
    with pytest.raises(ValueError, match="pass camera"):
        nvs(x, torch.tensor([1.0]), cond, input_latent=x)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(qk_norm=True), r"config\.qk_norm=True"),
        (dict(camera_dim=12), r"config\.camera_dim=12"),
        (dict(num_frames=2), "LumosTransformer3DModel: PixArtTransformer2DModel holds image"),
    ],
)
def test_pixart_export_refuses_what_pixart_cannot_hold(tmp_path, kw, match):
    from lumos_mcore.convert import convert_checkpoint
    from lumos_mcore.models.dit.hf_adapter import ConversionError

    base = dict(
        sample_size=8, hidden_size=48, depth=1, num_heads=4, cond_channels=24, adaln_type="single"
    )
    video = "num_frames" in kw
    cls = LumosTransformer3DModel if video else LumosTransformer2DModel
    cls(**base, **kw).save_pretrained(tmp_path / "src")
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(tmp_path / "src", "hf", tmp_path / "px", "pixart-diffusers")
    assert not (tmp_path / "px").exists()


def test_video_gradient_checkpointing_gives_the_same_gradients():
    model = LumosTransformer3DModel(
        sample_size=8, hidden_size=48, depth=2, num_heads=4, cond_channels=24, num_frames=2,
        qk_norm=True, pos_embed_type="rope", cond_dropout_prob=0.0,
    ).train()  # fmt: skip
    _randomise(model, 0)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 1, 24, generator=g)
    t = torch.rand(2, 2, generator=g) * 999

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, t, cond).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 60
    assert any(".temporal_attn." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0)


def _scaled_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("gated", [False, True])
def test_single_condition_token_shortcut_equals_attention(gated):
    """One condition token: the cross-attention returns proj(V) without attending; an
    all-True mask takes the attention path, which must give the same result and gradients."""
    from lumos_mcore.hf import LumosCrossAttention

    attn = LumosCrossAttention(48, 4, gated=gated)
    _randomise(attn, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 48, generator=g, requires_grad=True)
    cond = torch.randn(2, 1, 48, generator=g)
    names = [n for n, _ in attn.named_parameters()]
    fast = attn(x, cond)
    grads_fast = torch.autograd.grad(
        fast.square().sum(), list(attn.parameters()), allow_unused=True
    )
    slow = attn(x, cond, torch.ones(2, 1, dtype=torch.bool))
    grads_slow = torch.autograd.grad(slow.square().sum(), list(attn.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    for name, gf, gs in zip(names, grads_fast, grads_slow):
        # d softmax / d (q, k) = 0 with one key: the attention path's gradients for the query
        # projection and the key rows of kv_linear are rounding noise, the shortcut's are zero
        if name.startswith("q_linear."):
            assert gf is None and float(gs.abs().max()) < 1e-3, name
        elif name.startswith("kv_linear."):
            assert not gf[:48].any() and float(gs[:48].abs().max()) < 1e-3, name
            assert _scaled_err(gf[48:], gs[48:]) <= 1e-5, name
        else:
            assert _scaled_err(gf, gs) <= 1e-5, name
