"""Pipeline layouts start from the same weights and clip by the same gradient norm.

Each stage builds only its layers, so initial weights are seeded per layer (not drawn from one
running generator), and the timestep / condition embedders replicated on every (virtual) stage
start equal. After megatron's ``finalize_model_grads`` those replicas hold the full gradient;
counted on every stage they would inflate the norm (and clip harder) at PP > 1.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

MODEL = dict(name="Lumos-Tiny/2", latent_size=8, cond_tokens=4, cond_channels=48)
BATCH, MICRO = 4, 1


def _grad_norm(rank, world, layout):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import OptimConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model, build_optimizer
    from lumos_mcore.training.step import DiffusionForwardStep, with_positions

    pcfg, mcfg = ParallelConfig(**layout), ModelConfig(**MODEL)
    initialize_parallel(pcfg, num_attention_heads=mcfg.num_heads_, num_layers=mcfg.depth_, seed=3)
    chunks, _ = build_model(mcfg, pcfg, seed=3)
    optimizer, _ = build_optimizer(
        chunks,
        OptimConfig(warmup_steps=0),
        bf16=False,
        use_distributed_optimizer=False,
        total_steps=1,
    )
    g = torch.Generator().manual_seed(0)
    micro = [
        {"latent": torch.randn(MICRO, 4, 8, 8, generator=g), "cond": torch.randn(MICRO, 4, 48)}
        for _ in range(BATCH // MICRO)
    ]
    step = DiffusionForwardStep(
        build_objective(DiffusionConfig()), seed=3, cond_dropout=0.0, device=torch.device("cpu")
    )

    def batches():
        return with_positions(
            iter([dict(b) for b in micro]),
            start_step=0,
            num_microbatches=len(micro),
            global_batch_size=BATCH,
            dp_rank=0,
            dp_size=1,
        )

    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=[batches() for _ in chunks] if len(chunks) > 1 else batches(),
        model=chunks,
        num_microbatches=len(micro),
        seq_length=mcfg.num_tokens,
        micro_batch_size=MICRO,
        forward_only=False,
    )
    from lumos_mcore.models.dit.state_dict import local_shards
    from lumos_mcore.training.setup import unwrap

    weights = []  # one dict per (virtual) stage: replicated embedders appear in each
    for chunk in chunks:
        model = unwrap(chunk)
        weights.append(local_shards(model, {n: p.detach() for n, p in model.named_parameters()}))
    _, grad_norm, _ = optimizer.step()
    return float(grad_norm), weights


@pytest.fixture(scope="module")
def reference():
    (ref,) = run_distributed(_grad_norm, 1, {})
    return ref


@pytest.mark.parametrize("layout", [dict(pp=2), dict(pp=2, vpp=2)], ids=["pp2", "pp2_vpp2"])
def test_pipeline_init_and_grad_norm_equal_single_process(reference, layout):
    ref_norm, ref_weights = reference
    results = run_distributed(_grad_norm, 2, layout)
    (ref_weights,) = ref_weights
    for _, chunks in results:  # every replica of every embedder, every layer
        for weights in chunks:
            for name, (w, *_) in weights.items():
                assert torch.equal(w, ref_weights[name][0]), name
    norms = [n for n, _ in results]
    assert norms[0] == pytest.approx(norms[1], rel=1e-12)  # every stage clips alike
    assert norms[0] == pytest.approx(ref_norm, rel=1e-5)
