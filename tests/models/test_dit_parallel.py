"""LumosDiT under TP / TP+SP / PP / DP / TP x PP equals the single-process model.

Every layout runs the real training path — megatron DDP, ``get_forward_backward_func`` with
micro-batches, the diffusion forward step with its per-sample draws — on gloo ranks, starting
from the same (randomised) full weights. Loss, model outputs and every parameter gradient
(reassembled from the TP shards and PP stages) must match the single-process run to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

# DINO patch tokens (with a single CLS token the softmax over keys is constant and the
# query/key grads of cross-attention vanish, leaving nothing to compare).
I2I = dict(name="Lumos-Tiny/2", latent_size=8, cond_tokens=4, cond_channels=48)
T2I = dict(
    name="Lumos-Tiny/2",
    variant="t2i",
    latent_size=8,
    hidden_size=96,
    cond_tokens=6,
    cond_channels=32,
    adaln_type="single",
    use_size_conditioning=True,
)
# One DINO CLS token: the cross-attention takes its exact single-token path (proj(V(cond))).
CLS = dict(I2I, cond_tokens=1)
GLOBAL_BATCH, MICRO_BATCH, SEED = 4, 2, 7


def make_batch(model_kw: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, lc, cc = GLOBAL_BATCH, model_kw["cond_tokens"], model_kw["cond_channels"]
    size = model_kw["latent_size"]
    batch = {
        "latent": torch.randn(n, 4, size, size, generator=g),
        "cond": torch.randn(n, lc, cc, generator=g),
    }
    if model_kw.get("variant") == "t2i":
        mask = torch.ones(n, lc, dtype=torch.bool)
        mask[0, 3:] = False  # padded caption tokens
        mask[2, 1:] = False
        batch["cond_mask"] = mask
        batch["resolution"] = torch.tensor([[256.0, 256.0]]).repeat(n, 1)
        batch["aspect_ratio"] = torch.ones(n, 1)
    return batch


def _rank_fn(rank, world, layout, model_kw, full_sd, batch):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.models.dit.state_dict import load_full_state_dict, local_shards
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model, unwrap
    from lumos_mcore.training.step import DiffusionForwardStep, with_positions

    pcfg, mcfg = ParallelConfig(**layout), ModelConfig(**model_kw)
    info = initialize_parallel(
        pcfg, num_attention_heads=mcfg.num_heads_, num_layers=mcfg.depth_, seed=SEED
    )
    chunks, _ = build_model(mcfg, pcfg, seed=SEED)
    if full_sd is None:  # the reference run: randomise every weight so no path is zero
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in unwrap(chunks[0]).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    else:
        for chunk in chunks:
            load_full_state_dict(unwrap(chunk), full_sd)

    per_rank = GLOBAL_BATCH // info.dp_size
    nmb = per_rank // MICRO_BATCH
    mine = {k: v[info.dp_rank * per_rank : (info.dp_rank + 1) * per_rank] for k, v in batch.items()}
    micro = [
        {k: v[m * MICRO_BATCH : (m + 1) * MICRO_BATCH] for k, v in mine.items()} for m in range(nmb)
    ]

    def positioned():
        return with_positions(
            iter([dict(b) for b in micro]),
            start_step=0,
            num_microbatches=nmb,
            global_batch_size=GLOBAL_BATCH,
            dp_rank=info.dp_rank,
            dp_size=info.dp_size,
        )

    objective = build_objective(DiffusionConfig())
    fstep = DiffusionForwardStep(objective, seed=SEED, cond_dropout=0.5, device=torch.device("cpu"))
    fwd_bwd = get_forward_backward_func()
    seq = mcfg.num_tokens
    iters = [positioned() for _ in chunks] if len(chunks) > 1 else positioned()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    losses = fwd_bwd(
        forward_step_func=fstep,
        data_iterator=iters,
        model=chunks,
        num_microbatches=nmb,
        seq_length=seq,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )

    def capture(data_iterator, model):
        output, _ = fstep(data_iterator, model)
        return output, None

    outputs = fwd_bwd(
        forward_step_func=capture,
        data_iterator=[positioned() for _ in chunks] if len(chunks) > 1 else positioned(),
        model=chunks,
        num_microbatches=nmb,
        seq_length=seq,
        micro_batch_size=MICRO_BATCH,
        forward_only=True,
    )
    shards = {}
    state = {}
    for chunk in chunks:
        model = unwrap(chunk)
        grads = {n: p.main_grad for n, p in model.named_parameters()}
        shards.update(local_shards(model, grads))
        if full_sd is None:
            state.update({n: p.detach().clone() for n, p in model.named_parameters()})
    last = info.is_last_stage and info.tp_rank == 0
    return {
        "dp_rank": info.dp_rank,
        "loss": [float(x["loss"]) for x in losses] if last else None,
        "out": torch.cat([o.detach() for o in outputs]) if last else None,
        "grads": shards,
        "state": state,
    }


def _reference(model_kw, batch):
    (ref,) = run_distributed(_rank_fn, 1, {}, model_kw, None, batch)
    return ref


@pytest.fixture(scope="module")
def i2i_reference():
    batch = make_batch(I2I)
    return batch, _reference(I2I, batch)


@pytest.fixture(scope="module")
def t2i_reference():
    batch = make_batch(T2I)
    return batch, _reference(T2I, batch)


@pytest.fixture(scope="module")
def cls_reference():
    batch = make_batch(CLS)
    return batch, _reference(CLS, batch)


def _check(ref, results, dp_size, zero_ok=("y_embedding",)):
    from lumos_mcore.models.dit.state_dict import assemble

    # Losses / outputs: the DP ranks' pieces in order form the reference sequence.
    by_dp = sorted((r for r in results if r["loss"] is not None), key=lambda r: r["dp_rank"])
    assert len(by_dp) == dp_size
    loss = [x for r in by_dp for x in r["loss"]]
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-6)
    out = torch.cat([r["out"] for r in by_dp])
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    # Gradients: after DDP they are identical on all DP ranks; assemble from dp_rank 0.
    full = assemble([r["grads"] for r in results if r["dp_rank"] == 0])
    ref_grads = {k: v[0] for k, v in ref["grads"].items()}
    assert full.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        zero = any(k in name for k in zero_ok)
        assert grad.abs().sum() > 0 or zero, f"reference grad of {name} is zero"
        scale = grad.abs().max().clamp(min=1e-6)
        err = (full[name] - grad).abs().max() / scale
        assert err < 1e-5, f"{name}: max relative grad error {err:.2e}"


LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True)),
    "pp2": (2, dict(pp=2)),
    "dp2": (2, dict()),
    "tp2_pp2": (4, dict(tp=2, pp=2)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_i2i_layout_matches_single_process(i2i_reference, layout):
    batch, ref = i2i_reference
    world, kw = LAYOUTS[layout]
    results = run_distributed(_rank_fn, world, kw, I2I, ref["state"], batch)
    dp = world // (kw.get("tp", 1) * kw.get("pp", 1))
    _check(ref, results, dp)


def test_full_recompute_tp2_sp_matches_single_process(i2i_reference):
    """Full activation recompute (uniform, 1 layer per checkpoint) under TP=2 + SP."""
    batch, ref = i2i_reference
    model_kw = dict(I2I, recompute="full", recompute_method="uniform", recompute_num_layers=1)
    results = run_distributed(
        _rank_fn, 2, dict(tp=2, sequence_parallel=True), model_kw, ref["state"], batch
    )
    _check(ref, results, 1)


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2_vpp2"])
def test_t2i_adaln_single_matches_single_process(t2i_reference, layout):
    """adaLN-single, size conditioning and padded T5 tokens under SP and interleaved PP."""
    batch, ref = t2i_reference
    kw = {"tp2_sp": dict(tp=2, sequence_parallel=True), "pp2_vpp2": dict(pp=2, vpp=2)}[layout]
    results = run_distributed(_rank_fn, 2, kw, T2I, ref["state"], batch)
    _check(ref, results, 1)


# With one condition token softmax is constant: the query projection's gradient is exactly 0.
CLS_ZERO_OK = ("y_embedding", "cross_attention.linear_q")


def test_single_token_path_equals_general_cross_attention(cls_reference):
    """The shortcut equals megatron's full cross-attention (taken when a mask is passed)."""
    batch, ref = cls_reference
    masked = dict(batch, cond_mask=torch.ones(GLOBAL_BATCH, 1, dtype=torch.bool))
    general = _reference(CLS, masked)
    _check(ref, [general], 1, zero_ok=CLS_ZERO_OK)
    for name, grad in ref["grads"].items():
        if "cross_attention.linear_q" in name:
            assert torch.equal(grad[0], torch.zeros_like(grad[0])), name


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2, sequence_parallel=True), dict(overlap_grad_reduce=True)],
    ids=["tp2_sp", "dp2_overlap"],
)
def test_single_token_path_layouts_match_single_process(cls_reference, layout):
    """SP: the broadcast output's gradient is summed over TP ranks; overlapped DDP grad
    reduction runs with the query projections' (zero) gradients in their buckets."""
    batch, ref = cls_reference
    results = run_distributed(_rank_fn, 2, layout, CLS, ref["state"], batch)
    _check(ref, results, 1 if "tp" in layout else 2, zero_ok=CLS_ZERO_OK)
