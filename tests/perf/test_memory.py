"""The memory estimate against the real model: parameters counted on the built (sharded) model,
activations against the bytes autograd keeps (``SavedTensorBytes``) on 1- and 2-rank layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.perf.memory import (
    GIB,
    estimate_memory,
    layer_activation_terms,
    param_count,
)
from tests.dist_utils import run_distributed

SMALL = dict(name="Lumos-S/2", latent_size=16, depth=2, hidden_size=128, num_heads=4)

# (model overrides) measured on one rank
SINGLE = [
    dict(variant="i2i"),
    dict(variant="i2i", pos_embed="rope", qk_norm=True),
    dict(variant="i2i", norm="rmsnorm", adaln_type="single"),
    dict(variant="t2i", cond_tokens=120, cond_channels=4096, cross_attn_gate=True),
    dict(
        variant="t2i",
        hidden_size=192,
        num_heads=4,
        cond_tokens=120,
        cond_channels=4096,
        use_size_conditioning=True,
    ),
    dict(variant="nvs"),
    dict(variant="i2i", recompute="full"),
    dict(variant="i2i", depth=4, recompute="full", recompute_num_layers=2),
    dict(variant="i2i", recompute="selective"),
    dict(variant="i2v", num_frames=4),
    dict(variant="i2v", num_frames=4, video_attention="full_3d", recompute="full"),
]
# (parallel, model overrides) measured on two ranks
LAYOUTS = [
    (dict(tp=2), dict(variant="i2i")),
    (dict(tp=2, sequence_parallel=True), dict(variant="t2i", cond_tokens=120, cond_channels=4096)),
    (dict(tp=2, sequence_parallel=True), dict(variant="i2v", num_frames=4)),
    (dict(cp=2), dict(variant="i2i", pos_embed="rope")),
    (dict(cp=2), dict(variant="i2v", num_frames=4)),
    (dict(cp=2), dict(variant="i2v", num_frames=4, video_attention="full_3d")),
]


def _model(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, "precision": "fp32", "cond_tokens": 1, **kw})


def _measure(rank: int, world: int, jobs: list[tuple[dict, dict]]) -> list[dict]:
    """Build each job's model on this rank, count its parameters and the bytes one training
    forward (``DiffusionForwardStep``, the trainer's step) keeps for backward."""
    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.perf.memory import SavedTensorBytes
    from lumos_mcore.training.setup import build_model
    from lumos_mcore.training.step import DiffusionForwardStep, with_positions

    out = []
    for parallel_kw, model_kw in jobs:
        mcfg, pcfg = _model(**model_kw), ParallelConfig(**parallel_kw)
        initialize_parallel(
            pcfg,
            num_attention_heads=mcfg.num_heads_,
            num_layers=mcfg.depth_,
            seed=0,
            seq_len=mcfg.num_tokens,
        )
        chunks, _ = build_model(mcfg, pcfg, seed=0)
        g = torch.Generator().manual_seed(0)
        frames = () if mcfg.num_frames == 1 else (mcfg.num_frames,)
        batch = {
            "latent": torch.randn(1, 4, *frames, 16, 16, generator=g),
            "cond": torch.randn(1, mcfg.cond_tokens, mcfg.cond_channels, generator=g),
        }
        if mcfg.variant == "nvs":
            batch["input_latent"] = torch.randn(1, 4, 16, 16, generator=g)
            batch["camera"] = torch.randn(1, mcfg.camera_dim, generator=g)
        if mcfg.use_size_conditioning:
            batch["resolution"] = torch.tensor([[128.0, 128.0]])
            batch["aspect_ratio"] = torch.tensor([[1.0]])
        fstep = DiffusionForwardStep(
            build_objective(DiffusionConfig()), seed=0, cond_dropout=0.0, device=torch.device("cpu")
        )
        it = with_positions(
            iter([batch]),
            start_step=0,
            num_microbatches=1,
            global_batch_size=1,
            dp_rank=0,
            dp_size=1,
        )
        params = [p for c in chunks for p in c.parameters()]
        with SavedTensorBytes(params) as saved:
            fstep(it, chunks[0])
        out.append({"saved": saved.total, "params": sum(p.numel() for p in params)})
    return out


@pytest.fixture(scope="module")
def single_rank() -> list[dict]:
    jobs = [({}, kw) for kw in SINGLE]
    (res,) = run_distributed(_measure, 1, jobs, timeout=300)
    return res


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    return run_distributed(_measure, 2, LAYOUTS, timeout=300)


@pytest.mark.parametrize("i", range(len(SINGLE)), ids=[str(kw) for kw in SINGLE])
def test_single_rank_estimate_matches_the_model(single_rank, i):
    mcfg, pcfg = _model(**SINGLE[i]), ParallelConfig()
    est = estimate_memory(mcfg, pcfg, bf16=False)
    assert est.num_params == single_rank[i]["params"]  # exact
    measured = single_rank[i]["saved"]
    assert est.activations == pytest.approx(measured, rel=0.01), (est.layer_terms, measured)


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=[str(job) for job in LAYOUTS])
def test_two_rank_layouts_match_the_model_on_every_rank(two_ranks, i):
    parallel_kw, model_kw = LAYOUTS[i]
    mcfg, pcfg = _model(**model_kw), ParallelConfig(**parallel_kw)
    est = estimate_memory(mcfg, pcfg, bf16=False)
    for rank_results in two_ranks:
        assert est.num_params == rank_results[i]["params"]
        assert est.activations == pytest.approx(rank_results[i]["saved"], rel=0.01)


def test_parallelism_divides_the_per_rank_activations():
    """The properties the parallel layouts exist for, read off the count (XL/2 I2V, 16K)."""
    mcfg = ModelConfig(name="Lumos-XL/2", variant="i2v", num_frames=16, latent_size=64)
    assert mcfg.num_tokens == 16384
    base = estimate_memory(mcfg, ParallelConfig()).activations
    cp2 = estimate_memory(mcfg, ParallelConfig(cp=2)).activations
    tp2 = estimate_memory(mcfg, ParallelConfig(tp=2)).activations
    tp2sp = estimate_memory(mcfg, ParallelConfig(tp=2, sequence_parallel=True)).activations
    assert cp2 == pytest.approx(base / 2, rel=0.01)
    assert tp2sp == pytest.approx(base / 2, rel=0.02)
    assert base / 2 < tp2 < base  # without SP the norms and residuals stay replicated
    full = estimate_memory(dataclasses.replace(mcfg, recompute="full"), ParallelConfig())
    assert full.activations < base / 15  # one [s, b, h] input per layer instead of ~20


def test_static_memory_follows_dtype_and_distributed_optimizer():
    mcfg = ModelConfig(name="Lumos-XL/2")
    n = estimate_memory(mcfg, ParallelConfig()).num_params
    # 28 blocks of 22 D^2 (DiT-XL/2's 18 D^2 + the cross-attention's q, k, v, out)
    assert n == pytest.approx(28 * 22 * 1152**2, rel=0.02)
    bf16 = estimate_memory(mcfg, ParallelConfig(), dp=8)
    assert (bf16.params, bf16.grads, bf16.optimizer, bf16.ema) == (2 * n, 4 * n, 12 * n, 4 * n)
    dist = estimate_memory(mcfg, ParallelConfig(use_distributed_optimizer=True), dp=8)
    assert dist.optimizer == 12 * n // 8
    # megatron shards the distributed optimizer over DP x CP (the gradients' reduce group).
    cp = estimate_memory(mcfg, ParallelConfig(cp=2, use_distributed_optimizer=True), dp=4)
    assert cp.optimizer == 12 * n // 8
    fp32 = estimate_memory(mcfg, ParallelConfig(), bf16=False, ema=False)
    assert (fp32.params, fp32.optimizer, fp32.ema) == (4 * n, 8 * n, 0)


def test_param_count_per_pipeline_stage():
    mcfg = _model(variant="i2i", depth=4)
    first = param_count(mcfg, ParallelConfig(pp=2), stage=0)
    last = param_count(mcfg, ParallelConfig(pp=2), stage=1)
    whole = param_count(mcfg, ParallelConfig())
    assert first.layers == last.layers == 2
    assert first.final == 0 and last.embed == 0
    assert first.cond == last.cond  # every stage embeds the timestep and the condition
    assert first.total + last.total - first.cond == whole.total


def test_pipeline_in_flight_micro_batches_follow_megatrons_warm_up():
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    class _Group:
        def __init__(self, size: int) -> None:
            self._size = size

        def size(self) -> int:
            return self._size

        def rank(self) -> int:
            return 0  # the first stage holds the most

    class _Comm:
        def __init__(self, pp: int, vpp: int | None) -> None:
            self.pp_group = _Group(pp)
            self.virtual_pipeline_model_parallel_size = vpp

    mcfg = _model(variant="i2i", depth=8)
    one = layer_activation_terms(mcfg, ParallelConfig(), act_bytes=4)
    for pp, vpp, m in [(2, None, 1), (2, None, 8), (4, None, 8), (2, 2, 4), (4, 2, 8)]:
        _, _, warmup, _ = get_pp_rank_microbatches(
            m, vpp or 1, pp, forward_only=False, p2p_communicator=_Comm(pp, vpp)
        )
        expected = min(warmup + 1, m * (vpp or 1))
        est = estimate_memory(mcfg, ParallelConfig(pp=pp, vpp=vpp), num_microbatches=m, bf16=False)
        assert est.in_flight == expected, (pp, vpp, m)
        chunk_layers = 8 // pp // (vpp or 1)
        assert est.activations >= expected * chunk_layers * sum(one.values())


def test_triton_norm_keeps_one_tensor_fewer_and_fp8_halves_linear_inputs():
    mcfg = ModelConfig(name="Lumos-XL/2", latent_size=64)
    torch_terms = layer_activation_terms(mcfg, ParallelConfig(), kernels="torch")
    triton_terms = layer_activation_terms(mcfg, ParallelConfig(), kernels="triton")
    s, d = mcfg.num_tokens, mcfg.hidden_size_
    assert torch_terms["norm1_modulate"] - triton_terms["norm1_modulate"] == s * d * 2
    fp8 = ModelConfig(name="Lumos-XL/2", latent_size=64, fp8="tensorwise", precision="bf16")
    fp8_terms = layer_activation_terms(fp8, ParallelConfig())
    assert fp8_terms["mlp"] < torch_terms["mlp"]
    assert sum(fp8_terms.values()) < sum(torch_terms.values())


def test_xl2_video_at_64k_tokens_fits_one_80gb_gpu_only_with_recompute():
    """The planning question of the long-video target: Lumos-XL/2 I2V at 64K tokens per sample
    (16 latent frames at 128 x 128, i.e. 512 px) on one 80 GiB GPU in bf16."""
    kw = dict(name="Lumos-XL/2", variant="i2v", num_frames=16, latent_size=128)
    assert ModelConfig(**kw).num_tokens == 65536
    plain = estimate_memory(ModelConfig(**kw), ParallelConfig())
    full = estimate_memory(ModelConfig(**kw, recompute="full"), ParallelConfig())
    capacity = 80 * GIB
    assert not plain.fits(capacity)
    assert full.fits(capacity)
    assert full.total < 0.5 * plain.total


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kernels="):
        layer_activation_terms(_model(), ParallelConfig(), kernels="cuda")
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        estimate_memory(_model(), ParallelConfig(), micro_batch_size=0)


def test_summary_line_uses_a_readable_unit():
    small = estimate_memory(_model(), ParallelConfig(), bf16=False).summary()
    assert small.endswith(" MiB") and "total 0.00" not in small
    big = estimate_memory(ModelConfig(name="Lumos-XL/2"), ParallelConfig()).summary()
    assert big.endswith(" GiB") and "params 1.5" in big  # 822M bf16 weights
