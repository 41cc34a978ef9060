"""megatron's torch AdamW fallback runs as torch's fused kernel, with the same update."""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed


def _two_steps(rank, world):
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import OptimConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model, build_optimizer

    mcfg = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_tokens=1, cond_channels=16)
    initialize_parallel(ParallelConfig(), num_attention_heads=mcfg.num_heads_, num_layers=2)
    results, flags = [], []
    for fused in (True, False):
        chunks, _ = build_model(mcfg, ParallelConfig(), seed=0)
        opt, _ = build_optimizer(
            chunks,
            OptimConfig(lr=1e-2, warmup_steps=0),
            bf16=False,
            use_distributed_optimizer=False,
            total_steps=2,
        )
        groups = opt.optimizer.param_groups
        flags.append([g["fused"] for g in groups])
        if not fused:  # the per-tensor reference path
            for g in groups:
                g["fused"] = False
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in chunks[0].parameters():
                p.main_grad.copy_(torch.randn(p.shape, generator=g))
            opt.step()
        results.append({n: p.detach().clone() for n, p in chunks[0].named_parameters()})
    return results, flags


def test_fused_adamw_matches_the_per_tensor_update():
    ((results, flags),) = run_distributed(_two_steps, 1)
    assert all(flags[0]) and flags[0]  # build_optimizer switched every group to fused
    fused, reference = results
    for name, w in reference.items():
        torch.testing.assert_close(fused[name], w, rtol=1e-5, atol=1e-6, msg=name)
