"""megatron DDP and the distributed optimizer on CUDA (nccl): DP=2 equals DP=1.

Both runs build the same weights (CPU initialisation from one seed), take the same global
batch (DP=2: half on each rank) through megatron's no-pipelining schedule and take two AdamW
steps; losses and parameter updates must agree within bf16 tolerance. Adam's epsilon is large
(1e-2) so that an update is a smooth function of the gradient: with the usual 1e-8 the first
steps are ``lr * sign(g)`` and bf16 noise on near-zero gradients flips signs. A single-GPU run
checks the same machinery (buffers, grad reduction in fp32, optimizer sharding) on one device.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.gpu.helpers import requires_2_gpus, requires_cuda, tiny_model_kwargs

KW = tiny_model_kwargs()
GLOBAL_BATCH, STEPS = 4, 2


def _train_rank(rank, world, use_distributed_optimizer):
    import torch.nn.functional as F
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import OptimConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model, build_optimizer, unwrap
    from tests.gpu.helpers import tiny_batch

    pcfg = ParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    mcfg = ModelConfig(**KW)
    info = initialize_parallel(pcfg, num_attention_heads=mcfg.num_heads_, num_layers=mcfg.depth_)
    chunks, _ = build_model(mcfg, pcfg, seed=3)
    optimizer, _ = build_optimizer(
        chunks,
        OptimConfig(lr=1e-3, eps=1e-2, warmup_steps=0, clip_grad=1.0),
        bf16=True,
        use_distributed_optimizer=use_distributed_optimizer,
        total_steps=STEPS,
    )
    init = {n: p.detach().float().cpu() for n, p in unwrap(chunks[0]).named_parameters()}
    full = tiny_batch(KW, batch=GLOBAL_BATCH)
    full["target"] = torch.randn(
        GLOBAL_BATCH, 8, 16, 16, generator=torch.Generator().manual_seed(4)
    ).cuda()
    per = GLOBAL_BATCH // info.dp_size
    mine = {k: v[info.dp_rank * per : (info.dp_rank + 1) * per] for k, v in full.items()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["latents"], b["timesteps"], b["cond"])

        def loss_func(output):
            loss = F.mse_loss(output.float(), b["target"])
            return loss, {"loss": loss.detach()}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    losses = []
    for _ in range(STEPS):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter([mine]),
            model=chunks,
            num_microbatches=1,
            seq_length=mcfg.num_tokens,
            micro_batch_size=per,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok and torch.isfinite(torch.tensor(float(grad_norm)))
        losses.append(float(out[0]["loss"]))
    params = {n: p.detach().float().cpu() for n, p in unwrap(chunks[0]).named_parameters()}
    return {"losses": losses, "init": init, "params": params, "dp_rank": info.dp_rank}


def _compare(ref, results):
    mean_loss = [sum(r["losses"][i] for r in results) / len(results) for i in range(STEPS)]
    for got, want in zip(mean_loss, ref["losses"]):
        assert abs(got - want) <= 2e-2 * abs(want), (mean_loss, ref["losses"])
    for r in results:
        for name, p in ref["params"].items():
            assert torch.equal(r["init"][name], ref["init"][name]), f"{name}: different init"
            want = p - ref["init"][name]  # the update of two steps
            got = r["params"][name] - r["init"][name]
            if want.norm() < 1e-8:
                assert got.norm() < 1e-6, f"dp_rank {r['dp_rank']} {name}: moved, reference did not"
                continue
            err = (got - want).norm() / want.norm()
            assert err < 5e-2, f"dp_rank {r['dp_rank']} {name}: update rel err {err:.3g}"


@requires_cuda
@pytest.mark.parametrize("distopt", [False, True], ids=["ddp", "distributed_optimizer"])
def test_single_gpu_ddp_step(distopt):
    (res,) = run_distributed(_train_rank, 1, distopt, timeout=300)
    assert res["losses"][-1] < res["losses"][0] * 1.5  # finite and not diverging
    assert all(torch.isfinite(p).all() for p in res["params"].values())


@requires_cuda
@requires_2_gpus
@pytest.mark.parametrize("distopt", [False, True], ids=["ddp", "distributed_optimizer"])
def test_dp2_matches_dp1(distopt):
    (ref,) = run_distributed(_train_rank, 1, distopt, timeout=300)
    results = run_distributed(_train_rank, 2, distopt, timeout=300)
    _compare(ref, results)
