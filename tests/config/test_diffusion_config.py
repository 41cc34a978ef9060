"""DiffusionConfig validation and its use through the generic loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.config.loader import load_config
from lumos_mcore.diffusion.flow import FlowMatching
from lumos_mcore.diffusion.gaussian import GaussianDiffusion
from lumos_mcore.diffusion.objective import build_objective


@dataclass
class _Root:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"objective": "edm"}, r"diffusion.objective='edm': unknown objective"),
        ({"num_train_timesteps": 1}, r"diffusion.num_train_timesteps=1: must be >= 2"),
        ({"beta_schedule": "cosine"}, r"diffusion.beta_schedule='cosine'"),
        ({"beta_start": 0.0}, r"diffusion.beta_start=0.0"),
        ({"beta_end": 1e-5}, r"diffusion.beta_end=1e-05: must lie in \[diffusion.beta_start"),
        ({"vlb_weight": -1.0}, r"diffusion.vlb_weight=-1.0"),
        ({"flow_logit_std": 0.0}, r"diffusion.flow_logit_std=0.0"),
        ({"flow_shift": -2.0}, r"diffusion.flow_shift=-2.0"),
        ({"cond_dropout": 1.0}, r"diffusion.cond_dropout=1.0"),
    ],
)
def test_validation_names_the_flag(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiffusionConfig(**kwargs)


def test_flow_with_learned_sigma_is_allowed_and_reads_first_half():
    cfg = DiffusionConfig(objective="flow", learn_sigma=True, num_train_timesteps=1)
    assert cfg.model_out_channels(4) == 8
    obj = build_objective(cfg)
    x0 = torch.zeros(1, 4, 2, 2)
    noise = torch.ones(1, 4, 2, 2)
    t = torch.tensor([0.5])
    out = torch.cat([noise - x0, torch.full_like(x0, 9.0)], dim=1)
    assert obj.loss(out, x0=x0, x_t=obj.add_noise(x0, noise, t), noise=noise, t=t).item() == 0.0


def test_loader_builds_objectives():
    cfg = load_config(_Root, None, ["diffusion.objective=flow", "diffusion.flow_shift=3"])
    assert isinstance(build_objective(cfg.diffusion), FlowMatching)
    assert build_objective(cfg.diffusion).shift == 3.0
    cfg = load_config(_Root, None, ["diffusion.beta_end=0.012", "diffusion.learn_sigma=false"])
    obj = build_objective(cfg.diffusion)
    assert isinstance(obj, GaussianDiffusion) and not obj.learn_sigma
    assert obj.buffer("betas")[-1].item() == pytest.approx(0.012)
    with pytest.raises(ValueError, match="diffusion.cond_dropout=1.5"):
        load_config(_Root, None, ["diffusion.cond_dropout=1.5"])
