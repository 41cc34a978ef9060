"""Lumos-I2V under context parallelism (alone, with TP+SP, with PP) equals the CP=1 run.

Same pattern as ``test_dit_parallel``: every layout runs the real training path — megatron DDP,
``get_forward_backward_func`` with micro-batches, ``DiffusionForwardStep`` with its per-sample
draws (first-frame conditioning, condition dropout, token-block noise) — on gloo ranks from the
same randomised full weights; losses, outputs and every gradient must match the single-process
run to 1e-5. To stay quick, one 1-rank spawn computes all references and one 4-rank spawn runs
every (model, layout) job, rebuilding megatron's parallel state between jobs.

Covered: full 3-D attention and spatial + temporal attention (3 frames over 2 CP ranks: shards
cut a frame, so the per-frame attention gathers too), Flag-DiT options (RoPE, QK-norm, RMSNorm,
gated cross-attention), the zig-zag CP layout, and packs of mixed-size samples split over CP.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

BASE = dict(name="Lumos-Tiny/2", variant="i2v", latent_size=8, cond_tokens=3, cond_channels=48)
MODELS = {
    "full3d": dict(BASE, num_frames=4, video_attention="full_3d"),
    "st": dict(BASE, num_frames=3, video_attention="spatial_temporal"),
    "st_flag": dict(
        BASE,
        num_frames=4,
        pos_embed="rope",
        qk_norm=True,
        norm="rmsnorm",
        cross_attn_gate=True,
    ),
    "full3d_zigzag": dict(BASE, num_frames=4, video_attention="full_3d", cp_layout="zigzag"),
}
GLOBAL_BATCH, MICRO_BATCH, SEED = 4, 2, 7
# Packs: (frames, latent H, latent W, condition tokens) per sample; two packs per step.
PACKS = [[(3, 8, 8, 3), (1, 8, 12, 2), (2, 4, 8, 1)], [(2, 8, 8, 2), (1, 4, 4, 3), (3, 4, 8, 3)]]


def make_dense_batch(model_kw: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, t, s = GLOBAL_BATCH, model_kw["num_frames"], model_kw["latent_size"]
    return {
        "latent": torch.randn(n, 4, t, s, s, generator=g),
        "cond": torch.randn(n, model_kw["cond_tokens"], model_kw["cond_channels"], generator=g),
    }


def make_packs(model_kw: dict) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    packs, pos = [], 0
    for spec in PACKS:
        lat, cond = [], []
        for t, h, w, lc in spec:
            x = torch.randn(4, t, h, w, generator=g)
            lat.append(x if t > 1 else x[:, 0])  # images as [C, H, W]
            cond.append(torch.randn(lc, model_kw["cond_channels"], generator=g))
        packs.append({"latent": lat, "cond": cond, "position": torch.arange(pos, pos + len(spec))})
        pos += len(spec)
    return packs


def _run_job(layout, model_kw, data, full_sd):
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

    packed = isinstance(data, list)
    if packed:  # one pack per micro-batch, split over DP
        per_rank = len(data) // info.dp_size
        micro = data[info.dp_rank * per_rank : (info.dp_rank + 1) * per_rank]
        nmb, mbs, seq = len(micro), 1, None
    else:
        per_rank = GLOBAL_BATCH // info.dp_size
        nmb, mbs, seq = per_rank // MICRO_BATCH, MICRO_BATCH, mcfg.num_tokens
        mine = {
            k: v[info.dp_rank * per_rank : (info.dp_rank + 1) * per_rank] for k, v in data.items()
        }
        micro = [{k: v[m * mbs : (m + 1) * mbs] for k, v in mine.items()} for m in range(nmb)]

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
    for chunk in chunks:
        chunk.zero_grad_buffer()
    losses = fwd_bwd(
        forward_step_func=fstep,
        data_iterator=positioned(),
        model=chunks,
        num_microbatches=nmb,
        seq_length=seq or 1,
        micro_batch_size=mbs,
        forward_only=False,
    )
    index = []

    def capture(data_iterator, model):
        output, loss_fn = fstep(data_iterator, model)
        index.append(loss_fn.keywords["prep"].layout.local_index.clone())
        return output, None

    outputs = fwd_bwd(
        forward_step_func=capture,
        data_iterator=positioned(),
        model=chunks,
        num_microbatches=nmb,
        seq_length=seq or 1,
        micro_batch_size=mbs,
        forward_only=True,
    )
    model = unwrap(chunks[0])
    grads = local_shards(model, {n: p.main_grad for n, p in model.named_parameters()})
    last = info.is_last_stage and info.tp_rank == 0
    return {
        "dp_rank": info.dp_rank,
        "cp_rank": info.cp_rank,
        "loss": [float(x["loss"]) for x in losses] if last else None,
        "out": [o.detach() for o in outputs] if last else None,
        "index": index if last else None,
        "grads": grads,
        "state": {n: p.detach().clone() for n, p in model.named_parameters()}
        if full_sd is None
        else None,
    }


def _rank_fn(rank, world, jobs):
    return [_run_job(*job) for job in jobs]


def _assemble_outputs(results: list[dict], dp_size: int) -> list[torch.Tensor]:
    """Full per-micro-batch outputs from the CP ranks' shards, in DP order."""
    outs = []
    for dp in range(dp_size):
        ranks = [r for r in results if r["out"] is not None and r["dp_rank"] == dp]
        for m in range(len(ranks[0]["out"])):
            total = sum(r["out"][m].shape[1] for r in ranks)
            ref = ranks[0]["out"][m]
            full = ref.new_zeros(ref.shape[0], total, ref.shape[2])
            for r in ranks:
                full[:, r["index"][m]] = r["out"][m]
            outs.append(full)
    return outs


def _check(ref: dict, results: list[dict], dp_size: int, cp_size: int) -> None:
    from lumos_mcore.models.dit.state_dict import assemble

    # Loss: each CP rank reports cp * its share; the mean over CP ranks is the full loss.
    losses = []
    for dp in range(dp_size):
        ranks = [r for r in results if r["loss"] is not None and r["dp_rank"] == dp]
        assert len(ranks) == cp_size
        losses += [sum(v) / cp_size for v in zip(*(r["loss"] for r in ranks))]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-6
    )
    for got, want in zip(_assemble_outputs(results, dp_size), ref["out"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = assemble([r["grads"] for r in results if r["dp_rank"] == 0 and r["cp_rank"] == 0])
    ref_grads = {k: v[0] for k, v in ref["grads"].items()}
    assert full.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0 or "y_embedding" in name, f"reference grad of {name} is zero"
        err = (full[name] - grad).abs().max() / grad.abs().max().clamp(min=1e-6)
        assert err < 1e-5, f"{name}: max relative grad error {err:.2e}"


LAYOUTS = {
    "cp2_dp2": dict(cp=2),
    "cp2_tp2_sp": dict(cp=2, tp=2, sequence_parallel=True),
    "cp2_pp2": dict(cp=2, pp=2),
}
# (model, data, layout) jobs of the 4-rank spawn.
JOBS = [
    (model, "dense", layout)
    for model in ("full3d", "st")
    for layout in ("cp2_dp2", "cp2_tp2_sp", "cp2_pp2")
] + [
    ("st_flag", "dense", "cp2_tp2_sp"),
    ("full3d_zigzag", "dense", "cp2_dp2"),
    ("full3d", "packed", "cp2_dp2"),
    ("st", "packed", "cp2_dp2"),
    ("full3d_zigzag", "packed", "cp2_dp2"),
]


@pytest.fixture(scope="module")
def parallel_runs():
    data = {}
    for model, kind, _ in JOBS:
        data[(model, kind)] = (
            make_packs(MODELS[model]) if kind == "packed" else make_dense_batch(MODELS[model])
        )
    keys = list(data)
    (refs,) = run_distributed(
        _rank_fn, 1, [({}, MODELS[m], data[(m, k)], None) for m, k in keys], timeout=300
    )
    refs = dict(zip(keys, refs))
    jobs = [
        (LAYOUTS[layout], MODELS[m], data[(m, k)], refs[(m, k)]["state"]) for m, k, layout in JOBS
    ]
    per_rank = run_distributed(_rank_fn, 4, jobs, timeout=420)
    runs = {}
    for i, (m, k, layout) in enumerate(JOBS):
        runs[(m, k, layout)] = (refs[(m, k)], [rank_results[i] for rank_results in per_rank])
    return runs


@pytest.mark.parametrize("job", JOBS, ids=["-".join(j) for j in JOBS])
def test_cp_layout_matches_single_process(parallel_runs, job):
    ref, results = parallel_runs[job]
    kw = LAYOUTS[job[2]]
    dp = 4 // (kw.get("tp", 1) * kw.get("pp", 1) * kw["cp"])
    _check(ref, results, dp, kw["cp"])
