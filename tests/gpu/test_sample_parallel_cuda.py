"""``lumos_mcore.sample`` on CUDA in bf16: on one GPU (the one-process model, the HF class
``LumosTransformer3DModel``) and as one context-parallel megatron I2V model over two GPUs (nccl;
TE spec when it imports).

Flow matching with Euler steps keeps a random model's samples O(1), so bf16 rounding stays
visible as a small relative error: on CPU, emulated in bf16, one process is 2e-3 from fp32 and
CP=2 is 1e-3 from one process (``tests/test_sample_parallel.py`` holds the fp32 equalities).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.dist_utils import run_distributed
from tests.gpu.helpers import rel_err, requires_2_gpus, requires_cuda
from tests.test_sample_parallel import LATENT, _sample, _write_checkpoint

FLOW = ["--sampler", "euler", "--steps", "4", "--cfg-scale", "1.5", "diffusion.objective=flow"]


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cuda")
    run_distributed(_write_checkpoint, 1, str(root / "ckpt"), "full_3d")
    g = torch.Generator().manual_seed(11)
    np.save(root / "cond.npy", torch.randn(2, 4, 16, generator=g).numpy())
    np.save(root / "first.npy", torch.randn(2, 4, LATENT, LATENT, generator=g).numpy())
    # the fp32 CPU reference, in a process that sees no GPU (gloo, the CPU backend)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # spawned children copy the environment
    try:
        run_distributed(_sample, 1, str(root / "ckpt"), str(root), "cpu", FLOW)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return root


def _generated(root, tag) -> torch.Tensor:
    lat = torch.from_numpy(np.load(root / tag / "latents.npy"))
    return lat[:, :, 1:]  # frame 0 is the input latent in every run


@requires_cuda
def test_bf16_sampling_on_one_gpu_matches_cpu_fp32(flow_checkpoint):
    root = flow_checkpoint
    run_distributed(_sample, 1, str(root / "ckpt"), str(root), "gpu", [*FLOW, "--dtype", "bf16"])
    assert rel_err(_generated(root, "gpu"), _generated(root, "cpu")) < 3e-2


@requires_2_gpus
def test_cp2_sampling_over_two_gpus_matches_one_gpu(flow_checkpoint):
    root = flow_checkpoint
    one = [*FLOW, "--dtype", "bf16"]
    run_distributed(_sample, 1, str(root / "ckpt"), str(root), "gpu1", one)
    run_distributed(_sample, 2, str(root / "ckpt"), str(root), "gpu_cp2", [*one, "--cp", "2"])
    assert rel_err(_generated(root, "gpu_cp2"), _generated(root, "gpu1")) < 2e-2
