"""Frozen encoders against direct use of the diffusers / transformers models they wrap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lumos_mcore.config.media import EncodersConfig
from lumos_mcore.encoders import FrozenDINO, FrozenEncoders, FrozenT5, FrozenVAE


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_frozen(module: torch.nn.Module) -> None:
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert all(not m.training for m in module.modules())


def test_vae_latents_match_diffusers_and_video_is_per_frame(tiny_encoders) -> None:
    from diffusers import AutoencoderKL

    vae = FrozenVAE(str(tiny_encoders["vae"]), device="cpu", batch=3)
    _assert_frozen(vae.vae)
    ref_model = AutoencoderKL.from_pretrained(str(tiny_encoders["vae"])).eval()
    x = _pixels(2, 3, 32, 48)
    with torch.no_grad():
        ref = ref_model.encode(x).latent_dist.mode() * ref_model.config.scaling_factor
    z = vae.encode(x.requires_grad_(True))
    assert z.shape == (2, 4, 4, 6) and z.grad_fn is None  # /8, no graph to the pixels
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    clip = _pixels(2, 3, 5, 32, 48, seed=1)  # [B, 3, T, H, W]
    zv = vae.encode(clip)  # [B, C, T, h, w], frames batched 3 at a time across samples
    assert zv.shape == (2, 4, 5, 4, 6)
    for t in range(5):
        torch.testing.assert_close(zv[:, :, t], vae.encode(clip[:, :, t]), atol=1e-5, rtol=1e-5)


def test_vae_posterior_samples_are_seeded_per_sample(tiny_encoders) -> None:
    vae = FrozenVAE(str(tiny_encoders["vae"]), device="cpu", sampling="sample")
    x = _pixels(3, 3, 32, 32)
    a = vae.encode(x, seeds=[10, 11, 12])
    b = vae.encode(x[1:2], seeds=[11])  # same sample alone: same draw
    torch.testing.assert_close(a[1:2], b)
    assert not torch.allclose(a, vae.encode(x, seeds=[1, 2, 3]))
    mean = FrozenVAE(str(tiny_encoders["vae"]), device="cpu").encode(x)
    assert (a - mean).abs().mean() > 0
    with pytest.raises(ValueError, match="one seed per sample"):
        vae.encode(x)


@pytest.mark.parametrize("kind", ["dino", "vit"])
def test_dino_cls_and_patch_tokens_match_transformers(tiny_encoders, kind) -> None:
    from transformers import AutoModel

    path = str(tiny_encoders[kind])
    dino = FrozenDINO(path, image_size=32, device="cpu")
    _assert_frozen(dino.model)
    x = _pixels(2, 3, 40, 56)
    # Independent preprocessing: centre square crop, bicubic resize, ImageNet normalisation.
    sq = ((x + 1) / 2)[..., :, 8:48]
    ref_in = F.interpolate(sq, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(pixel_values=(ref_in - mean) / std).last_hidden_state  # [B, 1 + N, D]
    cls = dino.encode(x, tokens="cls")
    assert cls.shape == (2, 1, 32)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(2, 1))
    torch.testing.assert_close(cls, F.normalize(hidden[:, :1], dim=-1), atol=1e-5, rtol=1e-4)
    patch = dino.encode(x, tokens="patch")
    assert patch.shape == (2, dino.num_patches, 32) == (2, 16, 32)
    torch.testing.assert_close(patch, hidden[:, 1:], atol=1e-5, rtol=1e-4)


def test_t5_tokens_mask_and_padding(tiny_encoders) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    path = str(tiny_encoders["t5"])
    t5 = FrozenT5(path, max_length=12, device="cpu")
    _assert_frozen(t5.model)
    caps = ["a red circle", "a blue square drifting left over a gradient and up and down right"]
    feats, mask = t5.encode(caps)
    assert feats.shape == (2, 12, 32) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 12]  # 3 words + </s>; the long one is truncated
    assert (feats[0, 4:] == 0).all()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(caps[0], return_tensors="pt")["input_ids"]  # unpadded
    model = T5EncoderModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state[0]  # [4, D]
    torch.testing.assert_close(feats[0, :4], ref, atol=1e-5, rtol=1e-4)


def test_frozen_encoders_build_training_batches(tiny_encoders) -> None:
    cfg = EncodersConfig(
        vae=str(tiny_encoders["vae"]), dino=str(tiny_encoders["dino"]), dino_image_size=32
    )
    enc = FrozenEncoders(cfg)
    assert (enc.latent_channels, enc.cond_tokens, enc.cond_dim) == (4, 1, 32)
    video = _pixels(2, 3, 3, 32, 32)
    raw = {"pixels": video, "caption": ["a", "b"], "index": torch.tensor([5, 9])}
    out = enc.encode(raw)
    assert set(out) == {"latent", "cond", "cond_mask", "index"}
    assert out["latent"].shape == (2, 4, 3, 4, 4) and out["cond_mask"].all()
    # Videos are conditioned on their first frame (I2V).
    torch.testing.assert_close(out["cond"], enc.dino.encode(video[:, :, 0], tokens="cls"))
    t5 = FrozenEncoders(
        EncodersConfig(vae=str(tiny_encoders["vae"]), t5=str(tiny_encoders["t5"]), cond="t5")
    )
    out = t5.encode(
        {"pixels": video[:, :, 0], "caption": ["a red ring", ""], "index": raw["index"]}
    )
    assert out["cond"].shape == (2, 120, 32) and out["cond_mask"].sum(1).tolist() == [4, 1]
    assert t5.cond_tokens == 120


@pytest.mark.parametrize(("cond", "size"), [("dino_cls", 32), ("dino_patch", 48), ("t5", 32)])
def test_encoder_facts_from_config_equal_the_loaded_encoders(tiny_encoders, cond, size) -> None:
    """Receiving ranks check the model's shapes and plan packs from config.json alone."""
    from lumos_mcore.encoders.frozen import EncoderFacts

    cfg = EncodersConfig(
        vae=str(tiny_encoders["vae"]),
        dino=str(tiny_encoders["dino"]),
        t5=str(tiny_encoders["t5"]),
        cond=cond,
        dino_image_size=size,
        t5_max_length=24,
    )
    enc = FrozenEncoders(cfg)
    loaded = (enc.latent_channels, enc.vae.downsample, enc.cond_dim, enc.cond_tokens)
    facts = EncoderFacts.read(cfg)
    assert (facts.latent_channels, facts.downsample, facts.cond_dim, facts.cond_tokens) == loaded
