"""Regression tests: .pth head count through inflation, TE / FP8-recorded checkpoints on CPU,
the dtype megatron output records, and ``--overwrite`` surviving a failed swap.

The megatron writes run in one ``run_distributed`` job (module fixture); the command-line
inflations run as their own processes.
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
import yaml

from lumos_mcore.config.loader import config_to_dict
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.convert import convert_checkpoint, inflate_i2i_to_i2v
from lumos_mcore.convert import pipeline as pipeline_mod
from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.models.dit.hf_adapter import ConversionError, hf_config_from_model_config
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
# hidden 144 = 4 heads of 36: the .pth default (hidden // 72 = 2 heads) is wrong for it
CFG4 = ModelConfig(
    name="Lumos-Micro/2",
    latent_size=8,
    cond_tokens=4,
    cond_channels=16,
    hidden_size=144,
    num_heads=4,
    spec="local",
)
SMALL = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_tokens=4, cond_channels=16)


def _hf_model(cfg: ModelConfig, seed: int) -> LumosTransformer2DModel:
    model = LumosTransformer2DModel(**hf_config_from_model_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _video_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "latents": torch.randn(2, 4, 2, 8, 8, generator=g),
        "timesteps": torch.tensor([[0.0, 400.0], [0.0, 820.0]]),
        "cond": torch.randn(2, 4, 16, generator=g),
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _video_job(rank, world, root, batch):
    """The library inflation (dist_checkpointing wants its own process), then the forwards of
    the inflated models."""
    from lumos_mcore import load_model
    from lumos_mcore.convert import McoreCheckpointReader

    root = Path(root)
    inflate_i2i_to_i2v(root / "m.pth", root / "api_num_heads", num_frames=2, num_heads=4)
    out: dict = {"video": {}, "heads": {}}
    for tag in ("cli_num_heads", "cli_config", "api_num_heads"):
        out["heads"][tag] = McoreCheckpointReader(root / tag).model_config["num_heads"]
        with torch.no_grad():
            out["video"][tag] = load_model(root / tag)(**batch)
    return out


def _convert_job(rank, world, root):
    """The TE / FP8-recorded conversions and the fp16 source, written by megatron."""
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.convert import McoreCheckpointReader
    from lumos_mcore.convert.megatron_io import (
        build_megatron_model,
        one_process,
        save_megatron_checkpoint,
    )
    from lumos_mcore.models.dit.hf_adapter import mcore_shapes
    from lumos_mcore.models.dit.state_dict import global_name
    from lumos_mcore.training.checkpoint import Checkpointer
    from lumos_mcore.training.setup import build_model

    root = Path(root)
    out: dict = {"te": {}, "dtype": {}}

    # a GPU job's checkpoint: recorded model.spec=te / model.fp8 (bf16 weights)
    g = torch.Generator().manual_seed(5)
    full = {k: torch.randn(s, generator=g) * 0.2 for k, s in mcore_shapes(SMALL).items()}
    for tag, rec in {
        "spec_te": dict(spec="te"),
        "fp8": dict(spec="te", fp8="tensorwise", precision="bf16", recompute="full"),
    }.items():
        recorded = dataclasses.replace(SMALL, **rec)
        with one_process(SMALL):
            model, _ = build_megatron_model(SMALL, full, bf16=True)
            save_megatron_checkpoint(
                root / tag, model, SMALL, {"model_config": config_to_dict(recorded)}
            )
        res: dict = {}
        for what, fn, args, kw in (
            ("mcore", convert_checkpoint, (root / tag, "mcore", root / f"{tag}_mc", "mcore"), {}),
            ("inflate", inflate_i2i_to_i2v, (root / tag, root / f"{tag}_i2v"), {"num_frames": 2}),
            (
                "hf_config",  # HF -> mcore with the GPU job's config
                convert_checkpoint,
                (root / "hf32", "hf", root / f"{tag}_from_hf", "mcore"),
                {"model_config": recorded},
            ),
        ):
            try:
                dst = fn(*args, **kw)
            except Exception as err:  # reported to the test
                res[what] = f"{type(err).__name__}: {err}"
                continue
            reader = McoreCheckpointReader(dst)
            res[what] = {k: reader.model_config[k] for k in ("spec", "fp8", "recompute")}
        # the mcore copy loads weights-only into a fresh model (the trainer's path)
        if isinstance(res["mcore"], dict):
            with one_process(SMALL):
                chunks, _ = build_model(SMALL, ParallelConfig(), seed=3, wrap_ddp=False)
                Checkpointer(root / "ckpt_tmp").load(root / f"{tag}_mc", chunks)
            bf16 = {k: v.to(torch.bfloat16).float() for k, v in full.items()}
            res["loaded_equal"] = all(
                torch.equal(p.detach(), bf16[global_name(chunks[0], n)])
                for n, p in chunks[0].named_parameters()
            )
        # the recorded TE / FP8 I2V model samples here (no TE, no CUDA): load_model runs it
        # without FP8 on the local spec
        if isinstance(res["inflate"], dict):
            from lumos_mcore import load_model

            try:
                video = load_model(root / f"{tag}_i2v")
                with torch.no_grad():
                    pred = video(**_video_batch())
                cfg = video.model_cfg
                res["sample"] = {"spec": cfg.spec, "fp8": cfg.fp8, "pred": pred}
            except Exception as err:  # reported to the test
                res["sample"] = f"{type(err).__name__}: {err}"
        out["te"][tag] = res

    # dtype written vs recorded
    for tag, dtype in (("fp16_src", None), ("fp16_src_bf16", "bf16")):
        dst = convert_checkpoint(root / "hf16", "hf", root / tag, "mcore", dtype=dtype)
        reader = McoreCheckpointReader(dst)
        out["dtype"][tag] = (
            sorted({str(s.dtype) for s in reader.specs()}),
            json.loads((dst / "conversion.json").read_text())["dtype"],
        )
    return out


@pytest.fixture(scope="module")
def inflated(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_fixes_heads")
    image = _hf_model(CFG4, seed=1)
    # as released: with the fixed pos_embed table (it gives the latent size)
    torch.save({**image.state_dict(), "pos_embed": image.pos_embed.clone()}, root / "m.pth")
    i2v = dataclasses.replace(CFG4, variant="i2v", num_frames=2)
    (root / "i2v.yaml").write_text(yaml.safe_dump({"model": config_to_dict(i2v)}))
    common = ["--src", str(root / "m.pth"), "--src-format", "lumos-pth", "--dst-format", "mcore"]
    runs = {
        "cli_num_heads": _cli(
            *common, "--dst", str(root / "cli_num_heads"), "--i2v-frames", "2", "--num-heads", "4"
        ),
        "cli_config": _cli(
            *common,
            "--dst",
            str(root / "cli_config"),
            "--i2v-frames",
            "2",
            "--config",
            str(root / "i2v.yaml"),
        ),
    }
    for tag, run in runs.items():
        assert run.returncode == 0, f"{tag}: {run.stderr[-2000:]}"
    batch = _video_batch()
    (res,) = run_distributed(_video_job, 1, str(root), batch, timeout=600)
    return {"image": image, "batch": batch, **res}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_fixes_mcore")
    _hf_model(SMALL, seed=2).save_pretrained(root / "hf32")
    _hf_model(SMALL, seed=2).half().save_pretrained(root / "hf16")
    (res,) = run_distributed(_convert_job, 1, str(root), timeout=600)
    return res


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


# -- bug 1: the head count of a .pth reaches inflation -------------------------------------------
@pytest.mark.parametrize("tag", ["cli_num_heads", "cli_config", "api_num_heads"])
def test_inflated_pth_with_given_head_count_is_the_image_model_per_frame(inflated, tag):
    assert inflated["heads"][tag] == 4
    batch, image = inflated["batch"], inflated["image"]
    with torch.no_grad():
        ref = torch.stack(
            [
                image(batch["latents"][:, :, f], batch["timesteps"][:, f], batch["cond"]).sample
                for f in range(2)
            ],
            dim=2,
        )
    assert ref.abs().mean() > 1e-2
    assert _rel_err(inflated["video"][tag], ref) <= 1e-5


def test_num_heads_disagreeing_with_config_is_refused(tmp_path):
    torch.save(_hf_model(CFG4, seed=1).state_dict(), tmp_path / "m.pth")
    i2v = dataclasses.replace(CFG4, variant="i2v", num_frames=2)
    with pytest.raises(ConversionError, match=r"--num-heads 2 .*model\.num_heads=4"):
        inflate_i2i_to_i2v(tmp_path / "m.pth", tmp_path / "a", model_config=i2v, num_heads=2)
    with pytest.raises(ConversionError, match=r"--num-heads 2 .*model\.num_heads=4"):
        convert_checkpoint(
            tmp_path / "m.pth", "lumos-pth", tmp_path / "b", "hf", model_config=CFG4, num_heads=2
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- bug 2: checkpoints recorded with the TE spec / FP8 convert on CPU ---------------------------
@pytest.mark.parametrize("tag", ["spec_te", "fp8"])
def test_te_and_fp8_recorded_checkpoints_convert_on_cpu(converted, tag):
    res = converted["te"][tag]
    want = {"spec": "te", "fp8": "tensorwise" if tag == "fp8" else None}
    for what in ("mcore", "inflate", "hf_config"):
        assert isinstance(res[what], dict), f"{what}: {res[what]}"
        assert {k: res[what][k] for k in want} == want, what  # the original config is recorded
    assert res["mcore"]["recompute"] == ("full" if tag == "fp8" else "none")
    assert res["loaded_equal"]
    sample = res["sample"]
    assert isinstance(sample, dict), sample
    assert (sample["spec"], sample["fp8"]) == ("auto", None)
    assert sample["pred"].shape == (2, 8, 2, 8, 8) and bool(sample["pred"].isfinite().all())


def test_te_and_fp8_recorded_video_models_sample_alike(converted):
    """Same weights, recorded as model.spec=te with and without FP8: the same predictions."""
    a, b = (converted["te"][t]["sample"] for t in ("spec_te", "fp8"))
    torch.testing.assert_close(a["pred"], b["pred"], rtol=0, atol=0)


# -- bug 3: megatron output dtype ----------------------------------------------------------------
def test_fp16_for_megatron_output_is_refused_naming_dtype(tmp_path):
    _hf_model(SMALL, seed=2).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="--dtype fp16"):
        convert_checkpoint(tmp_path / "hf", "hf", tmp_path / "mc", "mcore", dtype="fp16")
    assert not (tmp_path / "mc").exists()
    run = _cli(
        "--src",
        str(tmp_path / "hf"),
        "--src-format",
        "hf",
        "--dst",
        str(tmp_path / "c"),
        "--dst-format",
        "mcore",
        "--dtype",
        "fp16",
    )
    assert run.returncode == 2 and "--dtype" in run.stderr


def test_conversion_record_names_the_dtype_written(converted):
    stored, recorded = converted["dtype"]["fp16_src"]
    assert stored == ["torch.float32"] and recorded == "float32"
    stored, recorded = converted["dtype"]["fp16_src_bf16"]
    assert stored == ["torch.bfloat16"] and recorded == "bfloat16"


# -- bug 4: --overwrite keeps the previous export when the swap fails ----------------------------
class _Interrupt(BaseException):
    """Stands in for Ctrl-C / SIGTERM (a real KeyboardInterrupt would stop pytest)."""


def _flaky_replace(monkeypatch, fail_calls: set[int]) -> list:
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) in fail_calls:
            raise _Interrupt(f"interrupted at rename {len(calls)}")
        return real(a, b)

    monkeypatch.setattr(pipeline_mod.os, "replace", flaky)
    return calls


def test_overwrite_interrupted_between_renames_keeps_previous_export(tmp_path, monkeypatch):
    dst = tmp_path / "export"
    dst.mkdir()
    (dst / "config.json").write_text("old, valid export\n")
    calls = _flaky_replace(monkeypatch, {2})
    with pytest.raises(_Interrupt), pipeline_mod.atomic_output(dst, overwrite=True) as stage:
        (stage / "out").mkdir()
        (stage / "out" / "config.json").write_text("new export\n")
    assert len(calls) == 3  # aside, (failed) into place, back
    assert (dst / "config.json").read_text() == "old, valid export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # staging removed


def test_overwrite_keeps_previous_export_when_it_cannot_be_moved_back(tmp_path, monkeypatch):
    dst = tmp_path / "export"
    dst.mkdir()
    (dst / "config.json").write_text("old, valid export\n")
    _flaky_replace(monkeypatch, {2, 3})
    with (
        pytest.raises(RuntimeError, match="previous output could not be moved back") as err,
        pipeline_mod.atomic_output(dst, overwrite=True) as stage,
    ):
        (stage / "out").mkdir()
    kept = Path(str(err.value).split("it is kept at ")[1].split(";")[0])
    assert (kept / "config.json").read_text() == "old, valid export\n"


# -- minor: config.json and the index are fsynced before the output is renamed into place ------
def test_hf_config_and_index_are_fsynced(tmp_path, monkeypatch):
    _hf_model(SMALL, seed=2).save_pretrained(tmp_path / "hf")
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(pipeline_mod.os, "fsync", fsync)
    convert_checkpoint(tmp_path / "hf", "hf", tmp_path / "out", "hf", max_shard_size="20KB")
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert "config.json" in synced
    assert "diffusion_pytorch_model.safetensors.index.json" in synced


# -- a .pth holding only EMA weights, converted without --ema: said so, not silent ---------------
def test_ema_only_pth_without_ema_flag_warns(tmp_path, caplog):
    from lumos_mcore.convert.sources import open_source

    model = _hf_model(SMALL, seed=4)
    torch.save({"ema": model.state_dict(), "step": 10}, tmp_path / "m.pth")
    with caplog.at_level("WARNING", logger="lumos_mcore.convert.sources"):
        source = open_source(tmp_path / "m.pth", "lumos-pth", ema=False, num_heads=SMALL.num_heads_)
    assert "holds only EMA weights ('ema')" in caplog.text
    assert source.model_config.hidden_size_ == SMALL.hidden_size_  # the EMA weights were read
    caplog.clear()
    torch.save({"state_dict": model.state_dict(), "ema": model.state_dict()}, tmp_path / "b.pth")
    with caplog.at_level("WARNING", logger="lumos_mcore.convert.sources"):
        open_source(tmp_path / "b.pth", "lumos-pth", ema=False, num_heads=SMALL.num_heads_)
    assert "only EMA" not in caplog.text
