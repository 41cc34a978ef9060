"""ParallelConfig: every validation error names the ``parallel.*`` flag to change."""

from __future__ import annotations

import pytest

from lumos_mcore.config.parallel import ParallelConfig


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"tp": 0}, "parallel.tp=0"),
        ({"tp": -2}, "parallel.tp=-2"),
        ({"pp": 0}, "parallel.pp=0"),
        ({"cp": 0}, "parallel.cp=0"),
        ({"tp": 2.0}, "parallel.tp=2.0"),
        ({"tp": True}, "parallel.tp=True"),
        ({"pp": 2, "vpp": 0}, "parallel.vpp=0"),
        ({"vpp": 2}, "parallel.vpp=2"),  # vpp needs pp > 1
        ({"sequence_parallel": True}, "parallel.sequence_parallel=True"),  # needs tp > 1
        ({"sequence_parallel": 1, "tp": 2}, "parallel.sequence_parallel=1"),
        ({"use_distributed_optimizer": "yes"}, "parallel.use_distributed_optimizer="),
        ({"overlap_grad_reduce": None}, "parallel.overlap_grad_reduce=None"),
        ({"cp_comm_type": "ring"}, "parallel.cp_comm_type='ring'"),
    ],
)
def test_post_init_rejects(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError) as err:
        ParallelConfig(**kwargs)
    assert flag in str(err.value)


@pytest.mark.parametrize("comm", ["p2p", "all_gather", "a2a"])
def test_post_init_accepts(comm: str) -> None:
    cfg = ParallelConfig(tp=2, pp=2, cp=2, vpp=2, sequence_parallel=True, cp_comm_type=comm)
    assert cfg.model_parallel_size == 8


@pytest.mark.parametrize(
    ("cfg", "world", "heads", "layers", "dp"),
    [
        (ParallelConfig(), 1, 16, 28, 1),
        (ParallelConfig(), 8, 16, 28, 8),
        (ParallelConfig(tp=2), 8, 16, 28, 4),
        (ParallelConfig(tp=2, pp=2), 8, 16, 28, 2),
        (ParallelConfig(tp=2, pp=2, cp=2), 8, 16, 28, 1),
        (ParallelConfig(pp=2, vpp=2), 4, 16, 28, 2),
        (ParallelConfig(tp=4, pp=4, vpp=7), 64, 16, 28, 4),
    ],
)
def test_validate_returns_dp(cfg: ParallelConfig, world: int, heads: int, layers: int, dp: int):
    assert cfg.validate(world, num_attention_heads=heads, num_layers=layers) == dp


def _validate_error(cfg: ParallelConfig, world: int, **kw) -> str:
    kw.setdefault("num_attention_heads", 16)
    kw.setdefault("num_layers", 28)
    with pytest.raises(ValueError) as err:
        cfg.validate(world, **kw)
    return str(err.value)


def test_validate_world_not_divisible() -> None:
    msg = _validate_error(ParallelConfig(tp=3, pp=2), 4, num_attention_heads=6)
    assert msg.startswith("parallel.tp=3: world size 4 is not divisible by tp*pp*cp=6")
    assert "parallel.pp=4" in _validate_error(ParallelConfig(pp=4), 6)
    assert "parallel.cp=4" in _validate_error(ParallelConfig(cp=4), 2)
    # The size that does not divide the world is named, not the first one set.
    assert _validate_error(ParallelConfig(tp=2, pp=3), 8).startswith("parallel.pp=3:")


def test_validate_heads_not_divisible_by_tp() -> None:
    msg = _validate_error(ParallelConfig(tp=3), 3)
    assert msg == ("parallel.tp=3: num_attention_heads=16 is not divisible by it; choose a divisor")


def test_validate_layers_not_divisible_by_stages() -> None:
    msg = _validate_error(ParallelConfig(pp=3), 3, num_layers=28)
    assert msg.startswith("parallel.pp=3: num_layers=28")
    msg = _validate_error(ParallelConfig(pp=2, vpp=3), 2, num_layers=28)
    assert msg.startswith("parallel.vpp=3: num_layers=28") and "pp*vpp=6" in msg
    # 28 layers = 2 stages x 2 chunks x 7 layers: valid
    assert ParallelConfig(pp=2, vpp=2).validate(2, num_attention_heads=16, num_layers=28) == 1


def test_validate_seq_len_split() -> None:
    # CP splits the sequence over cp ranks ...
    msg = _validate_error(ParallelConfig(cp=2), 2, seq_len=255)
    assert msg.startswith("parallel.cp=2: sequence length 255 is not divisible by cp*tp=2")
    # ... and SP additionally over tp ranks.
    msg = _validate_error(ParallelConfig(tp=2, cp=2, sequence_parallel=True), 4, seq_len=258)
    assert msg.startswith("parallel.cp=2") and "cp*tp=4" in msg
    msg = _validate_error(ParallelConfig(tp=4, sequence_parallel=True), 4, seq_len=258)
    assert msg.startswith("parallel.sequence_parallel=True")
    # Without SP the TP ranks keep the whole (per-CP) sequence.
    assert (
        ParallelConfig(tp=4, cp=2).validate(8, num_attention_heads=16, num_layers=28, seq_len=258)
        == 1
    )
    assert (
        ParallelConfig(tp=2, cp=2, sequence_parallel=True).validate(
            8, num_attention_heads=16, num_layers=28, seq_len=256
        )
        == 2
    )


def test_validate_rejects_nonpositive_world() -> None:
    with pytest.raises(ValueError, match="world size"):
        ParallelConfig().validate(0, num_attention_heads=16, num_layers=28)
