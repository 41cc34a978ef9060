"""megatron (trained at TP=2 x PP=2) -> HF -> megatron, and training on at TP=1 x PP=2.

1. Four gloo ranks train a small I2I model (4 heads, 2 layers, 4 condition tokens, every
   weight randomised first so that no path is zero) for one step at TP=2, PP=2 and save.
2. ``convert_checkpoint`` writes it as an HF folder (sharded, to cover the index path);
   ``LumosTransformer2DModel.from_pretrained`` must reproduce the outputs of a megatron model
   that loaded the original checkpoint at TP=1, PP=2 (fp32, <= 1e-5 relative).
3. The command-line tool converts the HF folder back to megatron (layout validated for
   TP=1, PP=2); every tensor read back equals the original bit for bit, as read by both our
   reader and megatron's ``read_full_weights``.
4. The trainer starts from that checkpoint at TP=1, PP=2 (``checkpoint.load``): its model
   gives the original model's outputs, and it trains on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, OptimConfig
from lumos_mcore.convert import McoreCheckpointReader, convert_checkpoint
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from lumos_mcore.models.dit.hf_adapter import ConversionError
from tests.dist_utils import run_distributed
from tests.training.helpers import make_job

REPO = Path(__file__).resolve().parents[2]
MODEL = dict(
    name="Lumos-Micro/2",
    latent_size=8,
    hidden_size=64,
    num_heads=4,
    cond_tokens=4,
    cond_channels=32,
)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([31.0, 777.0]),
        "cond": torch.randn(2, 4, 32, generator=g),
        "cond_mask": torch.tensor([[True, True, False, True], [True, True, True, True]]),
    }


def _pp_forward(chunks: list, batch: dict) -> torch.Tensor | None:
    """Forward-only through megatron's pipeline schedule; the output on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        return model(**next(data_iterator)), None

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([batch]),
            model=chunks,
            num_microbatches=1,
            seq_length=16,
            micro_batch_size=2,
            forward_only=True,
        )
    return outs[0].detach().clone() if outs else None


def _train_randomised(rank, world, job):
    """Randomise every weight (same full tensors on all ranks), then train and save."""
    from lumos_mcore.models.dit.hf_adapter import mcore_shapes
    from lumos_mcore.models.dit.state_dict import load_full_state_dict
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import unwrap

    trainer = Trainer(job)
    g = torch.Generator().manual_seed(11)
    full = {k: torch.randn(s, generator=g) * 0.1 for k, s in mcore_shapes(job.model).items()}
    for chunk in trainer.chunks:
        load_full_state_dict(unwrap(chunk), full, strict=False)
    trainer.ema.reset(trainer.chunks)
    return trainer.run().checkpoint


def _continue_at_pp2(rank, world, job, original, converted, batch):
    """Reference outputs of the original checkpoint loaded at PP=2, then the trainer started
    from the converted checkpoint: same outputs, and it trains."""
    from lumos_mcore.training.checkpoint import Checkpointer, read_full_weights
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import build_model

    trainer = Trainer(job)
    after_load = _pp_forward(trainer.chunks, batch)
    ref_chunks, _ = build_model(job.model, job.parallel, seed=5, wrap_ddp=False)
    Checkpointer(Path(original).parent).load(original, ref_chunks)
    reference = _pp_forward(ref_chunks, batch)
    weights = {
        "original": read_full_weights(original)[0],
        "original_ema": read_full_weights(original, ema=True)[0],
        "converted": read_full_weights(converted)[0],
    }
    result = trainer.run()
    return {
        "reference": reference,
        "after_load": after_load,
        "weights": weights if rank == 0 else None,
        "losses": result.losses,
        "final_step": result.final_step,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_mcore_hf")
    data = write_synthetic_feature_shards(
        root / "data",
        num_samples=32,
        latent_size=8,
        cond_tokens=4,
        cond_dim=32,
        samples_per_shard=16,
        seed=0,
    )
    model = ModelConfig(**MODEL)
    job = make_job(
        data,
        root / "tp2pp2",
        steps=1,
        model=model,
        parallel=ParallelConfig(tp=2, pp=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),  # the one step changes the weights
    )
    ckpt = run_distributed(_train_randomised, 4, job, timeout=300)[0]
    return root, data, model, Path(ckpt)


@pytest.fixture(scope="module")
def exported(trained):
    root, _, _, ckpt = trained
    hf = root / "hf"
    convert_checkpoint(ckpt, "mcore", hf, "hf", max_shard_size="40KB")
    return hf


@pytest.fixture(scope="module")
def round_trip(trained, exported):
    """HF -> megatron with the command-line tool, then the PP=2 job."""
    root, data, model, ckpt = trained
    back = root / "back" / "mcore"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_checkpoint.py"),
            "--src",
            str(exported),
            "--src-format",
            "hf",
            "--dst",
            str(back),
            "--dst-format",
            "mcore",
            "--tp",
            "1",
            "--pp",
            "2",
            "--no-progress",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = make_job(
        data,
        root / "pp2",
        steps=2,
        model=model,
        parallel=ParallelConfig(pp=2),
        checkpoint=CheckpointConfig(save_interval=4, load=str(back)),
    )
    results = run_distributed(
        _continue_at_pp2, 2, job, str(ckpt), str(back), _inputs(), timeout=300
    )
    return back, results


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


def test_hf_export_layout_and_outputs(trained, exported, round_trip):
    from lumos_mcore.hf import LumosTransformer2DModel

    files = sorted(p.name for p in exported.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("diffusion_pytorch_model-")]
    assert len(shards) > 1
    index = json.loads((exported / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    model = LumosTransformer2DModel.from_pretrained(exported).eval()
    batch = _inputs()
    with torch.no_grad():
        out = model(
            batch["latents"],
            batch["timesteps"],
            batch["cond"],
            encoder_attention_mask=batch["cond_mask"],
        ).sample
    ref = round_trip[1][1]["reference"]  # last pipeline stage
    assert ref.abs().mean() > 1e-2
    assert _rel_err(out, ref) <= 1e-5


def test_round_trip_is_bit_identical(trained, round_trip):
    _, _, _, ckpt = trained
    back, results = round_trip
    ours_original = dict(McoreCheckpointReader(ckpt).tensors())
    ours_back = dict(McoreCheckpointReader(back).tensors())
    megatron = results[0]["weights"]
    assert ours_original.keys() == ours_back.keys() == megatron["original"].keys()
    for name, tensor in ours_original.items():
        assert torch.equal(tensor, megatron["original"][name]), name
        assert torch.equal(ours_back[name], tensor), name
        assert torch.equal(megatron["converted"][name], tensor), name
    ema = dict(McoreCheckpointReader(ckpt, ema=True).tensors())
    assert ema.keys() == megatron["original_ema"].keys()
    assert all(torch.equal(ema[k], megatron["original_ema"][k]) for k in ema)
    record = json.loads((back / "conversion.json").read_text())
    assert record["layout"] == {"tp": 1, "pp": 2, "cp": 1}


def test_training_continues_at_pp2_from_converted_checkpoint(round_trip):
    _, results = round_trip
    last = results[1]
    assert results[0]["after_load"] is None  # first stage: no output
    assert torch.equal(last["after_load"], last["reference"])
    assert last["final_step"] == 2 and len(last["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(last["losses"])))


def test_ema_export_and_load_model(trained, tmp_path):
    """``--ema`` exports the EMA weights; ``load_model`` reads megatron and HF alike."""
    from lumos_mcore import load_model

    _, _, _, ckpt = trained
    hf = tmp_path / "hf_ema"
    convert_checkpoint(ckpt, "mcore", hf, "hf", ema=True, dtype="bf16")
    from_mcore = load_model(ckpt.parent)  # checkpoint root; EMA weights by default
    from_hf = load_model(hf, dtype=torch.float32)
    batch = _inputs()
    with torch.no_grad():
        a = from_mcore(**batch)
        b = from_hf(**batch)
        raw = load_model(ckpt, ema=False)(**batch)
    assert a.shape == (2, 8, 8, 8)
    assert float((a - raw).abs().max()) > 1e-4  # EMA differs from the trained weights
    assert _rel_err(b, a) < 2e-2  # bf16 storage of the same weights


def test_megatron_checkpoint_that_does_not_fit_is_refused(trained, tmp_path):
    _, _, model, ckpt = trained
    wider = dataclasses.replace(model, hidden_size=96)
    with pytest.raises(ConversionError, match=r"mcore tensor '[\w.]+' has shape \(.*\), expected"):
        convert_checkpoint(ckpt, "mcore", tmp_path / "wide", "hf", model_config=wider)
    shallow = dataclasses.replace(model, depth=1)
    with pytest.raises(ConversionError, match=r"decoder\.layers\.1\..*layer 1 does not exist"):
        convert_checkpoint(ckpt, "mcore", tmp_path / "shallow", "mcore", model_config=shallow)
    assert list(tmp_path.iterdir()) == []
