"""Cross-section checks of JobConfig that refuse a job before any rank starts."""

from __future__ import annotations

import pytest

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import TrainConfig


@pytest.fixture(autouse=True)
def shards(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)


def _packed_job(spec: str, cp_layout: str = "auto", cp_comm_type: str = "p2p") -> JobConfig:
    return JobConfig(
        data=DataConfig(path="shards", pack=True, pack_capacity=4096),
        model=ModelConfig(name="Lumos-Tiny/2", spec=spec, cp_layout=cp_layout),
        parallel=ParallelConfig(cp=2, cp_comm_type=cp_comm_type),
        train=TrainConfig(micro_batch_size=1),
    )


@pytest.mark.parametrize("comm", ["all_gather", "a2a"])
def test_te_packs_under_cp_need_the_p2p_ring(comm):
    with pytest.raises(ValueError, match=f"parallel.cp_comm_type='{comm}'.*p2p"):
        _packed_job("te", cp_comm_type=comm)


def test_te_packs_under_cp_need_the_zigzag_split():
    with pytest.raises(ValueError, match="model.cp_layout='contiguous'.*zig-zag"):
        _packed_job("te", cp_layout="contiguous")


@pytest.mark.parametrize("te", [True, False])
def test_auto_spec_is_checked_where_te_imports(monkeypatch, te):
    from lumos_mcore.models.dit import layer_spec

    monkeypatch.setattr(layer_spec, "te_available", lambda: te)
    if te:
        with pytest.raises(ValueError, match="parallel.cp_comm_type='a2a'"):
            _packed_job("auto", cp_comm_type="a2a")
    else:  # the local spec: its all-gather CP takes packs with any comm type
        _packed_job("auto", cp_comm_type="a2a")


def test_allowed_pack_layouts():
    _packed_job("te", cp_layout="zigzag")
    _packed_job("te")  # auto is zig-zag on the TE spec
    # The local spec's all-gather CP has neither limit.
    _packed_job("local", cp_layout="contiguous", cp_comm_type="all_gather")


def test_fp8_packs_under_pp_need_a_length_fp8_can_split():
    """Under PP every pack is model.num_tokens long (Lumos-Tiny/2 at latent 32: 256 tokens)."""

    def job(tp: int, sp: bool, cp: int, recipe: str = "tensorwise") -> JobConfig:
        return JobConfig(
            data=DataConfig(path="shards", pack=True, pack_capacity=256),
            model=ModelConfig(name="Lumos-Tiny/2", latent_size=32, fp8=recipe),
            parallel=ParallelConfig(tp=tp, pp=2, cp=cp, sequence_parallel=sp),
            train=TrainConfig(micro_batch_size=1),
        )

    job(2, True, 2)  # 256 tokens = 64 per rank
    with pytest.raises(ValueError, match=r"num_tokens=256.*must be a multiple of 512"):
        job(4, True, 8)  # 16 rows x 32 ranks
    job(4, True, 2, "mxfp8")  # 32 rows x 8 ranks = 256
    with pytest.raises(ValueError, match=r"multiple of 512"):
        job(4, True, 4, "mxfp8")  # 32 rows x 16 ranks


def _dense_job(spec: str = "local", cp_layout: str = "auto", cp: int = 2, **model) -> JobConfig:
    return JobConfig(
        data=DataConfig(path="shards"),
        model=ModelConfig(name="Lumos-Tiny/2", spec=spec, cp_layout=cp_layout, **model),
        parallel=ParallelConfig(cp=cp),
    )


def test_zigzag_cp_needs_tokens_in_2cp_chunks(monkeypatch):
    """Lumos-Tiny/2 at latent 6 has 9 tokens: three contiguous CP shards, but not the 2*cp=6
    chunks of the zig-zag layout (refused up front, not at the first forward)."""
    from lumos_mcore.models.dit import layer_spec

    monkeypatch.setattr(layer_spec, "te_available", lambda: False)
    _dense_job(cp_layout="contiguous", cp=3, latent_size=6)
    with pytest.raises(ValueError, match=r"model.cp_layout='zigzag'.*num_tokens=9 .*multiple of 6"):
        _dense_job(cp_layout="zigzag", cp=3, latent_size=6)
    _dense_job(cp_layout="zigzag", cp=3, latent_size=12)  # 36 tokens
    _dense_job(spec="auto", cp=3, latent_size=6)  # auto without TE: contiguous
    monkeypatch.setattr(layer_spec, "te_available", lambda: True)
    with pytest.raises(ValueError, match=r"zig-zag on the TE spec"):  # auto resolves to zig-zag
        _dense_job(spec="auto", cp=3, latent_size=6)


def test_te_spatial_temporal_needs_whole_frames_per_cp_shard(monkeypatch):
    from lumos_mcore.models.dit import layer_spec

    monkeypatch.setattr(layer_spec, "te_available", lambda: True)
    video = dict(variant="i2v", latent_size=16, cp_layout="contiguous")
    _dense_job(spec="te", num_frames=4, **video)
    with pytest.raises(ValueError, match=r"whole frames.*num_frames=3 must be a multiple of 2"):
        _dense_job(spec="te", num_frames=3, **video)
    _dense_job(spec="local", num_frames=3, **video)  # the local spec gathers K/V instead
    with pytest.raises(ValueError, match=r"video_attention=full_3d to pack"):
        JobConfig(
            data=DataConfig(path="shards", pack=True, pack_capacity=4096),
            model=ModelConfig(name="Lumos-Tiny/2", spec="te", variant="i2v", num_frames=4),
            train=TrainConfig(micro_batch_size=1),
        )


def test_te_a2a_cp_needs_heads_divisible_by_cp(monkeypatch):
    """Lumos-Tiny/2 has 4 heads: all-to-all CP over 3 ranks cannot split them (p2p can)."""
    from lumos_mcore.models.dit import layer_spec

    monkeypatch.setattr(layer_spec, "te_available", lambda: True)

    def job(cp: int, comm: str) -> JobConfig:
        return JobConfig(
            data=DataConfig(path="shards"),
            model=ModelConfig(
                name="Lumos-Tiny/2", spec="te", latent_size=16, cp_layout="contiguous"
            ),
            parallel=ParallelConfig(cp=cp, cp_comm_type=comm),
        )

    job(2, "a2a")
    job(3, "p2p")
    with pytest.raises(ValueError, match=r"cp_comm_type='a2a' with parallel.cp=3.*4 heads"):
        job(3, "a2a")
