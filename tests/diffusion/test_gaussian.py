"""DDPM (IDDPM, learned range σ) objective against an independent float64 scalar re-derivation."""

from __future__ import annotations

import math

import pytest
import torch

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.diffusion.gaussian import GaussianDiffusion, get_betas, space_timesteps
from lumos_mcore.diffusion.objective import build_objective

T = 1000


def _ref_schedule() -> tuple[list[float], list[float]]:
    """β_t and ᾱ_t from first principles, python floats."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    return betas, abar


def _phi(x: float) -> float:
    """The tanh approximation of the standard normal CDF the original decoder likelihood uses."""
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _ref_element(t: int, x0: float, xt: float, eps: float, v: float) -> tuple[float, float]:
    """(posterior-vs-model KL or decoder NLL in bits, model log-variance) for one element."""
    betas, abar = _ref_schedule()
    ab, ab_prev = abar[t], (abar[t - 1] if t > 0 else 1.0)
    beta = betas[t]
    alpha = 1.0 - beta
    # posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)
    c0 = math.sqrt(ab_prev) * beta / (1.0 - ab)
    ct = math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab)
    mu_q = c0 * x0 + ct * xt
    var_tilde1 = (1.0 - abar[0]) / (1.0 - abar[1]) * betas[1]
    var_q = var_tilde1 if t == 0 else (1.0 - ab_prev) / (1.0 - ab) * beta
    # model: x0 from ε, same posterior formula, log-variance between log β̃ and log β
    x0_hat = (xt - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    mu_p = c0 * x0_hat + ct * xt
    frac = (v + 1.0) / 2.0
    logvar_p = frac * math.log(beta) + (1.0 - frac) * math.log(var_q)
    var_p = math.exp(logvar_p)
    if t > 0:
        kl = 0.5 * math.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / (2.0 * var_p) - 0.5
        return kl / math.log(2.0), logvar_p
    std = math.sqrt(var_p)
    hi = _phi((x0 - mu_p + 1.0 / 255.0) / std)
    lo = _phi((x0 - mu_p - 1.0 / 255.0) / std)
    if x0 < -0.999:
        p = hi
    elif x0 > 0.999:
        p = 1.0 - lo
    else:
        p = hi - lo
    return -math.log(max(p, 1e-12)) / math.log(2.0), logvar_p


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    b, c = 5, 3
    x0 = torch.rand(b, c, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 1, 0, 0] = -1.0, 1.0  # exercise both tail bins of the decoder NLL
    noise = torch.randn(b, c, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 999])
    out = torch.randn(b, 2 * c, 2, 2, generator=g, dtype=torch.float64) * 0.5
    out[:, c:] = out[:, c:].clamp(-1, 1)
    return x0, noise, t, out


def test_schedule_buffers_match_first_principles():
    diff = GaussianDiffusion(get_betas("linear", T))
    betas, abar = _ref_schedule()
    torch.testing.assert_close(
        diff.buffer("alphas_cumprod"), torch.tensor(abar, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        diff.buffer("betas"), torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_add_noise_float64(case):
    x0, noise, t, _ = case
    diff = GaussianDiffusion(get_betas("linear", T))
    _, abar = _ref_schedule()
    x_t = diff.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-12, atol=1e-12)


def test_loss_terms_match_reference(case):
    x0, noise, t, out = case
    obj = build_objective(DiffusionConfig())
    x_t = obj.add_noise(x0, noise, t)
    terms = obj.loss_terms(out, x0=x0, x_t=x_t, noise=noise, t=t)
    c = x0.shape[1]
    for i, ti in enumerate(t.tolist()):
        vals = [
            _ref_element(ti, a, b, e, v)[0]
            for a, b, e, v in zip(
                x0[i].flatten().tolist(),
                x_t[i].flatten().tolist(),
                out[i, :c].flatten().tolist(),
                out[i, c:].flatten().tolist(),
            )
        ]
        vb_ref = sum(vals) / len(vals)
        mse_ref = ((out[i, :c] - noise[i]) ** 2).mean().item()
        assert terms["vb"][i].item() == pytest.approx(vb_ref, rel=1e-9, abs=1e-12)
        assert terms["mse"][i].item() == pytest.approx(mse_ref, rel=1e-12)
        assert terms["loss"][i].item() == pytest.approx(mse_ref + vb_ref, rel=1e-9)


def test_model_log_variance_matches_reference(case):
    x0, noise, t, out = case
    diff = GaussianDiffusion(get_betas("linear", T))
    x_t = diff.add_noise(x0, noise, t)
    pm = diff.p_mean_variance(out, x_t, t)
    c = x0.shape[1]
    ref = torch.tensor(
        [
            [
                _ref_element(ti, 0.0, xt, e, v)[1]
                for xt, e, v in zip(
                    x_t[i].flatten().tolist(),
                    out[i, :c].flatten().tolist(),
                    out[i, c:].flatten().tolist(),
                )
            ]
            for i, ti in enumerate(t.tolist())
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(pm["log_variance"].flatten(1), ref, rtol=1e-12, atol=1e-12)


def test_vb_trains_only_variance_channels(case):
    x0, noise, t, out = case
    obj = build_objective(DiffusionConfig(vlb_weight=3.0))
    x_t = obj.add_noise(x0, noise, t)
    out = out.clone().requires_grad_(True)
    obj.loss(out, x0=x0, x_t=x_t, noise=noise, t=t).sum().backward()
    c = x0.shape[1]
    n = x0[0].numel()
    # the ε channels see only d(MSE)/dε; the VB term (weighted 3x) reaches only the v channels
    torch.testing.assert_close(out.grad[:, :c], 2.0 * (out[:, :c] - noise).detach() / n)
    assert out.grad[:, c:].abs().sum() > 0


def test_eps_loss_zero_for_true_noise_and_vb_nonnegative(case):
    x0, noise, t, out = case
    obj = build_objective(DiffusionConfig())
    x_t = obj.add_noise(x0, noise, t)
    perfect = torch.cat([noise, out[:, x0.shape[1] :]], dim=1)
    terms = obj.loss_terms(perfect, x0=x0, x_t=x_t, noise=noise, t=t)
    assert torch.all(terms["mse"] == 0)
    assert torch.all(terms["vb"][t > 0] >= 0)
    # with ε exact and v = -1 the model variance equals the posterior's: KL = 0 for t > 0
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    vb = obj.loss_terms(exact, x0=x0, x_t=x_t, noise=noise, t=t)["vb"]
    torch.testing.assert_close(vb[t > 0], torch.zeros_like(vb[t > 0]), atol=1e-10, rtol=0)


def test_fixed_sigma_is_plain_mse(case):
    x0, noise, t, out = case
    obj = build_objective(DiffusionConfig(learn_sigma=False))
    x_t = obj.add_noise(x0, noise, t)
    c = x0.shape[1]
    loss = obj.loss(out[:, :c], x0=x0, x_t=x_t, noise=noise, t=t)
    torch.testing.assert_close(loss, ((out[:, :c] - noise) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="learn_sigma=False"):
        obj.loss(out, x0=x0, x_t=x_t, noise=noise, t=t)


def test_video_mask_excludes_condition_frame():
    """A per-frame mask equals computing the loss on the kept frames only."""
    g = torch.Generator().manual_seed(1)
    b, c, f = 3, 4, 5
    x0 = torch.randn(b, c, f, 3, 3, generator=g) * 0.5
    noise = torch.randn(b, c, f, 3, 3, generator=g)
    out = torch.randn(b, 2 * c, f, 3, 3, generator=g).clamp(-1, 1)
    obj = build_objective(DiffusionConfig())
    t = obj.sample_timesteps(b, generator=g)
    t[0] = 0
    x_t = obj.add_noise(x0, noise, t)
    mask = torch.ones(b, 1, f, 1, 1)
    mask[:, :, 0] = 0
    masked = obj.loss_terms(out, x0=x0, x_t=x_t, noise=noise, t=t, mask=mask)
    sliced = obj.loss_terms(
        out[:, :, 1:], x0=x0[:, :, 1:], x_t=x_t[:, :, 1:], noise=noise[:, :, 1:], t=t
    )
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(masked[key], sliced[key], rtol=1e-5, atol=1e-6)
    # changing the masked-out frame's prediction does not change the loss
    out2 = out.clone()
    out2[:, :, 0] += 5.0
    torch.testing.assert_close(
        obj.loss(out2, x0=x0, x_t=x_t, noise=noise, t=t, mask=mask), masked["loss"]
    )


def test_timesteps_uniform_and_reproducible():
    obj = build_objective(DiffusionConfig())
    t1 = obj.sample_timesteps(20000, generator=torch.Generator().manual_seed(3))
    t2 = obj.sample_timesteps(20000, generator=torch.Generator().manual_seed(3))
    assert t1.dtype == torch.long and torch.equal(t1, t2)
    assert int(t1.min()) >= 0 and int(t1.max()) <= T - 1
    # mean of U{0..999} is 499.5 with std 288.7/sqrt(n)
    assert abs(t1.double().mean().item() - 499.5) < 4 * 288.7 / math.sqrt(20000)
    torch.testing.assert_close(obj.model_timesteps(t1), t1.float())


def test_space_timesteps_and_respacing():
    assert space_timesteps(1000, [10]) == [round(i * 999 / 9) for i in range(10)]
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    diff = GaussianDiffusion(get_betas("linear", T))
    keep = space_timesteps(1000, 25)
    spaced = diff.respace(keep)
    # the respaced process has the same ᾱ at the kept steps and maps indices back for the model
    torch.testing.assert_close(
        spaced.buffer("alphas_cumprod"), diff.buffer("alphas_cumprod")[keep], rtol=1e-12, atol=0
    )
    assert spaced.model_timesteps(torch.arange(25)).tolist() == [float(k) for k in keep]


def test_other_schedules():
    cos = get_betas("squaredcos_cap_v2", 1000)
    assert cos.max().item() == pytest.approx(0.999)
    sl = get_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    with pytest.raises(ValueError, match="beta_schedule"):
        get_betas("foo", 10)
