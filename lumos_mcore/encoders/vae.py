"""Frozen diffusers ``AutoencoderKL``: pixels in [-1, 1] -> scaled latents (video: per frame)."""

from __future__ import annotations

import torch

from lumos_mcore.encoders.common import freeze, resolve_device, resolve_dtype


class FrozenVAE:
    """Encodes images ``[B, 3, H, W]`` to ``[B, C, H/f, W/f]`` and videos ``[B, 3, T, H, W]`` to
    ``[B, C, T, H/f, W/f]`` (each frame through the 2-D VAE, as the Lumos I2V setup does).

    Latents are ``(z - shift_factor) * scaling_factor`` with the factors from the VAE config
    (``scaling_factor`` overridable); ``sampling="mode"`` takes the posterior mean,
    ``"sample"`` a posterior draw seeded per sample so the result does not depend on batching.
    """

    def __init__(
        self,
        path: str,
        *,
        subfolder: str = "",
        sampling: str = "mode",
        scaling_factor: float | None = None,
        batch: int = 16,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "fp32",
    ) -> None:
        from diffusers import AutoencoderKL

        if sampling not in ("mode", "sample"):
            raise ValueError(f"media.encoders.vae_sampling={sampling!r}: choose mode or sample")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        vae = AutoencoderKL.from_pretrained(
            path, torch_dtype=self.dtype, low_cpu_mem_usage=False, **kwargs
        )
        self.vae = freeze(vae.to(device=self.device))
        cfg = self.vae.config
        self.scaling_factor = float(scaling_factor or getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.sampling = sampling
        self.batch = batch

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, seeds: list[int] | None = None) -> torch.Tensor:
        """Scaled latents (float32) for images or videos; ``seeds`` (one per sample) are needed
        for ``sampling="sample"``."""
        if pixels.dim() not in (4, 5) or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels shape {tuple(pixels.shape)}: expected [B, 3, H, W] or [B, 3, T, H, W]"
            )
        b = pixels.shape[0]
        video = pixels.dim() == 5
        t = pixels.shape[2] if video else 1
        frames = pixels.transpose(1, 2).reshape(b * t, 3, *pixels.shape[-2:]) if video else pixels
        frames = frames.to(device=self.device, dtype=self.dtype)  # [B*T, 3, H, W]
        noise = None
        if self.sampling == "sample":
            if seeds is None or len(seeds) != b:
                raise ValueError("vae_sampling='sample' needs one seed per sample")
            h, w = frames.shape[-2] // self.downsample, frames.shape[-1] // self.downsample
            noise = torch.stack(
                [
                    torch.randn(
                        (t, self.latent_channels, h, w), generator=torch.Generator().manual_seed(s)
                    )
                    for s in seeds
                ]
            ).reshape(b * t, self.latent_channels, h, w)  # [B*T, C, h, w]
        outs = []
        for i in range(0, b * t, self.batch):
            dist = self.vae.encode(frames[i : i + self.batch]).latent_dist
            if noise is None:
                z = dist.mode()  # [n, C, h, w]
            else:
                eps = noise[i : i + self.batch].to(device=self.device, dtype=dist.mean.dtype)
                z = dist.mean + dist.std * eps  # [n, C, h, w]
            outs.append((z.float() - self.shift_factor) * self.scaling_factor)
        z = torch.cat(outs)  # [B*T, C, h, w]
        if video:
            z = z.reshape(b, t, *z.shape[1:]).transpose(1, 2).contiguous()  # [B, C, T, h, w]
        return z
