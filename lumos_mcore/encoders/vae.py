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
        frames, shape = self.flatten_frames(pixels)  # [B*T, 3, H, W]
        noise = self.frame_noise(seeds, pixels)  # [B*T, C, h, w] or None
        return self.unflatten_latents(self.encode_frames(frames, noise), shape)

    @staticmethod
    def flatten_frames(pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``[B, 3, H, W]`` or ``[B, 3, T, H, W]`` -> frames ``[B*T, 3, H, W]`` (frame-major per
        sample) and the input shape, for :meth:`unflatten_latents`."""
        if pixels.dim() not in (4, 5) or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels shape {tuple(pixels.shape)}: expected [B, 3, H, W] or [B, 3, T, H, W]"
            )
        if pixels.dim() == 4:
            return pixels, tuple(pixels.shape)
        b, _, t = pixels.shape[:3]
        return pixels.transpose(1, 2).reshape(b * t, 3, *pixels.shape[-2:]), tuple(pixels.shape)

    def unflatten_latents(self, z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Frame latents ``[B*T, C, h, w]`` -> ``[B, C, h, w]`` or ``[B, C, T, h, w]``."""
        if len(shape) == 4:
            return z
        b, t = shape[0], shape[2]
        return z.reshape(b, t, *z.shape[1:]).transpose(1, 2).contiguous()  # [B, C, T, h, w]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one frame's latent."""
        return self.latent_channels, height // self.downsample, width // self.downsample

    def frame_noise(self, seeds: list[int] | None, pixels: torch.Tensor) -> torch.Tensor | None:
        """Posterior noise ``[B*T, C, h, w]`` for ``sampling="sample"`` (None for ``mode``),
        drawn per sample from its seed: independent of batching, and of which rank encodes
        which frames when a replica splits them."""
        if self.sampling != "sample":
            return None
        b = pixels.shape[0]
        t = pixels.shape[2] if pixels.dim() == 5 else 1
        if seeds is None or len(seeds) != b:
            raise ValueError("vae_sampling='sample' needs one seed per sample")
        c, h, w = self.latent_shape(*pixels.shape[-2:])
        return torch.stack(
            [torch.randn((t, c, h, w), generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).reshape(b * t, c, h, w)  # [B*T, C, h, w]

    @torch.no_grad()
    def encode_frames(
        self, frames: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled float32 latents ``[F, C, h, w]`` of frames ``[F, 3, H, W]``, ``vae_batch``
        frames per VAE call; ``noise`` ``[F, C, h, w]`` for ``sampling="sample"``."""
        if self.sampling == "sample" and noise is None:
            raise ValueError("vae_sampling='sample' needs the frames' noise (frame_noise)")
        c, h, w = self.latent_shape(*frames.shape[-2:])
        if frames.shape[0] == 0:
            return torch.empty((0, c, h, w), dtype=torch.float32, device=self.device)
        frames = frames.to(device=self.device, dtype=self.dtype)  # [F, 3, H, W]
        outs = []
        for i in range(0, frames.shape[0], self.batch):
            dist = self.vae.encode(frames[i : i + self.batch]).latent_dist
            if noise is None:
                z = dist.mode()  # [n, C, h, w]
            else:
                eps = noise[i : i + self.batch].to(device=self.device, dtype=dist.mean.dtype)
                z = dist.mean + dist.std * eps  # [n, C, h, w]
            outs.append((z.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(outs)  # [F, C, h, w]
