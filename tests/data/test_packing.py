"""The packed data loader: packs of mixed images/videos within capacity, every sample of a step's
window exactly once, equal pack counts and balanced tokens over DP ranks, exact resume (also
with prefetch threads), DP-resize semantics, bad samples replaced (or dropped) and counted, config
errors, and
a loader pack whose loss equals the mean of its samples' unpacked losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.features import BadDataError, FeatureDataset
from lumos_mcore.data.packing import PackedMicroBatchIterator
from lumos_mcore.data.shards import LATENT, MEMBER_COLUMN
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from lumos_mcore.models.dit.packing import pack_by_tokens

# (frames, latent H, latent W): images (one frame) and videos, two resolutions.
SHAPES = [(1, 8, 8), (1, 8, 12), (3, 8, 8), (2, 4, 8)]
PATCH = 2
CAPACITY = 96  # largest sample: 3 * 4 * 4 = 48 tokens
GB = 12


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packing")
    return write_synthetic_feature_shards(
        root / "mixed",
        num_samples=48,
        shapes=SHAPES,
        latent_channels=4,
        cond_tokens=3,
        cond_dim=48,
        pad_cond=True,
        samples_per_shard=12,
        seed=3,
    )


def _ds(path: Path, **kw) -> FeatureDataset:
    kw.setdefault("num_workers", 0)
    return FeatureDataset(DataConfig(path=str(path), **kw))


def _it(ds, *, dp_rank=0, dp_size=2, consumed=0, **kw) -> PackedMicroBatchIterator:
    kw.setdefault("capacity", CAPACITY)
    kw.setdefault("patch_size", PATCH)
    return PackedMicroBatchIterator(
        ds,
        global_batch_size=kw.pop("global_batch_size", GB),
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed,
        **kw,
    )


def _tokens(batch: dict) -> int:
    return sum(int(np.prod(x.shape[1:])) // PATCH**2 for x in batch["latent"])


def _step(its) -> list[list[dict]]:
    return [it.next_global_batch() for it in its]


def test_synthetic_mixed_shapes(mixed):
    ds = _ds(mixed)
    shapes = {ds.latent_shape(i) for i in range(len(ds))}
    assert shapes == {(4, *s) for s in SHAPES}  # images stored as one-frame videos
    assert ds.get(0)["latent"].shape == ds.latent_shape(0)
    assert sorted(set(ds.token_counts(PATCH).tolist())) == [16, 24, 48]


def test_packs_fit_and_cover_each_window_once_dp2_balanced(mixed):
    ds = _ds(mixed)
    tokens = ds.token_counts(PATCH)
    its = [_it(ds, dp_rank=r) for r in range(2)]
    for step in range(8):  # two epochs
        per_rank = _step(its)
        window = its[0].order.indices(step * GB, GB).tolist()
        # Equal pack counts per DP rank (megatron's schedules need it).
        assert len(per_rank[0]) == len(per_rank[1]) >= 1
        seen, positions, loads = [], [], []
        for packs in per_rank:
            for b in packs:
                assert _tokens(b) <= CAPACITY
                assert len(b["latent"]) == len(b["cond"]) == len(b["position"])
                seen += b["index"].tolist()
                positions += b["position"].tolist()
            loads.append(sum(_tokens(b) for b in packs))
        assert sorted(seen) == sorted(window)  # every sample of the window exactly once
        assert sorted(positions) == list(range(step * GB, (step + 1) * GB))
        for p, i in zip(positions, seen):  # a sample keeps its stream position (noise seed)
            assert window[p - step * GB] == i
        # Balance bound: rank token loads differ by at most the window's largest sample.
        assert max(loads) - min(loads) <= max(tokens[window])
        # As few packs as first-fit decreasing needs, rounded up to a multiple of dp.
        ffd = len(pack_by_tokens(tokens[window].tolist(), CAPACITY))
        assert 2 * len(per_rank[0]) == -(-ffd // 2) * 2


def test_pack_format_matches_prepare_packed_inputs(mixed):
    ds = _ds(mixed)
    b = next(_it(ds, dp_size=1))
    assert isinstance(b["latent"], list) and b["position"].dtype == torch.long
    for x, c in zip(b["latent"], b["cond"]):
        assert x.ndim == 4 and x.shape[0] == 4  # [C, T, H, W]
        assert c.ndim == 2 and c.shape[1] == 48 and 1 <= c.shape[0] <= 3  # trailing pad cut
    if "cond_mask" in b:
        assert [m.shape[0] for m in b["cond_mask"]] == [c.shape[0] for c in b["cond"]]


def test_resume_mid_run_gives_identical_packs(mixed):
    ds = _ds(mixed)
    ref = _it(ds, dp_rank=1)
    for _ in range(2):
        ref.next_global_batch()
    n = ref.micro_batches_at(2 * GB)
    assert n > 1
    next(ref)  # mid-step: a partial global batch is replayed on resume
    state = ref.state_dict()
    assert state == {"consumed_samples": 2 * GB}
    for _ in range(n - 1):
        next(ref)
    want = [ref.next_global_batch() for _ in range(2)]  # steps 3 and 4
    for workers in (0, 2):  # prefetch threads give the same stream
        ds2 = _ds(mixed, num_workers=workers)
        with _it(ds2, dp_rank=1) as it:
            it.load_state_dict(state)
            it.next_global_batch()
            got = [it.next_global_batch() for _ in range(2)]
        for gs, ws in zip(got, want):
            assert len(gs) == len(ws)
            for g, w in zip(gs, ws):
                assert g["index"].tolist() == w["index"].tolist()
                assert g["position"].tolist() == w["position"].tolist()
                for a, c in zip(g["latent"] + g["cond"], w["latent"] + w["cond"]):
                    assert torch.equal(a, c)


def test_dp_resize_keeps_the_step_samples(mixed):
    ds = _ds(mixed)
    step = 3
    by_dp = {}
    for dp in (1, 2, 4):
        its = [_it(ds, dp_rank=r, dp_size=dp, consumed=step * GB) for r in range(dp)]
        got = sorted(
            (p, i)
            for packs in _step(its)
            for b in packs
            for p, i in zip(b["position"].tolist(), b["index"].tolist())
        )
        by_dp[dp] = got
        assert len({len(it.plan(step * GB).packs[0]) for it in its}) == 1
    assert by_dp[1] == by_dp[2] == by_dp[4]  # same samples at the same positions
    # Interleaved pipeline: packs per rank a multiple of pp, still the same samples.
    its = [_it(ds, dp_rank=r, micro_batch_multiple=2, consumed=step * GB) for r in range(2)]
    per_rank = _step(its)
    assert len(per_rank[0]) == len(per_rank[1]) and len(per_rank[0]) % 2 == 0
    got = sorted(
        (p, i)
        for ps in per_rank
        for b in ps
        for p, i in zip(b["position"].tolist(), b["index"].tolist())
    )
    assert got == by_dp[1]


def _corrupt(ds: FeatureDataset, index: int) -> None:
    """Overwrite the .npy magic of a sample's latent (an 'undecodable' sample)."""
    off = int(ds._offsets[index, MEMBER_COLUMN[LATENT]])
    with open(ds.shard_path(index), "r+b") as f:
        f.seek(off)
        f.write(b"BROKEN")


def _step_samples(packs: list[dict]) -> list[tuple[int, int]]:
    return sorted(
        (p, i) for b in packs for p, i in zip(b["position"].tolist(), b["index"].tolist())
    )


def test_bad_sample_in_pack_is_replaced_by_a_no_larger_one_and_counted(tmp_path):
    path = write_synthetic_feature_shards(
        tmp_path / "d", num_samples=48, shapes=SHAPES, cond_dim=16, samples_per_shard=12, seed=1
    )
    clean = _ds(path)
    ref_it = _it(clean, dp_size=1)
    ref = ref_it.next_global_batch()
    tokens = clean.token_counts(PATCH)
    victim = ref[0]["index"].tolist()[1]  # a sample sharing its pack with others
    pos = ref[0]["position"].tolist()[1]
    _corrupt(clean, victim)
    ds = _ds(path, max_bad_fraction=0.2)
    it = _it(ds, dp_size=1)
    got = it.next_global_batch()
    assert len(got) == len(ref)
    # The step keeps its planned sample count (the loss scale assumes it): the victim's slot
    # (its position) holds the first sample with no more tokens in its column of later
    # positions (pos + k * GB), so two slots never pick the same stand-in.
    window = set(ref_it.order.indices(0, GB).tolist())
    column = [int(it.order.indices(pos + k * GB, 1)[0]) for k in range(1, len(tokens) // GB + 1)]
    stand_in = next(i for i in column if i not in window and tokens[i] <= tokens[victim])
    want = sorted((p, stand_in if i == victim else i) for p, i in _step_samples(ref))
    assert _step_samples(got) == want
    assert sum(len(b["latent"]) for b in got) == GB
    assert all(_tokens(b) <= CAPACITY for b in got)
    assert ds.bad_counts["undecodable"] == 1 and ds.num_bad == 1
    assert (it.replaced_in_packs, it.dropped_in_packs) == (1, 0)
    assert any(p == pos for p, _ in _step_samples(got))

    # No stand-in that small nearby: the sample leaves its pack (counted as dropped).
    path = write_synthetic_feature_shards(  # the same data again, the first victim intact
        tmp_path / "d2", num_samples=48, shapes=SHAPES, cond_dim=16, samples_per_shard=12, seed=1
    )
    small = int(tokens.min())
    victim = next(i for b in ref for i in b["index"].tolist() if tokens[i] == small)
    _corrupt(_ds(path), victim)
    ds = _ds(path, max_bad_fraction=0.2)
    it = _it(ds, dp_size=1)
    it._tokens[[i for i in range(len(tokens)) if i not in window]] = small + 1  # all larger
    got = it.next_global_batch()
    assert _step_samples(got) == [(p, i) for p, i in _step_samples(ref) if i != victim]
    assert (it.replaced_in_packs, it.dropped_in_packs) == (0, 1)

    # A pack whose only sample is bad: its slot takes the next good sample after the window.
    same = write_synthetic_feature_shards(
        tmp_path / "s", num_samples=16, shapes=[(1, 8, 8)], cond_dim=16, samples_per_shard=8
    )
    clean = _ds(same)
    it = _it(clean, dp_size=2, capacity=16, global_batch_size=4)  # one sample per pack
    ref = it.next_global_batch()
    victim, pos = ref[0]["index"].item(), ref[0]["position"].item()
    _corrupt(clean, victim)
    ds = _ds(same, max_bad_fraction=0.2)
    it = _it(ds, dp_size=2, capacity=16, global_batch_size=4)
    got = it.next_global_batch()
    assert len(got) == len(ref) == 2  # the rank still runs its share of packs
    assert got[0]["position"].item() == pos and got[0]["index"].item() != victim
    assert got[0]["index"].item() == it.order.indices(pos + 4, 1).item()  # its column
    assert ds.bad_counts["undecodable"] == 1 and it.replaced_in_packs == 1
    # Past data.max_bad_fraction (1 of 8 > 0.1) the run stops, naming the flag.
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        _it(_ds(same, max_bad_fraction=0.1), capacity=16, global_batch_size=4).next_global_batch()


def test_emptied_pack_of_a_short_epoch_takes_any_later_readable_sample(tmp_path):
    """Under two global batches of data a column has one position: when that stand-in is bad
    too, an emptied pack takes the first readable sample after it instead of stopping the run
    (one unreadable sample used to end a small fine-tuning job)."""
    path = write_synthetic_feature_shards(
        tmp_path / "s", num_samples=6, shapes=[(1, 8, 8)], cond_dim=16, samples_per_shard=6
    )
    clean = _ds(path)
    it = _it(clean, dp_size=1, capacity=16, global_batch_size=4)  # one sample per pack
    order = [int(it.order.indices(p, 1)[0]) for p in range(6)]
    for position in (0, 4):  # the first pack's sample and its column's only stand-in
        _corrupt(clean, order[position])
    ds = _ds(path, max_bad_fraction=0.5)
    it = _it(ds, dp_size=1, capacity=16, global_batch_size=4)
    got = it.next_global_batch()
    assert _step_samples(got) == [(0, order[5]), *((p, order[p]) for p in (1, 2, 3))]
    assert ds.bad_counts["undecodable"] == 2 and it.replaced_in_packs == 1
    again = _it(_ds(path, max_bad_fraction=0.5), dp_size=1, capacity=16, global_batch_size=4)
    assert _step_samples(again.next_global_batch()) == _step_samples(got)  # deterministic


def test_stand_ins_differ_across_ranks_and_match_at_every_dp_size(tmp_path):
    """Two large samples of one step fail on different DP ranks: each slot takes its own
    stand-in (a first-after-the-window rule would give both ranks the same sample), and the
    step's (position, sample) pairs are the same at DP 1 and DP 2."""
    path = write_synthetic_feature_shards(
        tmp_path / "d", num_samples=48, shapes=SHAPES, cond_dim=16, samples_per_shard=12, seed=2
    )
    clean = _ds(path)
    plan = _it(clean, dp_size=2).plan(0)
    tokens = clean.token_counts(PATCH)
    # The largest sample of each rank: any later sample fits in its slot.
    victims = [
        max((i for pk in rank for _, i in pk), key=lambda i: tokens[i]) for rank in plan.packs
    ]
    for v in victims:
        _corrupt(clean, v)
    by_dp = {}
    for dp in (1, 2):
        ds = _ds(path, max_bad_fraction=0.2)
        its = [_it(ds, dp_rank=r, dp_size=dp) for r in range(dp)]
        got = [s for packs in _step(its) for s in _step_samples(packs)]
        indices = [i for _, i in got]
        assert len(got) == GB and len(set(indices)) == GB  # no sample twice in the step
        assert not set(victims) & set(indices)
        assert sum(it.replaced_in_packs for it in its) == 2
        by_dp[dp] = sorted(got)
    assert by_dp[1] == by_dp[2]


def test_unpatchifiable_shapes_are_left_out_and_counted(mixed):
    ds = _ds(mixed, max_bad_fraction=1.0)
    it = _it(ds, dp_size=1, patch_size=8)  # 8x12 and 4x8 latents do not split into 8x8 patches
    window = it.order.indices(0, GB).tolist()
    bad = [i for i in window if ds.latent_shape(i)[2:] != (8, 8)]
    packs = it.next_global_batch()
    got = sorted(i for b in packs for i in b["index"].tolist())
    assert bad and got == sorted(set(window) - set(bad))
    assert ds.bad_counts["bad_shape"] == len(bad)
    assert sorted(p for b in packs for p in b["position"].tolist()) == sorted(
        j for j, i in enumerate(window) if i not in bad
    )


def test_config_errors_name_the_flag(mixed):
    from lumos_mcore.config.job import JobConfig
    from lumos_mcore.config.train import TrainConfig

    with pytest.raises(ValueError, match="data.pack_capacity"):
        DataConfig(path=str(mixed), pack=True)
    with pytest.raises(ValueError, match="data.pack_cost"):
        DataConfig(path=str(mixed), pack=True, pack_capacity=64, pack_cost="flops")
    with pytest.raises(ValueError, match="data.cond_pad_to"):
        DataConfig(path=str(mixed), pack=True, pack_capacity=64, cond_pad_to=4)
    data = DataConfig(path=str(mixed), pack=True, pack_capacity=64)
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        JobConfig(data=data, train=TrainConfig(micro_batch_size=2, global_batch_size=4))
    JobConfig(data=data, train=TrainConfig(micro_batch_size=1, global_batch_size=4))
    with pytest.raises(ValueError, match=r"data.pack_capacity=40.*at least 48"):
        _it(_ds(mixed), capacity=40)
    with pytest.raises(ValueError, match="zigzag"):
        _it(_ds(mixed), token_multiple=16)  # 24-token samples do not split into 16 chunks


def _pack_vs_unpacked(rank: int, world: int, path: str) -> tuple[float, float, int]:
    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.step import DiffusionForwardStep

    cfg = ModelConfig(
        name="Lumos-Tiny/2",
        variant="i2v",
        latent_size=8,
        num_frames=3,
        cond_tokens=3,
        cond_channels=48,
        video_attention="full_3d",
    )
    initialize_parallel(
        ParallelConfig(), num_attention_heads=cfg.num_heads_, num_layers=cfg.depth_, seed=0
    )
    model = LumosDiT(build_transformer_config(cfg), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fstep = DiffusionForwardStep(
        build_objective(DiffusionConfig()), seed=5, cond_dropout=0.0, device=torch.device("cpu")
    )
    ds = _ds(Path(path))
    it = _it(ds, dp_size=1, capacity=72)  # packs of 2, 2, 2, 2 and 4 samples
    packs = [next(it) for _ in range(it.micro_batches_at(0))]  # every pack of step 0
    with torch.no_grad():
        packed = 0.0
        for pack in packs:  # megatron's mean over the step's micro-batches
            prep = fstep.prepare_packed(pack, model)
            packed += fstep.loss_func(model(**prep.model_inputs), prep=prep)[0] / len(packs)
        losses = []
        index = torch.cat([p["index"] for p in packs]).tolist()
        position = torch.cat([p["position"] for p in packs]).tolist()
        for i, pos in zip(index, position):
            s = ds.get(i)
            dense = {
                "latent": s["latent"][None],  # [1, C, T, H, W]
                "cond": s["cond"][None],  # [1, Lc, Cc] untrimmed, padding masked
                "cond_mask": s["cond_mask"][None],  # [1, Lc]
                "position": torch.tensor([pos]),
            }
            prep = fstep.prepare_dense(dense, model)
            losses.append(fstep.loss_func(model(**prep.model_inputs), prep=prep)[0])
    sizes = [len(p["index"]) for p in packs]
    return float(packed), float(torch.stack(losses).mean()), len(losses), sizes


def test_loader_pack_loss_equals_mean_of_unpacked_sample_losses(mixed):
    from tests.dist_utils import run_distributed

    """The step's loss over its packs (of different sample counts) is the mean over samples."""
    ((packed, unpacked, n, sizes),) = run_distributed(_pack_vs_unpacked, 1, str(mixed), timeout=300)
    assert n >= 3
    assert len(set(sizes)) > 1, f"packs of equal sizes {sizes} would not test the weighting"
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked), (packed, unpacked)
