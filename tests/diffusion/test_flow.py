"""Flow-matching objective: path, velocity target, logit-normal timesteps, masking."""

from __future__ import annotations

import math

import pytest
import torch

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.flow import FlowMatching, shift_time
from lumos_mcore.diffusion.objective import build_objective


def _flow(**kw) -> FlowMatching:
    obj = build_objective(DiffusionConfig(objective="flow", **kw))
    assert isinstance(obj, FlowMatching)
    return obj


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 4, 3, 4, 4)])
def test_path_and_zero_loss_for_true_velocity(shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    noise = torch.randn(*shape, generator=g, dtype=torch.float64)
    obj = _flow()
    t = obj.sample_timesteps(shape[0], generator=g)
    x_t = obj.add_noise(x0, noise, t)
    for i in range(shape[0]):
        ti = float(t[i])
        torch.testing.assert_close(x_t[i], (1 - ti) * x0[i] + ti * noise[i])
    v = noise - x0
    assert torch.all(obj.loss(v, x0=x0, x_t=x_t, noise=noise, t=t) == 0)
    # a 2C (learned-σ) head: only the first C channels are the velocity
    v2 = torch.cat([v, torch.randn_like(v)], dim=1)
    assert torch.all(obj.loss(v2, x0=x0, x_t=x_t, noise=noise, t=t) == 0)
    wrong = v + 0.5
    torch.testing.assert_close(
        obj.loss(wrong, x0=x0, x_t=x_t, noise=noise, t=t),
        torch.full((shape[0],), 0.25, dtype=torch.float64),
    )


def test_model_timesteps_scaled():
    obj = _flow(num_train_timesteps=1000)
    t = torch.tensor([0.0, 0.25, 0.999])
    torch.testing.assert_close(obj.model_timesteps(t), torch.tensor([0.0, 250.0, 999.0]))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_statistics(mean, std):
    n = 200_000
    obj = _flow(flow_logit_mean=mean, flow_logit_std=std)
    t = obj.sample_timesteps(n, generator=torch.Generator().manual_seed(11)).double()
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - mean) < 4 * std / math.sqrt(n)
    # std of the sample std is about std / sqrt(2n)
    assert abs(logit.std().item() - std) < 4 * std / math.sqrt(2 * n)
    # median of a logit-normal is sigmoid(mean)
    assert abs(t.median().item() - 1 / (1 + math.exp(-mean))) < 0.01


def test_mask_excludes_elements():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 5, 2, 2, generator=g)
    noise = torch.randn(3, 4, 5, 2, 2, generator=g)
    obj = _flow()
    t = obj.sample_timesteps(3, generator=g)
    x_t = obj.add_noise(x0, noise, t)
    pred = torch.randn(3, 4, 5, 2, 2, generator=g)
    mask = torch.ones(3, 1, 5, 1, 1)
    mask[:, :, 0] = 0
    loss = obj.loss(pred, x0=x0, x_t=x_t, noise=noise, t=t, mask=mask)
    expected = ((pred - (noise - x0))[:, :, 1:] ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, expected)
    # a sample whose every element is masked contributes zero, not NaN
    mask[1] = 0
    loss = obj.loss(pred, x0=x0, x_t=x_t, noise=noise, t=t, mask=mask)
    assert loss[1].item() == 0.0 and torch.isfinite(loss).all()


def test_shift_time():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > t[1:-1])


def test_shift_applies_to_training_time_as_to_sampling():
    """``diffusion.flow_shift`` moves the training draws exactly as it bends the sampler's
    grid: the shifted draw is shift_time of the unshifted one, and pulls mass toward noise."""
    plain = _flow().sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    shifted = _flow(flow_shift=3.0).sample_timesteps(
        4096, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(shifted, shift_time(plain, 3.0))
    assert shifted.median() > plain.median() + 0.1 and shifted.max() < 1
