"""Lumos-I2V trained at TP=2 x CP=2 -> HF (``LumosTransformer3DModel``) -> megatron.

1. Four gloo ranks train a small spatial + temporal I2V model with QK-norm and gated
   cross-attention (every weight randomised first, so no path is zero) for one step at
   TP=2, CP=2 on 3-frame feature shards, and save.
2. ``convert_checkpoint`` writes it as an HF folder (sharded); ``config.json`` names the 3-D
   class and ``LumosTransformer3DModel.from_pretrained`` reproduces, on per-frame timesteps,
   the outputs of the megatron model loaded from the original checkpoint in one process
   (fp32, <= 3e-5 of the output scale); so does ``load_model`` of the folder.
3. The command-line tool converts the HF folder back to megatron (layout validated for TP=2,
   CP=2): every tensor equals the original bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import OptimConfig
from lumos_mcore.convert import McoreCheckpointReader, convert_checkpoint
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from tests.convert.test_mcore_hf import _train_randomised
from tests.dist_utils import run_distributed
from tests.training.helpers import make_job

REPO = Path(__file__).resolve().parents[2]
MODEL = dict(
    name="Lumos-Micro/2",
    variant="i2v",
    num_frames=3,
    latent_size=8,
    hidden_size=64,
    num_heads=4,
    cond_channels=32,
    qk_norm=True,
    cross_attn_gate=True,
    spec="local",
)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([[0.0, 400.0, 900.0], [0.0, 31.0, 777.0]])  # frame 0: the clean condition
    return {
        "latents": torch.randn(2, 4, 3, 8, 8, generator=g),
        "timesteps": t,
        "cond": torch.randn(2, 1, 32, generator=g),
    }


def _megatron_reference(rank, world, ckpt):
    from lumos_mcore import load_model

    model = load_model(ckpt, backend="megatron", ema=False)  # the export holds these weights
    with torch.no_grad():
        return type(model).__name__, model(**_batch())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_video")
    data = write_synthetic_feature_shards(
        root / "data", num_samples=16, latent_size=8, frames=3, cond_dim=32, seed=0
    )
    job = make_job(
        data,
        root / "tp2cp2",
        steps=1,
        model=ModelConfig(**MODEL),
        parallel=ParallelConfig(tp=2, cp=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
    )
    ckpt = Path(run_distributed(_train_randomised, 4, job, timeout=300)[0])
    hf = convert_checkpoint(ckpt, "mcore", root / "hf", "hf", max_shard_size="60KB")
    (kind, reference) = run_distributed(_megatron_reference, 1, str(ckpt))[0]
    assert kind == "LumosDiT"
    back = root / "back"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_checkpoint.py"),
            "--src",
            str(hf),
            "--src-format",
            "hf",
            "--dst",
            str(back),
            "--dst-format",
            "mcore",
            "--tp",
            "2",
            "--cp",
            "2",
            "--no-progress",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ckpt, Path(hf), back, reference


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


def test_video_export_reproduces_the_trained_model(converted):
    from lumos_mcore import load_model
    from lumos_mcore.hf import LumosTransformer3DModel

    _, hf, _, reference = converted
    config = json.loads((hf / "config.json").read_text())
    assert config["_class_name"] == "LumosTransformer3DModel"
    assert config["num_frames"] == 3 and config["video_attention"] == "spatial_temporal"
    assert (hf / "diffusion_pytorch_model.safetensors.index.json").exists()  # sharded
    model = LumosTransformer3DModel.from_pretrained(hf).eval()
    assert reference.abs().mean() > 1e-2
    b = _batch()
    with torch.no_grad():
        out = model(b["latents"], b["timesteps"], b["cond"]).sample
        loaded = load_model(hf)
        via_loader = loaded(**b)
    assert _rel_err(out, reference) <= 3e-5
    assert _rel_err(via_loader, reference) <= 3e-5
    assert loaded.model_cfg.variant == "i2v" and loaded.model_cfg.qk_norm


def test_video_round_trip_is_bit_identical(converted):
    ckpt, _, back, _ = converted
    original = dict(McoreCheckpointReader(ckpt).tensors())
    again = dict(McoreCheckpointReader(back).tensors())
    assert original.keys() == again.keys()
    assert any(".temporal_attention." in k for k in original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    record = json.loads((back / "conversion.json").read_text())
    assert record["layout"] == {"tp": 2, "pp": 1, "cp": 2}
    assert McoreCheckpointReader(back).model_config["variant"] == "i2v"
