"""The interface every training objective implements, and shared tensor helpers.

The training step is written once against this interface::

    obj = build_objective(cfg)                           # DiffusionConfig -> DiffusionObjective
    t = obj.sample_timesteps(batch_size, generator=g)    # [B] (long for DDPM, float for flow)
    x_t = obj.add_noise(x0, noise, t)                    # [B, C, ...]
    model_t = obj.model_timesteps(t)                     # [B] float in [0, 1000) for the embedder
    loss = obj.loss(model_output, x0=x0, x_t=x_t, noise=noise, t=t, mask=None)  # [B]

Every tensor argument is ``[B, C, *spatial]`` with any number of trailing dims (images
``[B, C, H, W]``, video ``[B, C, T, H, W]``); ``t`` is ``[B]`` and is moved to the data's device,
so timesteps may be drawn from a CPU generator (identical on every context-parallel shard of a
sample) while the latents live on the accelerator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lumos_mcore.config.diffusion import DiffusionConfig


def broadcast_to_batch(values: Tensor, ndim: int) -> Tensor:
    """View a per-sample ``[B]`` tensor as ``[B, 1, ..., 1]`` so it broadcasts against ``ndim`` dims."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample mean of ``values`` over the elements where ``mask`` is nonzero.

    ``mask`` broadcasts against ``values`` (e.g. ``[B, 1, T, 1, 1]`` for a per-frame mask); a sample
    with no kept element gets 0 rather than NaN so a fully-conditioned sample cannot poison the batch.
    """
    dims = list(range(1, values.ndim))
    if mask is None:
        return values.mean(dim=dims)  # [B]
    mask = mask.to(device=values.device, dtype=values.dtype).expand_as(values)
    total = (values * mask).sum(dim=dims)  # [B]
    count = mask.sum(dim=dims)  # [B]
    return total / count.clamp(min=1.0)


def split_channels(model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """Split a denoiser output into its first ``channels`` channels and the rest (or None).

    Accepts ``C`` or ``2C`` output channels; anything else is a wiring error worth a loud message.
    """
    out_ch = model_output.shape[1]
    if out_ch == channels:
        return model_output, None
    if out_ch == 2 * channels:
        first, rest = torch.split(model_output, channels, dim=1)
        return first, rest
    raise ValueError(
        f"model output has {out_ch} channels; expected {channels} or {2 * channels} "
        f"for {channels}-channel latents"
    )


class DiffusionObjective(ABC):
    """Noise process + loss of one training objective (DDPM ε/σ or flow matching)."""

    num_train_timesteps: int

    @abstractmethod
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw training timesteps ``[B]`` in the objective's own units, on the generator's device."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample ``x_t`` from ``q(x_t | x0)`` with the given noise; same shape as ``x0``."""

    @abstractmethod
    def model_timesteps(self, t: Tensor) -> Tensor:
        """Map objective timesteps to the float ``[B]`` values the timestep embedder sees."""

    @abstractmethod
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
        """Per-sample ``[B]`` loss terms; key ``"loss"`` is the total that is optimised."""

    def loss(
        self,
        model_output: Tensor,
        *,
        x0: Tensor,
        x_t: Tensor,
        noise: Tensor,
        t: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Per-sample ``[B]`` training loss: mean over the elements ``mask`` keeps (1 = counts)."""
        return self.loss_terms(model_output, x0=x0, x_t=x_t, noise=noise, t=t, mask=mask)["loss"]


def build_objective(cfg: DiffusionConfig) -> DiffusionObjective:
    """Instantiate the objective named by ``cfg.objective``."""
    if cfg.objective == "ddpm":
        from lumos_mcore.diffusion.gaussian import GaussianDiffusion

        return GaussianDiffusion.from_config(cfg)
    if cfg.objective == "flow":
        from lumos_mcore.diffusion.flow import FlowMatching

        return FlowMatching.from_config(cfg)
    raise ValueError(f"diffusion.objective={cfg.objective!r}: unknown objective")
