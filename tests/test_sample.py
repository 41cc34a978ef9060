"""``lumos_mcore.sample``: guidance, seeding, samplers and conditions against direct references.

The model is a tiny randomly-initialised ``LumosTransformer2DModel`` behind an adapter with the
``lumos_mcore.load_model`` calling convention (``model(latents, timesteps, cond, cond_mask,
**extras)``); references call the HF model and the samplers directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.gaussian import GaussianDiffusion
from lumos_mcore.diffusion.samplers import dpm_solver_sample
from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.sample import (
    Conditions,
    ModelInfo,
    batch_seed,
    build_conditions,
    build_parser,
    describe_model,
    diffusion_config,
    generate,
    main,
)

LATENT = 8  # 64 px with the factor-8 tiny VAE


def tiny_hf(cond_channels: int = 16, cond_tokens: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = LumosTransformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        cond_channels=cond_channels,
        cond_tokens=cond_tokens,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised parts would hide wiring mistakes
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


class Adapter(nn.Module):
    """``load_model`` calling convention over the HF class; records what it was called with."""

    def __init__(self, hf: LumosTransformer2DModel, config: dict | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.config = config if config is not None else hf.config
        self.calls: list[dict] = []

    def forward(self, latents, timesteps, cond, cond_mask=None, force_drop_ids=None, **extras):
        self.calls.append(
            {
                "t": timesteps.clone(),
                "cond": cond.clone(),
                "mask": cond_mask,
                "drop": force_drop_ids,
            }
            | {k: v.clone() for k, v in extras.items()}
        )
        if latents.ndim == 5:  # per-frame 2-D model standing in for a video model
            b, c, f, h, w = latents.shape
            x = latents.transpose(1, 2).reshape(b * f, c, h, w)
            t = timesteps.reshape(-1) if timesteps.ndim == 2 else timesteps.repeat_interleave(f)
            rep = lambda v: None if v is None else v.repeat_interleave(f, dim=0)  # noqa: E731
            out = self.hf(
                x,
                t,
                rep(cond),
                encoder_attention_mask=rep(cond_mask),
                force_drop_ids=rep(force_drop_ids),
            ).sample
            return out.reshape(b, f, -1, h, w).transpose(1, 2)
        return self.hf(
            latents,
            timesteps,
            cond,
            encoder_attention_mask=cond_mask,
            force_drop_ids=force_drop_ids,
        ).sample


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from lumos_mcore.encoders.tiny import save_tiny_vae

    return str(save_tiny_vae(tmp_path_factory.mktemp("vae")))


def test_guided_euler_step_equals_manual_cfg(hf_model):
    """One flow-Euler step with CFG: uncond + s*(cond - uncond) from two separate model calls."""
    cond = torch.nn.functional.normalize(torch.randn(2, 1, 16), dim=-1)
    info = describe_model(Adapter(hf_model))
    assert (info.latent_size, info.cond_channels, info.out_channels) == (LATENT, 16, 8)
    flow = DiffusionConfig(objective="flow")
    out = generate(
        Adapter(hf_model),
        info,
        Conditions(cond=cond),
        flow,
        sampler="euler",
        steps=1,
        cfg_scale=3.0,
        num_samples=1,
        seed=5,
        batch_size=2,
        progress=False,
    )[0]
    noise = torch.randn(
        (2, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(batch_seed(5, 0))
    )
    t = torch.full((2,), 1000.0)
    with torch.no_grad():
        v_c = hf_model(noise, t, cond).sample[:, :4]
        v_u = hf_model(noise, t, cond, force_drop_ids=torch.ones(2, dtype=torch.bool)).sample[:, :4]
    expected = noise - (v_u + 3.0 * (v_c - v_u))  # x_0 = x_1 + (0 - 1) * v
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_dpm_solver_without_guidance_equals_sampler(hf_model, tmp_path):
    """CLI with --cfg-scale 1 == dpm_solver_sample on the plain conditional model."""
    cond = torch.nn.functional.normalize(torch.randn(1, 1, 16), dim=-1)
    np.save(tmp_path / "cond.npy", cond[0].numpy())  # [Lc, Cc]: one condition
    main(
        [
            "--model", "unused", "--cond", str(tmp_path / "cond.npy"), "--sampler", "dpm++2m",
            "--steps", "4", "--cfg-scale", "1", "--num-samples", "3", "--batch-size", "3",
            "--seed", "11", "--out", str(tmp_path / "o"), "--no-progress",
        ],
        loader=lambda path, **kw: Adapter(hf_model),
    )  # fmt: skip
    got = torch.from_numpy(np.load(tmp_path / "o" / "latents.npy"))
    noise = torch.randn(
        (3, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(batch_seed(11, 0))
    )
    with torch.no_grad():
        ref = dpm_solver_sample(
            lambda x, t: hf_model(x, t, cond.expand(3, -1, -1)).sample,
            noise,
            GaussianDiffusion.from_config(DiffusionConfig()),
            4,
        )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ddpm_cli_seeded_grid_and_decode(hf_model, tiny_vae, tmp_path):
    """Same seed -> same samples (any batch split within a rank's batches), other seed ->
    others; the PNGs are the VAE decode of the saved latents; the grid has a row per condition."""
    from diffusers import AutoencoderKL

    cond = torch.nn.functional.normalize(torch.randn(2, 1, 16), dim=-1)
    np.save(tmp_path / "cond.npy", cond.numpy())

    def run(out: str, seed: int) -> np.ndarray:
        main(
            [
                "--model", "unused", "--cond", str(tmp_path / "cond.npy"), "--sampler", "ddpm",
                "--steps", "5", "--cfg-scale", "2.5", "--num-samples", "2", "--batch-size", "2",
                "--seed", str(seed), "--vae", tiny_vae, "--out", str(tmp_path / out),
                "--no-progress",
            ],
            loader=lambda path, **kw: Adapter(hf_model),
        )  # fmt: skip
        return np.load(tmp_path / out / "latents.npy")

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert a.shape == (4, 4, LATENT, LATENT)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-2
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        z = torch.from_numpy(a) / vae.config.scaling_factor
        px = vae.decode(z).sample.clamp(-1, 1)  # [4, 3, 64, 64]
    expected = ((px + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(4):
        got = np.asarray(Image.open(tmp_path / "a" / f"sample_{i:04d}.png"))
        assert np.abs(got.astype(int) - expected[i].astype(int)).max() <= 1
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)  # 2 conditions x 2 samples
    np.testing.assert_array_equal(grid[2:66, 68:132], expected[1])  # row 0, column 1
    assert json.loads((tmp_path / "a" / "labels.json").read_text()) == ["cond[0]", "cond[1]"]


def test_image_and_prompt_conditions_come_from_the_encoders(tmp_path):
    """--image: the DINO CLS token of the (resized) image; --prompt: T5 features and mask."""
    from lumos_mcore.encoders import FrozenDINO, FrozenT5
    from lumos_mcore.encoders.tiny import save_tiny_dino, save_tiny_t5
    from lumos_mcore.sample import _load_image, _resize_center

    dino_dir = save_tiny_dino(tmp_path / "dino")
    t5_dir = save_tiny_t5(tmp_path / "t5")
    rgb = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")

    i2i = Adapter(tiny_hf(cond_channels=32))
    common = ["--steps", "1", "--num-samples", "1", "--no-progress", "--model", "unused"]
    main(
        [*common, "--image", str(tmp_path / "in.png"), "--dino", str(dino_dir),
         "--dino-image-size", "32", "--out", str(tmp_path / "i")],
        loader=lambda path, **kw: i2i,
    )  # fmt: skip
    pixels = _resize_center(_load_image(str(tmp_path / "in.png")), LATENT * 8)
    ref = FrozenDINO(str(dino_dir), image_size=32, device="cpu").encode(pixels)  # [1, 1, 32]
    got = i2i.calls[0]["cond"]  # [2, 1, 32]: conditional half, then the null half
    torch.testing.assert_close(got[:1], ref)
    assert got.shape == (2, 1, 32) and i2i.calls[0]["drop"].tolist() == [False, True]

    t2i = Adapter(tiny_hf(cond_channels=32, cond_tokens=6))
    prompts = ["a red circle", "the dark square moving left"]
    main(
        [*common, "--prompt", prompts[0], "--prompt", prompts[1], "--t5", str(t5_dir),
         "--out", str(tmp_path / "t")],
        loader=lambda path, **kw: t2i,
    )  # fmt: skip
    feats, mask = FrozenT5(str(t5_dir), max_length=6, device="cpu").encode(prompts)
    call = t2i.calls[0]
    torch.testing.assert_close(call["cond"][:2], feats)
    assert torch.equal(call["mask"][:2], mask) and torch.equal(call["mask"][2:], mask)
    assert mask[0].tolist() == [True] * 4 + [False] * 2  # 3 words + </s>, padded to 6


def test_i2v_keeps_the_first_frame_and_writes_video(hf_model, tiny_vae, tmp_path):
    frames = 3
    model = Adapter(
        hf_model, config=dict(hf_model.config) | {"variant": "i2v", "num_frames": frames}
    )
    first = torch.randn(1, 4, LATENT, LATENT)
    np.save(tmp_path / "first.npy", first.numpy())
    np.save(tmp_path / "cond.npy", np.ones((1, 16), np.float32) / 4)
    written = main(
        ["--model", "unused", "--cond", str(tmp_path / "cond.npy"), "--input-latent",
         str(tmp_path / "first.npy"), "--sampler", "dpm++2m", "--steps", "3", "--num-samples",
         "2", "--vae", tiny_vae, "--out", str(tmp_path / "v"), "--no-progress"],
        loader=lambda path, **kw: model,
    )  # fmt: skip
    lat = torch.from_numpy(np.load(tmp_path / "v" / "latents.npy"))
    assert lat.shape == (2, 4, frames, LATENT, LATENT)
    assert torch.equal(lat[:, :, 0], first.expand(2, -1, -1, -1))  # the condition frame
    assert (lat[:, :, 1:] - lat[:, :, :1]).abs().mean() > 0.1  # generated frames differ
    for call in model.calls:  # per-frame timesteps: the clean first frame at 0
        assert call["t"].shape == (4, frames) and bool((call["t"][:, 0] == 0).all())
        assert bool((call["t"][:, 1:] > 0).all())
    videos = [Path(p) for p in written["videos"]]
    gif = next(p for p in videos if p.suffix == ".gif")
    with Image.open(gif) as im:
        assert im.n_frames == frames and im.size == (64, 64)
    assert len(list((tmp_path / "v" / "sample_0000_frames").glob("*.png"))) == frames
    mp4 = [p for p in videos if p.suffix == ".mp4"]
    if mp4:
        import av

        with av.open(str(mp4[0])) as container:
            assert sum(1 for _ in container.decode(video=0)) == frames


def test_i2v_without_first_frame_conditioning_samples_every_frame(hf_model, tmp_path, caplog):
    """Trained with frame 0 noised like the rest (``first_frame_condition=false``), the sampler
    must not pin a clean frame 0 the model never saw: one timestep per sample, all frames drawn."""
    frames = 3
    config = dict(hf_model.config) | {
        "variant": "i2v",
        "num_frames": frames,
        "first_frame_condition": False,
    }
    model = Adapter(hf_model, config=config)
    first = torch.randn(1, 4, LATENT, LATENT)
    np.save(tmp_path / "first.npy", first.numpy())
    np.save(tmp_path / "cond.npy", np.ones((1, 16), np.float32) / 4)
    with caplog.at_level("WARNING", logger="lumos_mcore.sample"):
        main(
            ["--model", "unused", "--cond", str(tmp_path / "cond.npy"), "--input-latent",
             str(tmp_path / "first.npy"), "--sampler", "dpm++2m", "--steps", "3",
             "--num-samples", "2", "--out", str(tmp_path / "v"), "--no-progress"],
            loader=lambda path, **kw: model,
        )  # fmt: skip
    assert "input latent is not used" in caplog.text
    lat = torch.from_numpy(np.load(tmp_path / "v" / "latents.npy"))
    assert lat.shape == (2, 4, frames, LATENT, LATENT)
    assert (lat[:, :, 0] - first).abs().mean() > 0.1  # frame 0 is generated, not copied
    for call in model.calls:
        assert call["t"].shape == (4,) and bool((call["t"] > 0).all())


def test_nvs_camera_and_input_view_reach_the_model(hf_model, tmp_path):
    model = Adapter(hf_model, config=dict(hf_model.config) | {"variant": "nvs"})
    np.save(tmp_path / "cond.npy", np.ones((1, 16), np.float32) / 4)
    view = torch.randn(1, 4, LATENT, LATENT)
    np.save(tmp_path / "view.npy", view.numpy())
    cam = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0.5, -0.25, 2.0]
    main(
        ["--model", "unused", "--cond", str(tmp_path / "cond.npy"), "--input-latent",
         str(tmp_path / "view.npy"), "--camera", ",".join(map(str, cam)), "--steps", "1",
         "--num-samples", "2", "--out", str(tmp_path / "n"), "--no-progress"],
        loader=lambda path, **kw: model,
    )  # fmt: skip
    call = model.calls[0]
    assert call["camera"].shape == (4, 12)  # 2 samples, doubled for guidance
    assert torch.equal(call["camera"], torch.tensor([cam]).expand(4, -1))
    assert torch.equal(call["input_latent"], view.expand(4, -1, -1, -1))


def test_diffusion_settings_from_the_training_config(tmp_path):
    """config.yaml next to a checkpoint sets the objective; diffusion.* overrides win."""
    from lumos_mcore.sample import find_train_config

    (tmp_path / "run" / "checkpoints" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(
        "model: {name: Lumos-XL/2}\ndiffusion: {objective: flow, flow_shift: 3.0}\n"
    )
    found = find_train_config(str(tmp_path / "run" / "checkpoints" / "iter_0000010"))
    assert found == tmp_path / "run" / "config.yaml"
    cfg = diffusion_config(str(found), ["diffusion.flow_shift=2.0"])
    assert (cfg.objective, cfg.flow_shift, cfg.learn_sigma) == ("flow", 2.0, True)
    with pytest.raises(ValueError, match="only diffusion"):
        diffusion_config(None, ["model.name=x"])
    assert ModelInfo(variant="i2v", num_frames=5).latent_shape(4) == (4, 5, 4, 4)


def test_one_cond_mask_serves_every_condition_and_a_wrong_one_is_named(tmp_path):
    """``--cond-mask`` of shape [Lc] applies to all N conditions of ``--cond``; any other shape
    than [Lc] / [N, Lc] is refused naming both files' shapes (it used to fail at the second
    condition with an IndexError)."""
    cond, mask = tmp_path / "cond.npy", tmp_path / "mask.npy"
    np.save(cond, np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32))
    np.save(mask, np.array([True, True, False, False]))
    args = build_parser().parse_args(
        ["--model", "m", "--cond", str(cond), "--cond-mask", str(mask)]
    )
    info = ModelInfo(cond_tokens=4, cond_channels=8)
    conds = build_conditions(args, info, torch.device("cpu"))
    assert conds.mask.shape == (3, 4)
    assert conds.mask.tolist() == [[True, True, False, False]] * 3
    np.save(mask, np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"--cond-mask has shape \(2, 4\); --cond \(3, 4, 8\)"):
        build_conditions(args, info, torch.device("cpu"))
