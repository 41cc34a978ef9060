"""``lumos_mcore.sample --tp / --cp``: one megatron model over several gloo ranks samples what
one process samples.

The checkpoint is a tiny randomly-initialised megatron I2V model written by the project's own
converter path; the reference is the same CLI in one process. Every rank of a TP x CP group
runs each batch; the outputs must equal the reference to float tolerance (the sharded GEMMs
and the CP gather reorder sums: ~3e-7 of the outputs' scale), and only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.sample import check_model_parallel
from tests.dist_utils import run_distributed

FRAMES, LATENT = 3, 8  # 3 x 4 x 4 = 48 tokens per clip


def _video_cfg(attention: str) -> ModelConfig:
    return ModelConfig(
        name="Lumos-Micro/2",
        variant="i2v",
        num_frames=FRAMES,
        latent_size=LATENT,
        cond_tokens=4,
        cond_channels=16,
        hidden_size=32,
        num_heads=4,
        video_attention=attention,
    )


def _write_checkpoint(rank, world, path, attention):
    """Random weights (non-zero everywhere: zero-initialised gates would hide a wrong shard)."""
    from lumos_mcore.convert.megatron_io import (
        build_megatron_model,
        one_process,
        save_megatron_checkpoint,
    )

    cfg = _video_cfg(attention)
    g = torch.Generator().manual_seed(3)
    with one_process(cfg):
        model, _ = build_megatron_model(cfg, {}, allow_new=True, for_checkpoint=True)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_megatron_checkpoint(path, model, cfg)


def _sample(rank, world, ckpt, root, tag, extra):
    import lumos_mcore.sample as sample_mod

    ran: list[int] = []  # the batches this rank sampled
    generate = sample_mod.generate

    def recording(*a, **kw):
        parts = generate(*a, **kw)
        ran.extend(parts)
        return parts

    sample_mod.generate = recording
    out = Path(root) / tag
    args = ["--model", str(ckpt), "--cond", str(Path(root) / "cond.npy"), "--input-latent",
            str(Path(root) / "first.npy"), "--sampler", "dpm++2m", "--steps", "3",
            "--num-samples", "3", "--batch-size", "1", "--seed", "7", "--out", str(out),
            "--no-progress", *extra]  # fmt: skip
    written = sample_mod.main(args)
    return {"rank": rank, "written": sorted(written), "ran": sorted(ran)}


@pytest.fixture(scope="module", params=["full_3d", "spatial_temporal"])
def video_checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sample_{request.param}")
    ckpt = root / "ckpt"
    run_distributed(_write_checkpoint, 1, str(ckpt), request.param)
    g = torch.Generator().manual_seed(11)
    np.save(root / "cond.npy", torch.randn(2, 4, 16, generator=g).numpy())
    np.save(root / "first.npy", torch.randn(2, 4, LATENT, LATENT, generator=g).numpy())
    run_distributed(_sample, 1, str(ckpt), str(root), "one", [])
    ref = np.load(root / "one" / "latents.npy")
    assert ref.shape == (6, 4, FRAMES, LATENT, LATENT)  # 2 conditions x 3 samples
    return {"root": root, "ckpt": ckpt, "ref": ref}


@pytest.mark.parametrize(
    ("world", "flags"),
    [(2, ["--cp", "2"]), (2, ["--tp", "2"]), (4, ["--cp", "2"])],
    ids=["cp2", "tp2", "cp2_x_2replicas"],
)
def test_model_parallel_sampling_equals_one_process(video_checkpoint, world, flags):
    """With 4 ranks two CP groups split the 6 batches; each group hands in its own once."""
    root, ref = video_checkpoint["root"], video_checkpoint["ref"]
    tag = f"par{world}_" + "".join(flags).replace("-", "")
    results = run_distributed(_sample, world, str(video_checkpoint["ckpt"]), str(root), tag, flags)
    assert results[0]["written"]  # rank 0 writes alone
    assert all(r["written"] == [] for r in results[1:])
    # ranks 0-1 and 2-3 form the CP groups (megatron's tp-cp-dp order): batches 0,2,4 / 1,3,5
    replicas = world // 2
    for r in results:
        assert r["ran"] == list(range(r["rank"] // 2, 6, replicas))
    got = np.load(root / tag / "latents.npy")
    assert got.shape == ref.shape
    # DDPM's x0 extrapolation at t ~ T scales a random model's outputs into the hundreds: the
    # tolerance is relative to that scale (a wrong shard or token order is off by O(1) of it)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)
    # frame 0 is the input latent; the generated frames are not (a real sampling happened)
    first = np.load(root / "first.npy")
    np.testing.assert_array_equal(got[:3, :, 0], np.broadcast_to(first[0], got[:3, :, 0].shape))
    assert np.abs(got[:, :, 1:] - got[:, :, :1]).mean() > 0.1


def test_model_parallel_layout_refused_up_front():
    check_model_parallel(4, 2, 2)
    with pytest.raises(SystemExit, match=r"--tp=2 --cp=2: the 2 rank\(s\) do not split"):
        check_model_parallel(2, 2, 2)
    with pytest.raises(SystemExit, match=r"--cp=0: must be >= 1"):
        check_model_parallel(2, 1, 0)


def test_cp_split_must_divide_the_tokens():
    """48 tokens do not split into 5 shares: refused naming the flag, before sampling."""
    from types import SimpleNamespace

    from lumos_mcore.sample import ModelInfo, check_cp_tokens

    info = ModelInfo(variant="i2v", num_frames=FRAMES, latent_size=LATENT)
    model = SimpleNamespace(patch_size=2, cp_mode="contiguous")
    check_cp_tokens(model, info, 3)  # 48 = 3 x 16
    with pytest.raises(SystemExit, match=r"--cp=5: a sample has 48 tokens, not a multiple of 5"):
        check_cp_tokens(model, info, 5)
    check_cp_tokens(model, info, 16)  # 16 contiguous shares of 3 tokens
    zigzag = SimpleNamespace(patch_size=2, cp_mode="zigzag")
    check_cp_tokens(zigzag, info, 3)  # 6 chunks of 8
    with pytest.raises(SystemExit, match=r"not a multiple of 32 \(2\*cp"):
        check_cp_tokens(zigzag, info, 16)
