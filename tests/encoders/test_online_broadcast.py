"""Online encoding in a model replica: one rank encodes, the others receive identical tensors."""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed


class _RankEncoder:
    """Stand-in for FrozenEncoders whose output depends on the rank (as independent GPU
    encodes may, bit-wise) and which counts its calls."""

    device = torch.device("cpu")

    def __init__(self, rank: int) -> None:
        self.rank, self.calls = rank, 0

    def encode(self, raw: dict) -> dict:
        self.calls += 1
        b = raw["index"].shape[0]
        mask = torch.arange(5)[None].expand(b, 5) < (2 + raw["index"][:, None] % 3)
        return {
            "latent": raw["index"].float().view(b, 1, 1, 1).expand(b, 4, 2, 3) + self.rank,
            "cond": torch.full((b, 5, 8), float(self.rank)),
            "cond_mask": mask,
        }


def _replica(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from lumos_mcore.encoders.frozen import OnlineEncodingIterator

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    raws = [
        {"index": torch.tensor([4 * s, 4 * s + 1]), "aspect_ratio": torch.ones(2, 1)}
        for s in range(3)
    ]
    enc = _RankEncoder(rank)
    it = OnlineEncodingIterator(iter(raws), enc, group=group)
    outs = [next(it) for _ in range(3)]
    return {"calls": enc.calls, "outs": outs}


def test_first_rank_encodes_and_broadcasts() -> None:
    r0, r1 = run_distributed(_replica, 2, timeout=120)
    assert r0["calls"] == 3 and r1["calls"] == 0  # the encoders ran on one rank only
    for a, b in zip(r0["outs"], r1["outs"]):
        assert set(a) == set(b) == {"latent", "cond", "cond_mask", "index", "aspect_ratio"}
        for k in ("latent", "cond", "cond_mask"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
        assert (b["cond"] == 0).all()  # rank 0's values, not rank 1's
    assert r1["outs"][1]["latent"][1, 0, 0, 0] == 5.0
    assert r1["outs"][2]["cond_mask"].sum().item() == (8 % 3 + 2) + (9 % 3 + 2)
