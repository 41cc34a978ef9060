"""The cross-attention's single-token path is taken only where it is exact."""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed

MODEL = dict(name="Lumos-Tiny/2", latent_size=8, cond_tokens=1, cond_channels=48)


def _rank_fn(rank, world):
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model

    mcfg = ModelConfig(**MODEL)
    initialize_parallel(ParallelConfig(), num_attention_heads=mcfg.num_heads_, num_layers=2)
    (model,), _ = build_model(mcfg, ParallelConfig(), seed=0, wrap_ddp=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = []
    for layer in model.decoder.layers:
        layer.cross_attention.linear_q.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 1, 48, generator=g)
    with torch.no_grad():
        fast = model(x, t, cond)  # no mask: single-token path
        n_fast = len(calls)
        full = model(x, t, cond, torch.ones(2, 1, dtype=torch.bool))  # mask: general path
        n_full = len(calls) - n_fast
        two = model(x, t, torch.cat([cond, cond], dim=1))  # two tokens: general path
    return fast, full, two, n_fast, n_full, len(model.decoder.layers)


def test_shortcut_taken_for_one_unmasked_token_only():
    ((fast, full, two, n_fast, n_full, depth),) = run_distributed(_rank_fn, 1)
    assert n_fast == 0  # the query projection never ran
    assert n_full == depth
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    # Two copies of the token: attention averages equal values -> the same output again.
    torch.testing.assert_close(fast, two, rtol=1e-5, atol=1e-6)
