"""Flow matching (rectified flow) as in Lumina-T2X / SD3.

Path ``x_t = (1 - t)·x0 + t·ε`` for t in (0, 1): t = 0 is data, t = 1 is noise. The model predicts
the velocity ``dx_t/dt = ε - x0``. Training timesteps are logit-normal, ``t = sigmoid(n)`` with
``n ~ N(flow_logit_mean, flow_logit_std²)``, which concentrates training on intermediate noise
levels where the velocity is hardest to predict. The timestep embedder sees ``t · T`` with
``T = num_train_timesteps`` so the DDPM-trained embedder's input range is kept.

A model with a learned-σ head (2C output channels) is accepted: only the first C channels are the
velocity; the rest are ignored (see ``lumos_mcore.config.diffusion``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.objective import (
    DiffusionObjective,
    broadcast_to_batch,
    masked_mean,
    split_channels,
)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution-dependent time shift t' = s·t / (1 + (s-1)·t); s > 1 spends more steps near noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class FlowMatching(DiffusionObjective):
    """Linear-path flow matching with a velocity target."""

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.shift = float(shift)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> FlowMatching:
        """Build from ``diffusion.*`` settings."""
        return cls(
            num_train_timesteps=cfg.num_train_timesteps,
            logit_mean=cfg.flow_logit_mean,
            logit_std=cfg.flow_logit_std,
            shift=cfg.flow_shift,
        )

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Logit-normal t in (0, 1), then shifted by ``shift`` (float32 ``[B]``).

        The shift moves training time toward noise exactly as it bends the sampling grid
        (SD3's resolution-dependent shift is applied to both), so one setting means one thing.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        n = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return shift_time(torch.sigmoid(n * self.logit_std + self.logit_mean), self.shift)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t)·x0 + t·ε."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        dtype = torch.promote_types(x0.dtype, torch.float32)
        tb = broadcast_to_batch(t.to(device=x0.device, dtype=dtype), x0.ndim)  # [B, 1, ...]
        return (1.0 - tb) * x0.to(dtype) + tb * noise.to(dtype)  # [B, C, ...]

    def model_timesteps(self, t: Tensor) -> Tensor:
        """t·T as float, the embedder's input."""
        return t.float() * self.num_train_timesteps

    def velocity_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """v = ε - x0 (constant along the straight path)."""
        return noise - x0

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
        """``loss`` = per-sample masked MSE between predicted and true velocity, ``[B]``."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        v_pred, _ = split_channels(model_output.to(dtype), x0.shape[1])
        target = self.velocity_target(x0.to(dtype), noise.to(dtype))
        mse = masked_mean((v_pred - target) ** 2, mask)
        return {"mse": mse, "loss": mse}
