"""Samplers over a denoiser callable ``model_fn(x, t_model) -> output``.

``x`` is ``[B, C, ...]``; ``t_model`` is the float ``[B]`` timestep the embedder sees (the original
DDPM index, or ``t·T`` for flow); ``output`` has C channels (ε or velocity) or 2C (plus the learned
σ interpolation, used only by the DDPM ancestral sampler).

* ``ddpm_sample`` — ancestral sampling with learned σ, respaced to N steps exactly like DiT's
  ``space_timesteps(T, [N])`` (evenly strided, both ends kept). No noise is added on the last step
  (DiT draws it and multiplies by zero; skipping the draw keeps the generator stream identical to
  diffusers' ``DDPMScheduler``).
* ``dpm_solver_sample`` — DPM-Solver++(2M), data-prediction multistep with the midpoint update,
  first-order on the first step and the last step goes to σ = 0 (returns the x0 prediction).
  Timesteps follow diffusers' ``DPMSolverMultistepScheduler`` ``timestep_spacing`` ("linspace" by
  default — the diffusers default — or "leading" / "trailing"), so results match diffusers with
  ``algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"``.
* ``flow_euler_sample`` — Euler on the flow ODE from t = 1 to 0 over ``linspace(1, 0, N+1)``
  shifted by ``t' = s·t / (1 + (s-1)·t)``.

``known_x0`` / ``known_mask`` (mask 1 = element held to ``known_x0``) pin clean condition elements,
e.g. the first video frame in image-to-video, before every model call and in the result. All
samplers are deterministic given the input noise and, for DDPM, the ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.flow import shift_time
from lumos_mcore.diffusion.gaussian import GaussianDiffusion, space_timesteps
from lumos_mcore.diffusion.objective import split_channels

ModelFn = Callable[[Tensor, Tensor], Tensor]

SAMPLERS = ("ddpm", "dpm++2m", "euler")


def cfg_model_fn(model_fn: ModelFn, scale: float, guided_channels: int | None = None) -> ModelFn:
    """Classifier-free guidance over a doubled batch.

    The returned function takes ``x`` ``[B, ...]`` and calls ``model_fn`` once on
    ``cat([x, x])`` — the wrapped ``model_fn`` must condition its first half on the condition and its
    second half on the null condition. The first ``guided_channels`` output channels (default: the
    input's C, i.e. ε or velocity) become ``uncond + scale·(cond - uncond)``; remaining channels
    (learned σ) are taken from the conditional half.
    """

    def guided(x: Tensor, t_model: Tensor) -> Tensor:
        out = model_fn(torch.cat([x, x], dim=0), torch.cat([t_model, t_model], dim=0))  # [2B, ...]
        cond, uncond = out.chunk(2, dim=0)  # [B, C_out, ...] each
        c = guided_channels if guided_channels is not None else x.shape[1]
        mixed = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([mixed, cond[:, c:]], dim=1)  # [B, C_out, ...]

    return guided


def _pin(x: Tensor, known_x0: Tensor | None, known_mask: Tensor | None) -> Tensor:
    """Overwrite the known (condition) elements of ``x`` with their clean values."""
    if known_mask is None:
        return x
    if known_x0 is None:
        raise ValueError("known_mask needs known_x0")
    keep = known_mask.to(device=x.device).bool()
    return torch.where(keep, known_x0.to(device=x.device, dtype=x.dtype), x)


def _full(batch: int, value: float, device: torch.device) -> Tensor:
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    num_steps: int | str | None = None,
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    known_x0: Tensor | None = None,
    known_mask: Tensor | None = None,
) -> Tensor:
    """Ancestral DDPM sampling from ``noise`` (x_T) with DiT respacing to ``num_steps``.

    ``num_steps`` may also be a DiT section string ("10,15,20" or "ddim50"); None = all T steps.
    Per-step noise comes from ``generator`` (on its device) so runs are reproducible.
    """
    steps = diffusion.num_timesteps if num_steps is None else num_steps
    spaced = diffusion.respace(space_timesteps(diffusion.num_timesteps, steps))
    dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(dtype)
    batch = x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    for i in reversed(range(spaced.num_timesteps)):
        x = _pin(x, known_x0, known_mask)
        t = torch.full((batch,), i, dtype=torch.long, device=x.device)
        out = model_fn(x, spaced.model_timesteps(t))  # [B, C or 2C, ...]
        pm = spaced.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
        x = pm["mean"]
        if i > 0:
            z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
            x = x + torch.exp(0.5 * pm["log_variance"]) * z.to(x.device)
    return _pin(x, known_x0, known_mask).to(noise.dtype)


def dpm_solver_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "linspace"
) -> list[int]:
    """Decreasing integer timesteps as diffusers' DPMSolverMultistepScheduler picks them."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {num_train_timesteps}]")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = num_train_timesteps // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1]
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.arange(num_train_timesteps, 0, -ratio).round() - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}: choose linspace, leading or trailing")
    return [int(v) for v in ts]


@torch.no_grad()
def dpm_solver_sample(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    num_steps: int = 20,
    *,
    timestep_spacing: str = "linspace",
    timesteps: Sequence[int] | None = None,
    known_x0: Tensor | None = None,
    known_mask: Tensor | None = None,
) -> Tensor:
    """DPM-Solver++(2M) on an ε-prediction model; deterministic.

    With x_t = α_t·x0 + σ_t·ε and λ = log(α/σ), each step from s to t (h = λ_t - λ_s) is
    ``x_t = (σ_t/σ_s)·x_s - α_t·(e^{-h} - 1)·D`` with ``D = x0_s`` on the first step and
    ``D = x0_s + (x0_s - x0_prev) / (2r)``, ``r = h_prev / h`` afterwards. ``timesteps`` overrides
    the spacing with explicit decreasing indices.
    """
    ts = (
        [int(v) for v in timesteps]
        if timesteps is not None
        else dpm_solver_timesteps(diffusion.num_timesteps, num_steps, timestep_spacing)
    )
    ac = diffusion.buffer("alphas_cumprod")
    alpha = [math.sqrt(float(ac[t])) for t in ts]
    sigma = [math.sqrt(1.0 - float(ac[t])) for t in ts]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(dtype)
    batch = x.shape[0]
    prev_x0: Tensor | None = None
    for i, t in enumerate(ts):
        x = _pin(x, known_x0, known_mask)
        t_model = _full(batch, float(diffusion.timestep_map[t]), x.device)
        eps, _ = split_channels(model_fn(x, t_model).to(dtype), x.shape[1])  # [B, C, ...]
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i == len(ts) - 1:
            x = x0  # final step to σ = 0: the first-order update reduces to the x0 prediction
            break
        h = lam[i + 1] - lam[i]
        ratio = sigma[i + 1] / sigma[i]
        coef = -alpha[i + 1] * math.expm1(-h)  # -α_t (e^{-h} - 1)
        if prev_x0 is None:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + (0.5 / r) * (x0 - prev_x0)
        x = ratio * x + coef * d
        prev_x0 = x0
    return _pin(x, known_x0, known_mask).to(noise.dtype)


def flow_timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` decreasing times from 1 to 0 (float64), shifted by ``shift``."""
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def flow_euler_sample(
    model_fn: ModelFn,
    noise: Tensor,
    num_steps: int = 50,
    *,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    known_x0: Tensor | None = None,
    known_mask: Tensor | None = None,
) -> Tensor:
    """Euler integration of dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data)."""
    ts = flow_timesteps(num_steps, shift).tolist()
    dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(dtype)
    batch = x.shape[0]
    for i in range(num_steps):
        x = _pin(x, known_x0, known_mask)
        t_model = _full(batch, ts[i] * num_train_timesteps, x.device)
        v, _ = split_channels(model_fn(x, t_model).to(dtype), x.shape[1])  # [B, C, ...]
        x = x + (ts[i + 1] - ts[i]) * v
    return _pin(x, known_x0, known_mask).to(noise.dtype)


def sample(
    cfg: DiffusionConfig,
    model_fn: ModelFn,
    noise: Tensor,
    num_steps: int,
    *,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    known_x0: Tensor | None = None,
    known_mask: Tensor | None = None,
) -> Tensor:
    """Sample with the sampler that fits ``cfg.objective`` (default: ``ddpm`` / ``euler``).

    With ``guidance_scale`` the ``model_fn`` is wrapped by ``cfg_model_fn`` and must accept the
    doubled batch (conditional first half, null-conditioned second half).
    """
    name = sampler or ("ddpm" if cfg.objective == "ddpm" else "euler")
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: choose one of {', '.join(SAMPLERS)}")
    if (name == "euler") != (cfg.objective == "flow"):
        raise ValueError(f"sampler={name!r} does not fit diffusion.objective={cfg.objective!r}")
    fn = cfg_model_fn(model_fn, guidance_scale) if guidance_scale is not None else model_fn
    if name == "euler":
        return flow_euler_sample(
            fn,
            noise,
            num_steps,
            shift=cfg.flow_shift,
            num_train_timesteps=cfg.num_train_timesteps,
            known_x0=known_x0,
            known_mask=known_mask,
        )
    diffusion = GaussianDiffusion.from_config(cfg)
    if name == "ddpm":
        return ddpm_sample(
            fn,
            noise,
            diffusion,
            num_steps,
            generator=generator,
            known_x0=known_x0,
            known_mask=known_mask,
        )
    return dpm_solver_sample(
        fn, noise, diffusion, num_steps, known_x0=known_x0, known_mask=known_mask
    )
