"""tools/plan_memory.py: recipes and overrides in, the per-rank plan and verdicts out."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lumos_mcore.config.loader import ConfigError
from lumos_mcore.perf.memory import GIB, estimate_memory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "tools" / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plan_memory"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_recipe_plan_matches_the_library_estimate(tool, tmp_path, capsys):
    out = tmp_path / "plan.json"
    recipe = ROOT / "examples/recipes/lumos_i2v_xl2_16f_512.yaml"
    rc = tool.main(["--config", str(recipe), "--world-size", "8", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| optimizer |" in text and "fits in 90% of" in text
    result = json.loads(out.read_text())
    job = tool.load_job(str(recipe), [])
    # the recipe: CP=2 and the distributed optimizer over dp = 8 / 2 = 4 ranks
    est = estimate_memory(
        job.model,
        job.parallel,
        dp=4,
        micro_batch_size=job.train.micro_batch_size,
        num_microbatches=job.train.global_batch_size // (job.train.micro_batch_size * 4),
        bf16=True,
        ema=job.train.ema_decay > 0,
    )
    assert result["components_gib"]["total"] == pytest.approx(est.total / GIB)
    assert result["components_gib"]["optimizer"] == pytest.approx(est.optimizer / GIB)
    modes = [r["recompute"] for r in result["rows"]]
    assert modes == ["none", "selective", "full"]


def test_frame_sweep_finds_where_recompute_is_needed(tool, tmp_path):
    out = tmp_path / "sweep.json"
    args = [
        "model.name=Lumos-XL/2",
        "model.variant=i2v",
        "model.latent_size=128",
        "model.num_frames=16",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "--sweep-frames",
        "4,16",
        "--gpu-memory-gib",
        "80",
        "--json",
        str(out),
    ]
    assert tool.main(args) == 0
    rows = {(r["tokens"], r["recompute"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[(16384, "none")]["fits"]
    assert not rows[(65536, "none")]["fits"] and rows[(65536, "full")]["fits"]
    assert rows[(65536, "full")]["total_gib"] < rows[(65536, "none")]["total_gib"] / 3


def test_packing_counts_the_pack_capacity(tool):
    job = tool.load_job(None, ["data.pack=true", "data.pack_capacity=8192"])
    result = tool.plan(job, 1, capacity_gib=80)
    assert result["tokens"] == 8192 and result["micro_batch_size"] == 1
    media = tool.load_job(None, ["media.pack=true", "media.pack_capacity=8192"])
    assert tool.plan(media, 1, capacity_gib=80)["components_gib"] == result["components_gib"]


def test_bad_arguments_name_what_to_fix(tool):
    with pytest.raises(ConfigError, match="data.num_workers=4: only model"):
        tool.load_job(None, ["data.num_workers=4"])
    with pytest.raises(ConfigError, match="pack_capacity"):
        tool.load_job(None, ["data.pack=true"])
    with pytest.raises(ValueError, match="model.num_frames"):
        tool.load_job(None, ["model.num_frames=4"])  # frames need variant=i2v
    with pytest.raises(SystemExit):
        tool.main(["--sweep-frames", "4,8"])  # an image model has no frames


def test_raw_media_plan_counts_the_frozen_encoders(tool, tmp_path, capsys):
    """A raw-media recipe: the encoders' weights (from their config.json) and the worst
    bucket's encode working set enter the plan; media.encoders.* overrides apply; encoders
    whose directories are not on this machine are left out with a note."""
    import yaml

    from lumos_mcore.encoders.tiny import save_tiny_encoders
    from lumos_mcore.perf.encoder_memory import encode_working_bytes, encoder_weight_bytes

    enc = save_tiny_encoders(tmp_path / "enc")
    recipe = tmp_path / "media.yaml"
    media = {
        "path": str(tmp_path / "not_needed"),
        "buckets": [[64, 64], [64, 128]],
        "encoders": {"vae": str(enc["vae"]), "dino": str(enc["dino"]), "dino_image_size": 32},
    }
    tree = {
        "media": media,
        "model": {"name": "Lumos-Micro/2", "latent_size": 8, "cond_channels": 32},
        "train": {"micro_batch_size": 2, "global_batch_size": 4},
    }
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "plan.json"
    assert tool.main(["--config", str(recipe), "--json", str(out)]) == 0
    assert "| frozen encoders |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    job = tool.load_job(str(recipe), [])
    weights = sum(encoder_weight_bytes(job.encoders).values())
    work = encode_working_bytes(job.encoders, samples=2, frames=1, height=64, width=128)
    assert result["components_gib"]["frozen encoders"] == pytest.approx(weights / GIB)
    assert result["components_gib"]["encode working set"] == pytest.approx(work / GIB)

    half = tool.load_job(str(recipe), ["media.encoders.dtype=bf16"])
    assert sum(encoder_weight_bytes(half.encoders).values()) * 2 == weights

    media["encoders"]["vae"] = str(tmp_path / "elsewhere" / "vae")
    recipe.write_text(yaml.safe_dump(tree))
    assert tool.main(["--config", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "frozen encoders not counted: media.encoders.vae=" in text
    assert "| frozen encoders |" not in text
