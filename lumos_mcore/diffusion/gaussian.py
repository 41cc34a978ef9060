"""Discrete-time Gaussian diffusion as trained by DiT, PixArt-alpha and Lumos (IDDPM).

The model predicts ε and, with ``learn_sigma``, a second set of C channels ``v`` in [-1, 1] that
interpolates the reverse-process log-variance between log β̃_t (posterior, lower bound) and
log β_t (upper bound): ``log σ² = (v+1)/2 · log β_t + (1-(v+1)/2) · log β̃_t``.

Training loss (DiT ``LossType.RESCALED_MSE`` with ``ModelVarType.LEARNED_RANGE``, which for 1000
steps equals plain ``MSE``): ``MSE(ε) + vlb_weight · VB · T/1000`` where VB is, in bits, the KL from
the true posterior ``q(x_{t-1} | x_t, x_0)`` to the model's ``p(x_{t-1} | x_t)`` — or at t = 0 the
discretized Gaussian negative log-likelihood of x_0 — computed with the ε prediction *detached*, so
the VB term trains only the variance channels.

Schedules are kept in float64 (as in the original code) and cast per use to the computation dtype,
which is float32 for float32/bf16/fp16 data (what the original's ``_extract_into_tensor`` does) and
float64 for float64 data (used by the reference tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.objective import (
    DiffusionObjective,
    broadcast_to_batch,
    masked_mean,
    split_channels,
)


def get_betas(
    schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """β_1..β_T in float64 for the named schedule (``linear`` is DDPM/DiT's, 1e-4 → 0.02)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        )
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"diffusion.beta_schedule={schedule!r}: unknown schedule")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Original-process timesteps kept when respacing to fewer sampling steps (DiT / IDDPM).

    ``section_counts`` splits [0, T) into equal sections and strides each evenly so that both ends
    are kept, e.g. ``space_timesteps(1000, [250])``; ``"ddimN"`` uses DDIM's fixed integer stride.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps: set[int] = set()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return sorted(steps)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """tanh approximation of Φ(x) used by the original IDDPM decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of data in [-1, 1] quantised to 256 bins under N(means, e^2·log_scales).

    Edge bins (x < -0.999, x > 0.999) integrate the tail, as in the original code.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


class GaussianDiffusion(DiffusionObjective):
    """DDPM objective and reverse-process maths over a (possibly respaced) β schedule.

    ``timestep_map`` is set on respaced copies made for sampling: index ``i`` of the respaced
    process is original timestep ``timestep_map[i]``, which is what the model is conditioned on.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        learn_sigma: bool = True,
        vlb_weight: float = 1.0,
        timestep_map: Sequence[int] | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError("betas must be a 1-D schedule with at least 2 steps")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.learn_sigma = learn_sigma
        self.vlb_weight = float(vlb_weight)
        self.num_timesteps = int(betas.numel())
        self.original_num_steps = original_num_steps or self.num_timesteps
        self.num_train_timesteps = self.original_num_steps
        self.timestep_map = (
            torch.as_tensor(list(timestep_map), dtype=torch.long)
            if timestep_map is not None
            else torch.arange(self.num_timesteps, dtype=torch.long)
        )

        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        fixed_large_var = torch.cat([post_var[1:2], betas[1:]])
        self._buffers: dict[str, Tensor] = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t=0; clip its log to the t=1 value (as the original)
            "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "log_betas": betas.log(),
            "fixed_large_log_variance": fixed_large_var.log(),
        }
        self._device_cache: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        """Build the training process from ``diffusion.*`` settings."""
        betas = get_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        return cls(betas, learn_sigma=cfg.learn_sigma, vlb_weight=cfg.vlb_weight)

    def respace(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """A process over a subset of this one's timesteps with the same ᾱ at the kept steps."""
        keep = sorted(set(int(i) for i in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps})")
        ac = self._buffers["alphas_cumprod"][keep]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        new_betas = 1.0 - ac / ac_prev
        base_map = self.timestep_map[keep]
        return GaussianDiffusion(
            new_betas,
            learn_sigma=self.learn_sigma,
            vlb_weight=self.vlb_weight,
            timestep_map=base_map.tolist(),
            original_num_steps=self.original_num_steps,
        )

    def buffer(self, name: str) -> Tensor:
        """A float64 CPU schedule buffer (``alphas_cumprod``, ``posterior_variance``, ...)."""
        return self._buffers[name]

    def _extract(self, name: str, t: Tensor, ref: Tensor) -> Tensor:
        """Gather schedule values at ``t`` as ``[B, 1, ...]`` in ``ref``'s computation dtype."""
        device = ref.device
        bufs = self._device_cache.get(device)
        if bufs is None:
            bufs = {k: v.to(device) for k, v in self._buffers.items()}
            self._device_cache[device] = bufs
        dtype = torch.promote_types(ref.dtype, torch.float32)
        vals = bufs[name][t.to(device=device, dtype=torch.long)].to(dtype)  # [B]
        return broadcast_to_batch(vals, ref.ndim)

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    # ---- DiffusionObjective -----------------------------------------------------------------

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in [0, T) (long ``[B]``)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=device
        )

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, computed in at least float32."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        dtype = self._compute_dtype(x0)
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0.to(dtype) + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * noise.to(dtype)  # [B, C, ...]

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original-process timestep index as float (DiT feeds the raw index to its embedder)."""
        return self.timestep_map.to(t.device)[t.long()].float()

    def loss_terms(
        self,
        model_output: Tensor,
        *,
        x0: Tensor,
        x_t: Tensor,
        noise: Tensor,
        t: Tensor,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``mse`` (ε), ``vb`` (bits, when σ is learned) and their sum ``loss``, each ``[B]``."""
        dtype = self._compute_dtype(x0)
        channels = x0.shape[1]
        eps_pred, var_values = split_channels(model_output.to(dtype), channels)
        if self.learn_sigma and var_values is None:
            raise ValueError(
                f"diffusion.learn_sigma=True needs {2 * channels} output channels, "
                f"got {model_output.shape[1]}"
            )
        if not self.learn_sigma and var_values is not None:
            raise ValueError(
                f"diffusion.learn_sigma=False needs {channels} output channels, "
                f"got {model_output.shape[1]}"
            )
        t = t.to(x0.device).long()
        terms = {"mse": masked_mean((noise.to(dtype) - eps_pred) ** 2, mask)}
        if var_values is not None:
            # the VB term must not move the mean prediction: detach ε, keep v differentiable
            vb = self.vb_terms_bpd(
                torch.cat([eps_pred.detach(), var_values], dim=1), x0=x0, x_t=x_t, t=t, mask=mask
            )
            terms["vb"] = vb * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + self.vlb_weight * terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # ---- process maths ----------------------------------------------------------------------

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        dtype = self._compute_dtype(x_t)
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0.to(dtype) + self._extract(
            "posterior_mean_coef2", t, x_t
        ) * x_t.to(dtype)
        var = self._extract("posterior_variance", t, x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, var, log_var  # [B, C, ...], [B, 1, ...], [B, 1, ...]

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = x_t / sqrt(ᾱ_t) - sqrt(1/ᾱ_t - 1)·ε."""
        dtype = self._compute_dtype(x_t)
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t.to(dtype) - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps.to(dtype)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Reverse-step Gaussian p(x_{t-1} | x_t) from a model output (ε [+ v]) at index ``t``.

        Returns ``mean``, ``log_variance`` and ``pred_x0``; without learned σ the variance is
        DiT's "fixed large" choice (β_t, with β̃_1 at t = 0).
        """
        dtype = self._compute_dtype(x_t)
        eps, var_values = split_channels(model_output.to(dtype), x_t.shape[1])
        t = t.to(x_t.device).long()
        if var_values is not None and self.learn_sigma:
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log  # [B, C, ...]
        else:
            log_variance = self._extract("fixed_large_log_variance", t, x_t).expand_as(eps)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}

    def vb_terms_bpd(
        self,
        model_output: Tensor,
        *,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Per-sample VLB term in bits: KL(q || p) for t > 0, decoder NLL of x0 at t = 0."""
        dtype = self._compute_dtype(x0)
        t = t.to(x0.device).long()
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])  # [B, C, ...]
        nll = -discretized_gaussian_log_likelihood(
            x0.to(dtype), means=out["mean"], log_scales=0.5 * out["log_variance"]
        )  # [B, C, ...]
        first = broadcast_to_batch(t == 0, x0.ndim)
        per_elem = torch.where(first, nll, kl) / math.log(2.0)
        return masked_mean(per_elem, mask)  # [B]
