"""Samplers: exact-model recovery, agreement with diffusers' schedulers, CFG and pinning."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.gaussian import GaussianDiffusion, get_betas, space_timesteps
from lumos_mcore.diffusion.samplers import (
    cfg_model_fn,
    ddpm_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
    flow_euler_sample,
    flow_timesteps,
    sample,
)

SHAPE = (2, 4, 6, 6)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(get_betas("linear", 1000))


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)) * 0.6


def _exact_eps_fn(diffusion: GaussianDiffusion, x0: torch.Tensor, learned_sigma: bool = True):
    """ε that makes x0 the exact denoised prediction at every timestep."""
    abar = diffusion.buffer("alphas_cumprod")

    def fn(x, t_model):
        a = abar[t_model.long()].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if not learned_sigma:
            return eps
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return fn


def _smooth_fn(out_channels: int):
    """A fixed nonlinear, well-scaled ε (+ v) predictor for cross-implementation checks.

    ε is the optimal denoiser for data ~ N(0, 0.5²) plus a nonlinear perturbation scaled by √ᾱ,
    so x0 predictions stay O(1) at every noise level and absolute tolerances are meaningful.
    """
    abar = GaussianDiffusion(get_betas("linear", 1000)).buffer("alphas_cumprod").float()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(out_channels, SHAPE[1], generator=g) * 0.5

    def fn(x, t_model):
        a2 = abar[t_model.long()].view(-1, 1, 1, 1)
        h = torch.tanh(torch.einsum("oc,bchw->bohw", w, x) + (t_model / 1000.0).view(-1, 1, 1, 1))
        eps = (1 - a2).sqrt() * x / (a2 * 0.25 + 1 - a2) + 0.05 * a2.sqrt() * h[:, : SHAPE[1]]
        return torch.cat([eps, h[:, SHAPE[1] :]], dim=1)

    return fn


def test_ddpm_recovers_x0_with_exact_eps(diffusion, x0):
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    out = ddpm_sample(
        _exact_eps_fn(diffusion, x0),
        noise,
        diffusion,
        50,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddpm_matches_diffusers_learned_range(diffusion):
    steps = 25
    model = _smooth_fn(2 * SHAPE[1])
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))
    ours = ddpm_sample(model, noise, diffusion, steps, generator=torch.Generator().manual_seed(4))

    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range",
        clip_sample=False,
    )
    sched.set_timesteps(timesteps=space_timesteps(1000, steps)[::-1])
    g = torch.Generator().manual_seed(4)
    x = noise.clone()
    for t in sched.timesteps:
        out = model(x, torch.full((SHAPE[0],), float(t)))
        x = sched.step(out, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=0)


def test_ddpm_deterministic_given_generator(diffusion):
    model = _smooth_fn(2 * SHAPE[1])
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))

    def run(seed):
        return ddpm_sample(
            model, noise, diffusion, 10, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_dpm_solver_recovers_x0_with_exact_eps(diffusion, x0):
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    out = dpm_solver_sample(_exact_eps_fn(diffusion, x0), noise, diffusion, 20)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "steps,spacing", [(20, "linspace"), (7, "linspace"), (20, "trailing"), (12, "leading")]
)
def test_dpm_solver_matches_diffusers(diffusion, steps, spacing):
    model = _smooth_fn(SHAPE[1])
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(6))
    ours = dpm_solver_sample(model, noise, diffusion, steps, timestep_spacing=spacing)

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        timestep_spacing=spacing,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == dpm_solver_timesteps(1000, steps, spacing)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((SHAPE[0],), float(t))), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=0)


def test_dpm_solver_uses_eps_half_of_learned_sigma_output(diffusion):
    model = _smooth_fn(SHAPE[1])
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(6))

    def doubled(x, t):
        eps = model(x, t)
        return torch.cat([eps, torch.ones_like(eps)], dim=1)

    torch.testing.assert_close(
        dpm_solver_sample(doubled, noise, diffusion, 10),
        dpm_solver_sample(model, noise, diffusion, 10),
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_recovers_x0_with_exact_velocity(x0, shift):
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    calls = []

    def velocity(x, t_model):
        calls.append(float(t_model[0]))
        t = (t_model / 1000.0).view(-1, 1, 1, 1)
        eps = (x - (1 - t) * x0) / t
        return torch.cat([eps - x0, torch.zeros_like(x0)], dim=1)

    out = flow_euler_sample(velocity, noise, 10, shift=shift)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    expected_t = flow_timesteps(10, shift)[:-1] * 1000
    torch.testing.assert_close(torch.tensor(calls, dtype=torch.float64), expected_t)


def test_cfg_wrapper_combines_halves():
    b = 3
    x = torch.randn(b, 4, 2, 2)
    t = torch.full((b,), 10.0)
    seen = {}

    def model_fn(xx, tt):
        seen["x"], seen["t"] = xx, tt
        half = xx.shape[0] // 2
        cond = torch.cat([xx[:half] + 1.0, torch.full_like(xx[:half], 7.0)], dim=1)
        uncond = torch.cat([xx[half:] - 1.0, torch.full_like(xx[half:], -7.0)], dim=1)
        return torch.cat([cond, uncond], dim=0)

    out = cfg_model_fn(model_fn, 4.0)(x, t)
    assert torch.equal(seen["x"], torch.cat([x, x])) and torch.equal(seen["t"], torch.cat([t, t]))
    # uncond + s (cond - uncond) = (x - 1) + 4 * 2
    torch.testing.assert_close(out[:, :4], x + 7.0)
    torch.testing.assert_close(out[:, 4:], torch.full_like(x, 7.0))
    torch.testing.assert_close(cfg_model_fn(model_fn, 1.0)(x, t)[:, :4], x + 1.0)


def test_known_elements_stay_pinned(diffusion):
    model = _smooth_fn(2 * SHAPE[1])
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(9))
    known = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(10))
    mask = torch.zeros(1, 1, SHAPE[2], 1)
    mask[:, :, 0] = 1
    seen = []

    def spy(x, t):
        seen.append(x[:, :, 0].clone())
        return model(x, t)

    out = ddpm_sample(
        spy, noise, diffusion, 5, generator=torch.Generator(), known_x0=known, known_mask=mask
    )
    assert torch.equal(out[:, :, 0], known[:, :, 0])
    assert all(torch.equal(s, known[:, :, 0]) for s in seen)
    assert not torch.equal(out[:, :, 1:], known[:, :, 1:])


def test_sample_dispatch(diffusion, x0):
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    cfg = DiffusionConfig()
    out = sample(cfg, _exact_eps_fn(diffusion, x0), noise, 15, sampler="dpm++2m")
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        sample(cfg, _exact_eps_fn(diffusion, x0), noise, 5, sampler="euler")
