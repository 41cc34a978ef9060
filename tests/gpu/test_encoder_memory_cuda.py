"""The frozen-encoder memory model on CUDA: an SD-shaped ``AutoencoderKL`` (random weights, built
from its architecture alone) encodes 512 px frames; the bytes ``torch.cuda.max_memory_allocated``
sees above the weights and input stay near ``vae_encode_peak_bytes`` (cuDNN convolution
workspaces and the caching allocator's rounding are what the CPU check cannot see)."""

from __future__ import annotations

import logging

import pytest
import torch

from lumos_mcore.perf.encoder_memory import vae_encode_peak_bytes
from tests.gpu.helpers import requires_cuda

pytestmark = requires_cuda

SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    norm_num_groups=32,
)


@pytest.mark.parametrize(("dtype", "nbytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_sd_vae_encode_peak_near_the_estimate(dtype, nbytes):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE).to("cuda", dtype).eval().requires_grad_(False)
    frames, side = 4, 512
    x = torch.randn(frames, 3, side, side, device="cuda", dtype=dtype)
    with torch.no_grad():
        vae.encode(x[:1])  # cuDNN autotuning / lazy init outside the measured call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        vae.encode(x).latent_dist.mode()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    est = vae_encode_peak_bytes(SD_VAE, frames=frames, height=side, width=side, dtype_bytes=nbytes)
    logging.getLogger(__name__).info(
        "encoder memory: SD VAE %s, 4 x 512 px: measured %.0f MiB, estimate %.0f MiB, ratio %.3f",
        dtype,
        measured / 2**20,
        est / 2**20,
        measured / est,
    )
    assert 0.8 * est <= measured <= 1.3 * est, (measured, est)
