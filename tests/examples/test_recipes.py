"""Every recipe in examples/recipes loads as a JobConfig and states the paper's recipe.

``data.path`` must name a folder with ``index.json``; the tests point it at a small synthetic
feature dataset (raw-media recipes: ``media.path`` and the encoder folders at stand-ins that pass
the existence checks). Token counts are recomputed from the file names (resolution, frames) and
the layouts are checked against the world sizes the recipes are meant for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.loader import load_config
from lumos_mcore.data.synthetic import write_synthetic_feature_shards

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))
PAPER = sorted(p for p in ALL if p.startswith("lumos_"))
# Paper hyper-parameters (AdamW, weight decay 0.03, 1000 warm-up steps; lr per stage / task).
PAPER_LR = {
    "lumos_i2i_xl2_256.yaml": 1.6e-4,
    "lumos_t2i_xl2_256.yaml": 1.6e-4,
    "lumos_t2i_xl2_512.yaml": 8e-5,
    "lumos_t2i_xl2_1024.yaml": 4e-5,
    "lumos_i2v_xl2_16f_256.yaml": 2e-5,
    "lumos_i2v_xl2_16f_512.yaml": 2e-5,
    "lumos_nvs_xl2_256.yaml": 2e-5,
}
COND = {"i2i": (1, 768), "t2i": (120, 4096), "i2v": (1, 768), "nvs": (1, 768)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("recipes") / "data"
    write_synthetic_feature_shards(
        out, num_samples=4, latent_size=8, cond_tokens=1, cond_dim=16, samples_per_shard=4
    )
    return str(out)


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory) -> dict[str, str]:
    """Folders that pass the media / encoder existence checks (config loading only)."""
    root = tmp_path_factory.mktemp("media")
    (root / "media").mkdir()
    (root / "media" / "index.json").write_text("{}")
    dirs = {"path": str(root / "media")}
    for name in ("vae", "dino", "t5"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({}))
        dirs[name] = str(root / name)
    return dirs


def load(name: str, data_dir: str, *overrides: str) -> JobConfig:
    return load_config(JobConfig, RECIPES / name, [f"data.path={data_dir}", *overrides])


def local_overrides(name: str, data_dir: str, media: dict[str, str]) -> list[str]:
    """Point whichever data section the recipe uses at local stand-ins."""
    tree = yaml.safe_load((RECIPES / name).read_text())
    if "media" not in tree:
        return [f"data.path={data_dir}"]
    out = [f"media.path={media['path']}"]
    for key in ("vae", "dino", "t5"):
        if (tree["media"].get("encoders") or {}).get(key):
            out.append(f"media.encoders.{key}={media[key]}")
    return out


def test_the_issue_recipes_exist():
    assert set(PAPER_LR) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_recipe_loads(name, data_dir, media_dirs):
    job = load_config(JobConfig, RECIPES / name, local_overrides(name, data_dir, media_dirs))
    source = job.data.path if job.data is not None else job.media.path
    assert source in (data_dir, media_dirs["path"])
    assert job.model.learn_sigma == job.diffusion.learn_sigma
    assert job.train.global_batch_size % job.train.micro_batch_size == 0


@pytest.mark.parametrize("name", PAPER)
def test_recipe_follows_the_paper(name, data_dir):
    job = load(name, data_dir)
    m = re.match(r"lumos_(i2i|t2i|i2v|nvs)_xl2_(?:(\d+)f_)?(\d+)\.yaml", name)
    assert m, f"{name}: recipe names are lumos_<task>_xl2_[<frames>f_]<px>.yaml"
    task, frames, px = m.group(1), int(m.group(2) or 1), int(m.group(3))
    assert (job.model.name, job.model.variant) == ("Lumos-XL/2", task)
    # XL/2 over SD-VAE latents: px / 8 latent pixels, patches of 2, all frames.
    assert job.model.latent_size == px // 8
    assert job.model.num_tokens == frames * (px // 16) ** 2
    assert (job.model.cond_tokens, job.model.cond_channels) == COND[task]
    assert job.optim.lr == pytest.approx(PAPER_LR[name])
    assert (job.optim.weight_decay, job.optim.warmup_steps) == (0.03, 1000)
    assert job.optim.lr_decay_style == "constant"
    assert (job.diffusion.objective, job.diffusion.num_train_timesteps) == ("ddpm", 1000)
    assert job.diffusion.learn_sigma and job.diffusion.cond_dropout == pytest.approx(0.1)
    assert job.model.out_channels == 8
    if task == "i2v":
        assert job.model.first_frame_condition and job.model.num_frames == 16
    if task == "nvs":
        assert job.model.model_in_channels == 8 and job.model.camera_dim == 12


def test_progressive_t2i_stages_chain(data_dir):
    """256 -> 512 -> 1024: each stage starts from the weights of the one before (init_from:
    fresh optimizer and schedule) and lowers lr."""
    stages = [load(f"lumos_t2i_xl2_{px}.yaml", data_dir) for px in (256, 512, 1024)]
    assert [s.optim.lr for s in stages] == [1.6e-4, 8e-5, 4e-5]
    assert stages[0].checkpoint.init_from is None
    for prev, nxt in zip(stages, stages[1:]):
        assert nxt.checkpoint.load is None
        assert nxt.checkpoint.init_from == prev.checkpoint_dir
        assert nxt.checkpoint.init_from_ema
    assert [s.checkpoint.init_strict for s in stages[1:]] == [True, False]  # 1024: new embedders
    assert [s.model.use_size_conditioning for s in stages] == [False, False, True]
    assert len({s.train.output_dir for s in stages}) == 3


@pytest.mark.parametrize(
    ("name", "world"),
    [
        ("lumos_i2i_xl2_256.yaml", 64),  # the paper's 64 GPUs
        ("lumos_t2i_xl2_1024.yaml", 64),
        ("lumos_i2v_xl2_16f_256.yaml", 64),
        ("lumos_i2v_xl2_16f_512.yaml", 64),
        ("lumos_nvs_xl2_256.yaml", 16),
    ],
)
def test_recipe_layout_fits_its_cluster(name, world, data_dir):
    job = load(name, data_dir)
    m = job.model
    dp = job.parallel.validate(
        world, num_attention_heads=m.num_heads_, num_layers=m.depth_, seq_len=m.num_tokens
    )
    assert dp * job.parallel.model_parallel_size == world
    nmb = job.train.num_microbatches(dp)
    assert nmb * job.train.micro_batch_size * dp == job.train.global_batch_size
    if name == "lumos_i2i_xl2_256.yaml":  # 16384 = 64 GPUs x 64 samples x 4 micro-batches
        assert (dp, nmb, job.train.global_batch_size) == (64, 4, 16384)


def test_overrides_apply_after_the_recipe(data_dir):
    job = load("lumos_i2i_xl2_256.yaml", data_dir, "parallel.tp=2", "train.steps=10")
    assert (job.parallel.tp, job.train.steps, job.optim.lr) == (2, 10, 1.6e-4)
    with pytest.raises(ValueError, match="data.path"):
        load_config(JobConfig, RECIPES / "lumos_i2i_xl2_256.yaml", ["data.path=/nonexistent"])
