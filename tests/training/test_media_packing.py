"""The trainer on raw media with ``media.pack=true``: JPEG shards of two aspect buckets ->
decode -> packs planned from the buckets -> frozen VAE + DINO per same-shape group -> LumosDiT.

* One sample per pack (capacity = the sample's 16 tokens): every per-step loss equals the
  unpacked micro-batch-1 run's (same samples, same per-position noise and timesteps).
* Two buckets mixed in packs, with ``validation.holdout``: trains, logs the packs' own tokens/s,
  never trains on a held-out sample, and a run resumed from a mid-run checkpoint gives the
  uninterrupted run's losses, packs and held-out losses.
* The replica broadcast of a pack's differently shaped encodings (TP=2 ranks, gloo).
* TP=2, CP=2 and PP=2 in the real trainer: the same packs as one rank, the same losses.

Several trainers share one process (``_runs``): each spawn costs a megatron import.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, TrainConfig, ValidationConfig
from lumos_mcore.data.media.synthetic import write_synthetic_media
from lumos_mcore.encoders.tiny import save_tiny_encoders
from tests.dist_utils import run_distributed
from tests.training.helpers import KeyRecorder, assert_logged_losses_equal, make_job, read_metrics

GB = 8


def _media_job(
    root: Path,
    out: str,
    *,
    steps: int,
    buckets: list[list[int]],
    pack: bool,
    capacity: int | None = None,
    save_interval: int = 10_000,
    shards_per_block: int = 1,
    validation: ValidationConfig | None = None,
    latent_size: int = 8,
    shard_vae: bool = False,
    **parallel,
):
    media = root / "media"
    enc = {"vae": root / "encoders" / "vae", "dino": root / "encoders" / "dino"}
    cfg = MediaDataConfig(
        path=str(media),
        buckets=buckets,
        bucket_chunk=2,  # small same-bucket chunks: a window mixes both buckets
        shuffle_shards_per_block=shards_per_block,  # > 1 only with packing (mixes chunks)
        num_workers=1,  # decoding in a prefetch thread, as in a real run
        pack=pack,
        pack_capacity=capacity,
        encoders=EncodersConfig(
            vae=str(enc["vae"]), dino=str(enc["dino"]), dino_image_size=32, shard_vae=shard_vae
        ),
    )
    return make_job(
        None,
        root / out,
        steps=steps,
        media=cfg,
        model=ModelConfig(name="Lumos-Micro/2", latent_size=latent_size, cond_channels=32),
        train=TrainConfig(
            steps=steps,
            micro_batch_size=1,
            global_batch_size=GB,
            log_interval=1000,
            output_dir=str(root / out),
            ema_decay=0.0,
            tensorboard=False,
        ),
        checkpoint=CheckpointConfig(save_interval=save_interval),
        parallel=ParallelConfig(**parallel),
        validation=validation or ValidationConfig(),
    )


def _write_media(root: Path, sizes: list[tuple[int, int]], num: int) -> None:
    write_synthetic_media(root / "media", num_images=num, sizes=sizes, samples_per_shard=8, seed=0)
    save_tiny_encoders(root / "encoders")


def _runs(rank: int, world: int, jobs: dict) -> dict:
    """Train each job in turn in this process; the losses and packs each trained."""
    from lumos_mcore.training.loop import Trainer

    out = {}
    for name, job in jobs.items():
        trainer = Trainer(job)
        trainer.data = KeyRecorder(trainer.data, trainer.dataset)
        held_out = []
        if trainer.validator is not None:
            tail = trainer.dataset.holdout_view()
            held_out = [tail.key(i) for i in range(len(tail))]
        result = trainer.run()
        out[name] = {
            "losses": result.losses,
            "packs": trainer.data.micro_batches,
            "held_out": held_out,
            "loaded_encoders": trainer.encoders is not None,
            "loaded_vae": trainer.shard_vae is not None or trainer.encoders is not None,
        }
    return out


def test_one_sample_per_pack_equals_unpacked_micro_batch_1(tmp_path):
    _write_media(tmp_path, [(64, 64)], 16)
    steps = 3
    kw = dict(steps=steps, buckets=[[64, 64]])
    jobs = {
        "ref": _media_job(tmp_path, "ref", pack=False, **kw),
        # 64 px / VAE 8 / patch 2 = 4 x 4 = 16 tokens: capacity 16 holds exactly one sample.
        "pack": _media_job(tmp_path, "pack", pack=True, capacity=16, **kw),
    }
    res = run_distributed(_runs, 1, jobs, timeout=300)[0]
    ref, got = res["ref"], res["pack"]
    # The same samples in the same micro-batch order (losses alone cannot tell: the zero-init
    # final layer makes the first steps' losses depend on the noise only).
    assert got["packs"] == ref["packs"] and all(len(p) == 1 for p in got["packs"])
    assert len(got["losses"]) == steps and all(math.isfinite(x) for x in got["losses"])
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], ref["losses"])
    metrics = read_metrics(tmp_path / "pack")
    refm = read_metrics(tmp_path / "ref")
    for step, m in metrics.items():
        assert m["data/batches"] == GB  # 8 one-sample packs per step
        assert (
            abs(m["train/grad_norm"] - refm[step]["train/grad_norm"]) <= 1e-5 * m["train/grad_norm"]
        )
        # tokens/s counts the packed samples' own tokens: 8 x 16 per step
        tokens = m["throughput/tokens_per_s"] * m["throughput/step_time_ms"] / 1e3
        assert abs(tokens - GB * 16) < 1e-6 * GB * 16, tokens
    assert metrics[steps]["data/bad_samples"] == 0.0
    # The memory estimate counts one 16-token pack per micro-batch: the unpacked
    # micro-batch-1 run's per-rank activations, the same weights and optimizer.
    assert metrics[1]["memory/estimate_gib"] == pytest.approx(refm[1]["memory/estimate_gib"])


def test_mixed_bucket_packs_train_with_holdout_and_resume(tmp_path):
    # 64x64 (16 tokens) and 64x96 (24 tokens) images; capacity 48: two or three per pack.
    _write_media(tmp_path, [(64, 64), (64, 96)], 24)
    val = ValidationConfig(interval=2, holdout=4, num_samples=2, grid_samples=0)
    kw = dict(
        buckets=[[64, 64], [64, 96]], pack=True, capacity=48, shards_per_block=2, validation=val
    )
    steps = 4
    jobs = {
        "full": _media_job(tmp_path, "full", steps=steps, **kw),
        "half": _media_job(tmp_path, "split", steps=2, save_interval=2, **kw),
        "rest": _media_job(tmp_path, "split", steps=steps, save_interval=2, **kw),  # resumes
    }
    res = run_distributed(_runs, 1, jobs, timeout=300)[0]
    full = res["full"]
    assert len(full["losses"]) == steps and all(math.isfinite(x) for x in full["losses"])
    trained = [k for p in full["packs"] for k in p]
    assert len(trained) == steps * GB  # the global batch counts samples
    assert len(full["held_out"]) == 4 and not set(trained) & set(full["held_out"])
    metrics = read_metrics(tmp_path / "full")
    # Packs mix the buckets: fewer packs than samples, the count follows each step's plan.
    assert all(m["data/batches"] < GB for m in metrics.values())
    tokens = [
        m["throughput/tokens_per_s"] * m["throughput/step_time_ms"] / 1e3 for m in metrics.values()
    ]
    # Each step trains GB samples of 16 or 24 tokens, not GB x model.num_tokens = GB x 16.
    assert all(GB * 16 - 1e-6 <= t <= GB * 24 + 1e-6 for t in tokens), tokens
    assert max(tokens) > GB * 16 + 1, tokens
    # Resume after step 2: the same packs, losses and held-out losses as without a stop.
    assert res["half"]["packs"] + res["rest"]["packs"] == full["packs"]
    split = read_metrics(tmp_path / "split")
    assert sorted(split) == list(range(1, steps + 1))
    for step, m in metrics.items():
        assert abs(split[step]["train/loss"] - m["train/loss"]) <= 1e-6 * abs(m["train/loss"])
    for step in (2, 4):
        assert math.isfinite(metrics[step]["val/loss"])
        assert split[step]["val/loss"] == metrics[step]["val/loss"]


def _assert_layout_equals_one_rank(
    tmp_path,
    latent_size: int = 8,
    validation: ValidationConfig | None = None,
    shard_vae: bool = False,
    **parallel,
) -> None:
    """Mixed-bucket packs on two ranks laid out as ``parallel`` train the packs of one rank
    and give its per-step losses (and, with ``validation``, its held-out loss at step 2)."""
    _write_media(tmp_path, [(64, 64), (64, 96)], 16)
    kw = dict(
        steps=2,
        buckets=[[64, 64], [64, 96]],
        pack=True,
        capacity=48,
        shards_per_block=2,
        latent_size=latent_size,
        validation=validation,
    )
    (ref,) = run_distributed(_runs, 1, {"run": _media_job(tmp_path, "one", **kw)}, timeout=300)
    job = _media_job(tmp_path, "two", **kw, **parallel, shard_vae=shard_vae)
    ranks = run_distributed(_runs, 2, {"run": job}, timeout=300)
    assert ranks[0]["run"]["packs"] == ranks[1]["run"]["packs"] == ref["run"]["packs"]
    # Only the replica's first rank holds the encoders; the other trains on the broadcast
    # (with shard_vae it holds the VAE too and encodes half of each pack's frames).
    assert [r["run"]["loaded_encoders"] for r in ranks] == [True, False]
    assert [r["run"]["loaded_vae"] for r in ranks] == [True, shard_vae]
    assert_logged_losses_equal([r["run"]["losses"] for r in ranks], ref["run"]["losses"], 2)
    if validation is not None:
        one, two = read_metrics(tmp_path / "one")[2], read_metrics(tmp_path / "two")[2]
        assert abs(two["val/loss"] - one["val/loss"]) <= 1e-5 * abs(one["val/loss"])


def test_tensor_parallel_packs_equal_one_rank(tmp_path):
    """TP=2 on mixed-bucket packs: the replica's first rank encodes and broadcasts each pack
    inside the real trainer; both ranks train the same packs and the losses equal TP=1.
    Held-out validation with a grid: the receiving rank validates on broadcast encodings and
    rank 0 decodes the grid with its VAE."""
    val = ValidationConfig(interval=2, holdout=2, num_samples=2, grid_samples=1, grid_steps=2)
    _assert_layout_equals_one_rank(tmp_path, validation=val, tp=2)
    assert (tmp_path / "two" / "val_samples" / "step_0000002.png").is_file()


def test_tensor_parallel_packs_with_shard_vae_equal_one_rank(tmp_path):
    """media.encoders.shard_vae=true at TP=2: both ranks encode half of each pack group's
    frames and all-gather; the condition stays on the first rank. The ranks train the same
    packs as one rank with the same losses (tolerance of the layout comparison)."""
    _assert_layout_equals_one_rank(tmp_path, tp=2, shard_vae=True)


def test_context_parallel_packs_equal_one_rank(tmp_path):
    """CP=2: both ranks of the replica get the broadcast pack and each trains its own slice
    of every sample's tokens (16 and 24 tokens split evenly for the zigzag layout)."""
    _assert_layout_equals_one_rank(tmp_path, cp=2)


def test_pipeline_parallel_packs_equal_one_rank(tmp_path):
    """PP=2: every pack is padded to model.num_tokens (7 x 7 = 49 >= capacity 48) so the
    stages exchange fixed shapes; the first and last stages see the same packs."""
    _assert_layout_equals_one_rank(tmp_path, latent_size=14, pp=2)


class _FakeEncoders:
    """Rank 0 'encodes' (deterministic tensors of each sample's own shape); other ranks must
    get them by broadcast only (they fail if asked to encode)."""

    device = torch.device("cpu")

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def encode_samples(self, pack: dict) -> dict:
        assert self.rank == 0, "only the replica's first rank encodes"
        out = {"latent": [], "cond": [], "cond_mask": []}
        for i, x in enumerate(pack["pixels"]):
            g = torch.Generator().manual_seed(int(pack["index"][i]))
            h, w = x.shape[-2] // 8, x.shape[-1] // 8
            out["latent"].append(torch.randn(4, h, w, generator=g))  # [C, h, w]
            out["cond"].append(torch.randn(3, 5, generator=g))  # [Lc, Dc]
            mask = torch.ones(3, dtype=torch.bool)  # [Lc]
            mask[2 - i % 2 :] = False  # T5-like trailing padding of 1-2 tokens
            out["cond_mask"].append(mask)
        return out


def _broadcast_pack(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from lumos_mcore.encoders.frozen import OnlineEncodingIterator

    dist.init_process_group("gloo")  # torchrun-like environment from run_distributed
    shapes = [(64, 96), (64, 64), (64, 64)]
    raw = {
        "pixels": [torch.zeros(3, h, w) for h, w in shapes],  # n x [3, H, W]
        "caption": ["", "", ""],
        "index": torch.tensor([5, 2, 9]),
        "position": torch.tensor([0, 3, 1]),
        "aspect_ratio": torch.tensor([[64 / 96], [1.0], [1.0]]),
        "loss_scale": 0.75,
    }
    it = OnlineEncodingIterator(iter([raw]), _FakeEncoders(rank), group=dist.group.WORLD)
    return next(it)


def test_pack_encodings_broadcast_to_the_replica():
    """Differently shaped latents / conditions of one pack reach the other TP rank bit for bit,
    and both ranks assemble the same ``prepare_packed`` batch (trailing padding cut off)."""
    a, b = run_distributed(_broadcast_pack, 2, timeout=120)
    assert [tuple(x.shape) for x in a["latent"]] == [(4, 8, 12), (4, 8, 8), (4, 8, 8)]
    assert [tuple(c.shape) for c in a["cond"]] == [(2, 5), (1, 5), (2, 5)]
    for key in ("latent", "cond"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
    assert "cond_mask" not in a and "cond_mask" not in b  # no inner padding left
    for key in ("position", "index", "aspect_ratio"):
        assert torch.equal(a[key], b[key])
    assert a["position"].tolist() == [0, 3, 1] and a["loss_scale"] == b["loss_scale"] == 0.75
