"""Lumos-I2V / NVS model behaviour in one process (one spawn computes everything).

* I2I -> I2V initialisation: loading an I2I checkpoint into the spatial + temporal I2V model
  (new temporal parts zero-initialised) gives, on every frame, the I2I model's output on that
  frame (sin-cos and RoPE positions); an I2I checkpoint in the NVS model gives the I2I output on
  the noisy view whatever the input view and camera.
* First-frame conditioning: the conditioning frame enters clean at timestep 0 and is out of
  the loss, which equals the objective's loss on the generated frames only.
* Packing: a pack of samples of different sizes (frames, resolution, condition length, one
  dropped condition, a padded condition token) gives the same per-sample outputs and gradients
  as the samples run one by one, for full 3-D and spatial + temporal attention.
* Activation recompute on I2V at a long sequence: selective (core attention), full uniform and
  full block give the gradients of the plain run while keeping less for backward.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

COND = dict(cond_tokens=3, cond_channels=48)
I2I = dict(name="Lumos-Tiny/2", latent_size=8, **COND)
I2V_ST = dict(I2I, variant="i2v", num_frames=3)
I2V_3D = dict(I2V_ST, video_attention="full_3d")
SEED = 3


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _model(kw: dict, **tcfg):
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config

    cfg = ModelConfig(**kw)
    return LumosDiT(build_transformer_config(cfg, **tcfg), cfg)


def _init_equality(pos_embed: str) -> dict:
    from lumos_mcore.models.dit.state_dict import load_image_weights

    torch.manual_seed(0)
    i2i = _model(dict(I2I, pos_embed=pos_embed))
    _randomise(i2i, 1)
    i2v = _model(dict(I2V_ST, pos_embed=pos_embed))
    kept = load_image_weights(i2v, i2i.state_dict())
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.rand(2, 3, generator=g) * 999
    t[:, 0] = 0.0  # the conditioning frame
    cond = torch.randn(2, 3, 48, generator=g)
    with torch.no_grad():
        out = i2v(video, t, cond)
        frames = torch.stack([i2i(video[:, :, f], t[:, f], cond) for f in range(3)], dim=2)
    # The temporal parts must still learn: their output projection gets a gradient.
    i2v(video, t, cond).square().mean().backward()
    proj = i2v.decoder.layers[0].temporal_attention.linear_proj.weight
    return {"video": out, "frames": frames, "kept": kept, "proj_grad": proj.grad.abs().sum()}


def _nvs_init() -> dict:
    from lumos_mcore.models.dit.state_dict import load_image_weights

    i2i = _model(I2I)
    _randomise(i2i, 4)
    nvs = _model(dict(I2I, variant="nvs"))
    kept = load_image_weights(nvs, i2i.state_dict())
    g = torch.Generator().manual_seed(5)
    x, view = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.rand(2, generator=g) * 999, torch.randn(2, 3, 48, generator=g)
    camera = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        return {
            "nvs": nvs(x, t, cond, input_latent=view, camera=camera),
            "i2i": i2i(x, t, cond),
            "kept": kept,
        }


def _nvs_step() -> dict:
    """The step feeds NVS the tokens of ``cat([x_t, input view], channels)``."""
    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.models.common.embeddings import patchify, unpatchify
    from lumos_mcore.training.step import DiffusionForwardStep

    model = _model(dict(I2I, variant="nvs"))
    _randomise(model, 12)
    step = DiffusionForwardStep(
        build_objective(DiffusionConfig()), seed=SEED, cond_dropout=0.0, device=torch.device("cpu")
    )
    g = torch.Generator().manual_seed(13)
    view = torch.randn(2, 4, 8, 8, generator=g)
    batch = {
        "latent": torch.randn(2, 4, 8, 8, generator=g),
        "input_latent": view,
        "camera": torch.randn(2, 12, generator=g),
        "cond": torch.randn(2, 3, 48, generator=g),
        "position": torch.arange(2),
    }
    prep = step.prepare_dense(batch, model)
    x_t = unpatchify(prep.x_t, 2, 4, 4, 4)  # [B, 4, H, W]
    with torch.no_grad():
        loss, _ = step.loss_func(model(**prep.model_inputs), prep=prep)
        dense = model(x_t, prep.model_inputs["timesteps"], batch["cond"], input_latent=view,
                      camera=batch["camera"])  # fmt: skip
    return {
        "tokens": prep.model_inputs["tokens"],
        "want": patchify(torch.cat([x_t, view], dim=1), 2),
        "loss": loss,
        "token_out": model(**prep.model_inputs).detach(),
        "dense_out": patchify(dense, 2),
    }


def _first_frame_step() -> dict:
    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.models.common.embeddings import unpatchify_video
    from lumos_mcore.training.step import DiffusionForwardStep

    model = _model(I2V_ST)
    _randomise(model, 6)
    objective = build_objective(DiffusionConfig())
    step = DiffusionForwardStep(objective, seed=SEED, cond_dropout=0.0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    batch = {"latent": x0, "cond": torch.randn(2, 3, 48, generator=g), "position": torch.arange(2)}
    prep = step.prepare_dense(batch, model)
    out = model(**prep.model_inputs)  # [B, S, p*p*8]
    out.retain_grad()
    loss, _ = step.loss_func(out, prep=prep)
    loss.backward()

    def latent(tokens: torch.Tensor, c: int) -> torch.Tensor:
        return unpatchify_video(tokens.detach(), 2, 3, 4, 4, c)

    # Independent reference: the objective on frames 1.. only, in latent space.
    ref = objective.loss(
        latent(out, 8)[:, :, 1:],
        x0=x0[:, :, 1:],
        x_t=latent(prep.x_t, 4)[:, :, 1:],
        noise=latent(prep.noise, 4)[:, :, 1:],
        t=prep.t,
    ).mean()
    bumped = out.detach().clone()
    bumped[:, :16] += 5.0  # the conditioning frame's tokens
    loss_bumped, _ = step.loss_func(bumped, prep=prep)
    return {
        "loss": loss.detach(),
        "ref": ref,
        "loss_bumped": loss_bumped,
        "grad_cond_frame": out.grad[:, :16].abs().sum(),
        "grad_generated": out.grad[:, 16:].abs().sum(),
        "tokens_frame0": prep.model_inputs["tokens"][:, :16],
        "x0_frame0": prep.x0[:, :16],
        "timesteps": prep.model_inputs["timesteps"],
        "t": prep.t,
    }


def _packing(kw: dict) -> dict:
    model = _model(kw)
    _randomise(model, 8)
    g = torch.Generator().manual_seed(9)
    shapes = [(3, 4, 4), (1, 4, 6), (2, 2, 4)]  # (frames, h, w) in tokens
    cond_lens = [3, 2, 1]
    tokens = [torch.randn(1, t * h * w, 16, generator=g) for t, h, w in shapes]
    conds = [torch.randn(1, lc, 48, generator=g) for lc in cond_lens]
    frame_t = [torch.rand(1, t, generator=g) * 999 for t, _, _ in shapes]
    weights = [torch.randn(1, t * h * w, 32, generator=g) for t, h, w in shapes]
    mask0 = torch.tensor([[True, False, True]])  # sample 0 has a padded condition token
    drop = torch.tensor([True, False, False])  # sample 0's condition is dropped

    def run(fn):
        model.zero_grad()
        outs = fn()
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}

    def separate():
        outs = []
        for i, shape in enumerate(shapes):
            layout = model.make_layout(shape)
            outs.append(
                model(
                    tokens=tokens[i],
                    layout=layout,
                    timesteps=frame_t[i],
                    cond=conds[i],
                    cond_mask=mask0 if i == 0 else None,
                    force_drop_ids=drop[:1] if i == 0 else None,  # lc=3 = cond_tokens
                )
            )
        return outs

    def packed():
        layout = model.make_layout(packed_shapes=shapes, cond_lens=cond_lens)
        cond_mask = torch.cat([mask0[0], torch.ones(3, dtype=torch.bool)])[None]
        out = model(
            tokens=torch.cat(tokens, dim=1),
            layout=layout,
            timesteps=torch.cat(frame_t, dim=1),
            cond=torch.cat(conds, dim=1),
            cond_mask=cond_mask,
            force_drop_ids=drop,
        )
        return list(out.split([t.shape[1] for t in tokens], dim=1))

    sep_out, sep_grad = run(separate)
    pack_out, pack_grad = run(packed)
    return {"sep": (sep_out, sep_grad), "pack": (pack_out, pack_grad)}


def _recompute() -> dict:
    """Gradients and saved-for-backward bytes of one I2V step per recompute mode."""
    from lumos_mcore.models.dit.state_dict import load_full_state_dict

    kw = dict(I2I, variant="i2v", num_frames=16, latent_size=16)  # 16 x 8 x 8 = 1024 tokens
    modes = {
        "none": {},
        "selective": dict(recompute="selective"),
        "full_uniform": dict(recompute="full", recompute_method="uniform"),
        "full_block": dict(recompute="full", recompute_method="block", recompute_num_layers=4),
    }
    g = torch.Generator().manual_seed(10)
    video = torch.randn(1, 4, 16, 16, 16, generator=g)
    t = torch.rand(1, 16, generator=g) * 999
    cond = torch.randn(1, 3, 48, generator=g)
    results, state = {}, None
    for name, extra in modes.items():
        model = _model(dict(kw, **extra))
        if state is None:
            _randomise(model, 11)
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            load_full_state_dict(model, state)
        model.train()
        saved = {}
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(x, saved=saved, weights=weights):
            st = x.untyped_storage()
            if st.data_ptr() not in weights:  # activations only, each storage once
                saved[st.data_ptr()] = st.nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = model(video, t, cond)
        out.square().mean().backward()
        results[name] = {
            "bytes": sum(saved.values()),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    return results


def _rank_fn(rank, world):
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=4, seed=SEED)
    return {
        "init_sincos": _init_equality("sincos"),
        "init_rope": _init_equality("rope"),
        "nvs": _nvs_init(),
        "nvs_step": _nvs_step(),
        "first_frame": _first_frame_step(),
        "pack_3d": _packing(I2V_3D),
        "pack_st": _packing(I2V_ST),
        "recompute": _recompute(),
    }


@pytest.fixture(scope="module")
def results():
    (res,) = run_distributed(_rank_fn, 1, timeout=300)
    return res


@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_i2i_to_i2v_init_equals_i2i_per_frame(results, pos):
    r = results[f"init_{pos}"]
    assert r["kept"] and all("temporal" in k for k in r["kept"])
    torch.testing.assert_close(r["video"], r["frames"], rtol=1e-5, atol=1e-5)
    assert r["video"].abs().max() > 1e-2  # a non-trivial output was compared
    assert r["proj_grad"] > 0


def test_i2i_to_nvs_init_ignores_view_and_camera(results):
    r = results["nvs"]
    assert sorted({k.split(".")[0] for k in r["kept"]}) == ["camera_embedder"]
    torch.testing.assert_close(r["nvs"], r["i2i"], rtol=1e-5, atol=1e-5)


def test_nvs_step_concatenates_the_input_view(results):
    r = results["nvs_step"]
    torch.testing.assert_close(r["tokens"], r["want"], rtol=0, atol=0)
    torch.testing.assert_close(r["token_out"], r["dense_out"], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(r["loss"])


def test_first_frame_masked_step_leaves_condition_frame_out_of_loss(results):
    r = results["first_frame"]
    torch.testing.assert_close(r["loss"], r["ref"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r["loss_bumped"], r["loss"], rtol=0, atol=0)
    assert r["grad_cond_frame"] == 0 and r["grad_generated"] > 0
    torch.testing.assert_close(r["tokens_frame0"], r["x0_frame0"], rtol=0, atol=0)  # clean
    assert (r["timesteps"][:, 0] == 0).all() and (r["timesteps"][:, 1:] > 0).all()
    assert (r["timesteps"][:, 1:] == r["t"][:, None].float()).all()


@pytest.mark.parametrize("mode", ["pack_3d", "pack_st"])
def test_packed_batch_matches_separate_samples(results, mode):
    (sep_out, sep_grad), (pack_out, pack_grad) = results[mode]["sep"], results[mode]["pack"]
    for a, b in zip(pack_out, sep_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, g in sep_grad.items():
        err = (pack_grad[name] - g).abs().max() / g.abs().max().clamp(min=1e-6)
        assert err < 1e-5, f"{name}: max relative grad error {err:.2e}"


def test_recompute_modes_match_and_save_memory(results):
    r = results["recompute"]
    ref = r["none"]["grads"]
    assert len(ref) > 40  # every parameter but the unused null condition
    for mode in ("selective", "full_uniform", "full_block"):
        assert r[mode]["grads"].keys() == ref.keys()
        for name, g in ref.items():
            err = (r[mode]["grads"][name] - g).abs().max() / g.abs().max().clamp(min=1e-6)
            assert err < 1e-5, f"{mode} {name}: relative grad error {err:.2e}"
    assert r["selective"]["bytes"] < r["none"]["bytes"]
    assert r["full_uniform"]["bytes"] < r["selective"]["bytes"] / 2
    assert r["full_block"]["bytes"] < r["selective"]["bytes"] / 2
