"""``media.encoders.shard_vae``: the ranks of a replica split the VAE frames and all-gather.

Two gloo ranks with tiny random encoders (written by the test): every rank ends with the same
tensors as one process encoding everything, each frame is encoded by exactly one rank, and
only the first rank loads the condition encoder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from lumos_mcore.encoders.tiny import save_tiny_encoders

    return save_tiny_encoders(tmp_path_factory.mktemp("enc"))


def _config(tiny: dict[str, Path], sampling: str, cond: str = "dino_cls"):
    from lumos_mcore.config.media import EncodersConfig

    return EncodersConfig(
        vae=str(tiny["vae"]),
        dino=str(tiny["dino"]),
        cond=cond,
        dino_image_size=32,
        vae_sampling=sampling,
        vae_batch=2,
        shard_vae=True,
        device="cpu",
    )


def _raws() -> list[dict]:
    g = torch.Generator().manual_seed(0)

    def px(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    return [
        # video: B=2 x T=3 = 6 frames, 3 per rank
        {"pixels": px(2, 3, 3, 32, 32), "caption": ["a", "b"], "index": torch.tensor([4, 9])},
        # one image: 1 frame, so the second rank's share is empty
        {"pixels": px(1, 3, 32, 32), "caption": ["c"], "index": torch.tensor([2])},
        # a pack of two shapes: groups of 2 and 1 samples (frame counts 2 x 2, 1 x 1)
        {
            "pixels": [px(3, 2, 32, 32), px(3, 1, 16, 32), px(3, 2, 32, 32)],
            "caption": ["d", "e", "f"],
            "index": torch.tensor([7, 3, 5]),
            "position": torch.tensor([0, 1, 2]),
        },
    ]


def _encode(
    rank: int,
    world_size: int,
    tiny: dict[str, Path],
    sampling: str,
    shard: bool,
    cond: str = "dino_cls",
):
    import torch.distributed as dist

    from lumos_mcore.encoders.frozen import FrozenEncoders, OnlineEncodingIterator

    dist.init_process_group("gloo")
    cfg = _config(tiny, sampling, cond)
    encoders = FrozenEncoders(cfg, seed=11) if rank == 0 else None
    vae = None
    if shard:
        vae = encoders.vae if encoders is not None else FrozenEncoders.build_vae(cfg)
    frames_seen = []
    if vae is not None:
        inner = vae.encode_frames

        def counting(frames, noise=None):
            frames_seen.append(int(frames.shape[0]))
            return inner(frames, noise)

        vae.encode_frames = counting
    it = OnlineEncodingIterator(iter(_raws()), encoders, group=dist.group.WORLD, vae=vae, seed=11)
    outs = [next(it) for _ in range(3)]
    dense = [{k: o[k] for k in ("latent", "cond", "cond_mask")} for o in outs[:2]]
    pack = outs[2]
    return {
        "dense": dense,
        "pack": {k: pack[k] for k in ("latent", "cond", "cond_mask") if k in pack},
        "frames": frames_seen,
        "has_cond_encoder": encoders is not None,
    }


def _single_process(tiny: dict[str, Path], sampling: str, cond: str = "dino_cls") -> dict:
    from lumos_mcore.encoders.frozen import FrozenEncoders, OnlineEncodingIterator

    enc = FrozenEncoders(_config(tiny, sampling, cond), seed=11)
    it = OnlineEncodingIterator(iter(_raws()), enc)
    outs = [next(it) for _ in range(3)]
    return {
        "dense": [{k: o[k] for k in ("latent", "cond", "cond_mask")} for o in outs[:2]],
        "pack": {k: outs[2][k] for k in ("latent", "cond", "cond_mask") if k in outs[2]},
    }


def _close(a, b, exact: bool) -> None:
    """Tensors, or lists of tensors (a pack's per-sample entries), equal or within 1e-5."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, exact)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampling", ["mode", "sample"])
def test_sharded_vae_matches_one_process_and_splits_the_frames(tiny, sampling) -> None:
    r0, r1 = run_distributed(_encode, 2, tiny, sampling, True, timeout=300)
    ref = _single_process(tiny, sampling)
    # Every rank of the replica holds the same tensors ...
    for a, b in zip(r0["dense"], r1["dense"]):
        for k in a:
            _close(a[k], b[k], exact=True)
    assert set(r0["pack"]) == set(r1["pack"]) == set(ref["pack"])
    for k in r0["pack"]:
        _close(r0["pack"][k], r1["pack"][k], exact=True)
    # ... and they are what one process encoding everything gets (same frames, same noise).
    for got, want in zip(r0["dense"], ref["dense"]):
        _close(got["latent"], want["latent"], exact=False)
        _close(got["cond"], want["cond"], exact=True)
        _close(got["cond_mask"], want["cond_mask"], exact=True)
    for k in ref["pack"]:
        _close(r0["pack"][k], ref["pack"][k], exact=False)
    assert r0["dense"][0]["latent"].shape == (2, 4, 3, 4, 4)  # [B, C, T, h, w]
    # Each frame once, split evenly: video 6 -> 3 + 3; image 1 -> 0 + 1 (a remainder goes to
    # the later ranks: the first also runs the condition encoder); pack groups of 4 frames
    # (2 + 2) and 1 frame (0 + 1).
    assert r0["frames"] == [3, 0, 2, 0]
    assert r1["frames"] == [3, 1, 2, 1]
    assert r0["has_cond_encoder"] and not r1["has_cond_encoder"]


def test_without_shard_vae_only_the_first_rank_encodes(tiny) -> None:
    r0, r1 = run_distributed(_encode, 2, tiny, "mode", False, timeout=300)
    ref = _single_process(tiny, "mode")
    assert r0["frames"] == r1["frames"] == []  # no VAE given: the FrozenEncoders path
    for got, want in zip(r1["dense"], ref["dense"]):
        _close(got["latent"], want["latent"], exact=True)


@pytest.mark.parametrize("shard", [False, True])
def test_dino_patch_tokens_reach_every_rank_intact(tiny, shard) -> None:
    """DINO's patch tokens are a strided slice (after the CLS token) of its hidden states; the
    replica's broadcast must send their values, not their storage order (batches of 2)."""
    r0, r1 = run_distributed(_encode, 2, tiny, "mode", shard, "dino_patch", timeout=300)
    ref = _single_process(tiny, "mode", "dino_patch")
    for rank in (r0, r1):
        for got, want in zip(rank["dense"], ref["dense"]):
            assert got["cond"].shape[1] > 1  # patch tokens, not the CLS token
            _close(got["cond"], want["cond"], exact=True)
        _close(rank["pack"]["cond"], ref["pack"]["cond"], exact=True)


def test_sampling_noise_does_not_depend_on_the_split(tiny) -> None:
    """The posterior noise of a frame is fixed by its sample's seed: encoding frames 0-2 and
    3-5 separately gives the latents of encoding all six at once."""
    from lumos_mcore.encoders.frozen import FrozenEncoders, vae_seeds

    vae = FrozenEncoders.build_vae(_config(tiny, "sample"))
    pixels = _raws()[0]["pixels"]
    seeds = vae_seeds(11, torch.tensor([4, 9]))
    frames, shape = vae.flatten_frames(pixels)
    noise = vae.frame_noise(seeds, pixels)
    halves = torch.cat(
        [vae.encode_frames(frames[:3], noise[:3]), vae.encode_frames(frames[3:], noise[3:])]
    )
    whole = vae.encode(pixels, seeds=seeds)
    torch.testing.assert_close(vae.unflatten_latents(halves, shape), whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the frames' noise"):
        vae.encode_frames(frames[:1])
