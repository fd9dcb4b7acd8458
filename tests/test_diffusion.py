"""Schedules, forward noising, eps/v targets and their inverse, label dropout, the training loss."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiff.config import DiffusionConfig
from latentdiff.diffusion import (SCHEDULES, cosine_schedule, diffusion_loss, drop_labels, linear_schedule,
                                  make_schedule, min_snr_weight, predict_x0_eps, q_sample, target)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [2, 10, 100, 1000])
def test_schedule_is_decreasing_in_unit_interval(name, T):
    abar = make_schedule(name, T)
    assert abar.shape == (T,) and abar.dtype == torch.float64
    assert (abar > 0).all() and (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_schedule_endpoints():
    cos, lin = cosine_schedule(1000), linear_schedule(1000)
    assert cos[0] > 0.999 and cos[-1] < 1e-6  # nearly clean at t=0, nearly pure noise at T-1
    assert lin[0] == pytest.approx(1 - 1e-4) and lin[-1] < 1e-4
    # Linear betas run 1e-4 .. 0.02 at T=1000.
    betas = 1 - lin / torch.cat([torch.ones(1, dtype=torch.float64), lin[:-1]])
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # Cosine betas never exceed the 0.999 clip.
    cbetas = 1 - cos / torch.cat([torch.ones(1, dtype=torch.float64), cos[:-1]])
    assert cbetas.max().item() <= 0.999 + 1e-12


def test_cosine_matches_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = cosine_schedule(T)
    for t in [0, 10, 500, 900]:
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("quadratic", 10)


def test_q_sample_exact_formula():
    abar = cosine_schedule(100)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 7, 7, generator=g), torch.randn(5, 4, 7, 7, generator=g)
    t = torch.tensor([0, 10, 50, 98, 99])
    xt = q_sample(x0, t, noise, abar)
    for i, ti in enumerate(t.tolist()):
        a = abar[ti].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-6)


def test_q_sample_statistics():
    """x_t | x0 has mean sqrt(abar) x0 and variance 1 - abar."""
    abar = linear_schedule(100)
    n, ti = 200_000, 40
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1, 1, 1), 2.0)
    xt = q_sample(x0, torch.full((n,), ti), torch.randn(n, 1, 1, 1, generator=g), abar)
    a = abar[ti].item()
    assert xt.mean().item() == pytest.approx(2 * math.sqrt(a), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - a, abs=0.01)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_target_and_predict_x0_eps_invert_each_other(prediction, dtype):
    abar_all = cosine_schedule(1000)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 100, 500, 900, 990])
    x0 = torch.randn(len(t), 4, 7, 7, generator=g, dtype=dtype)
    eps = torch.randn(len(t), 4, 7, 7, generator=g, dtype=dtype)
    abar = abar_all[t].to(dtype)
    xt = q_sample(x0, t, eps, abar_all.to(dtype))
    out = target(x0, eps, abar, prediction)
    x0_hat, eps_hat = predict_x0_eps(out, xt, abar, prediction)
    tol = 1e-9 if dtype == torch.float64 else 2e-3  # eps-prediction divides by sqrt(abar) ~ 0.03 at t=990
    assert torch.allclose(eps_hat, eps, atol=tol)
    assert torch.allclose(x0_hat, x0, atol=tol)


def test_v_target_formula():
    x0, eps, abar = torch.tensor([[[[1.0]]]]), torch.tensor([[[[2.0]]]]), torch.tensor([0.36])
    assert target(x0, eps, abar, "v").item() == pytest.approx(0.6 * 2 - 0.8 * 1)
    assert target(x0, eps, abar, "eps").item() == 2.0


def test_predict_x0_eps_scalar_abar():
    xt = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = predict_x0_eps(out, xt, torch.tensor(0.5, dtype=torch.float64), "v")
    b = predict_x0_eps(out, xt, torch.full((3,), 0.5, dtype=torch.float64), "v")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unknown_prediction():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError):
        target(x, x, torch.ones(1), "x0")
    with pytest.raises(ValueError):
        predict_x0_eps(x, x, torch.ones(1), "x0")


# ---------------------------------------------------------------------------------------------- CFG dropout
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_labels_rate(p):
    n = 200_000
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, p, null_label=10, generator=torch.Generator().manual_seed(1))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - p) < 0.005  # ~7 standard errors at n=200k
    assert torch.equal(out[~dropped], y[~dropped])  # kept labels are untouched
    again = drop_labels(y, p, 10, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_drop_labels_p0_changes_nothing():
    y = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator().manual_seed(0)), y)


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_zero_for_oracle(prediction):
    """A model that returns the exact target gives zero loss; labels arrive with dropout applied."""
    abar = cosine_schedule(100).float()
    x0 = torch.randn(64, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    seen = {}

    def oracle(x_t, t, y_in):
        seen["y"] = y_in
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    loss = diffusion_loss(oracle, x0, y, abar, DiffusionConfig(prediction=prediction, label_dropout=0.5), null_label=10,
                          generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6
    assert (seen["y"] == 10).any() and (seen["y"] != 10).any()


def test_diffusion_loss_reproducible_with_generator():
    abar = cosine_schedule(100).float()
    x0 = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    model = lambda x, t, y: x * 0.5  # noqa: E731
    a = diffusion_loss(model, x0, y, abar, DiffusionConfig(), generator=torch.Generator().manual_seed(3))
    b = diffusion_loss(model, x0, y, abar, DiffusionConfig(), generator=torch.Generator().manual_seed(3))
    c = diffusion_loss(model, x0, y, abar, DiffusionConfig(), generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()


# ---------------------------------------------------------------------------------------------- min-SNR weighting
def test_min_snr_weight_at_known_timesteps():
    """SNR = abar / (1 - abar); v: min(SNR, g) / (SNR + 1), eps: min(SNR, g) / SNR (Hang et al. 2023)."""
    abar = torch.tensor([0.5, 0.8, 0.9, 0.99], dtype=torch.float64)  # SNR 1, 4, 9, 99
    snr = torch.tensor([1.0, 4.0, 9.0, 99.0], dtype=torch.float64)
    v = min_snr_weight(abar, "v", gamma=5.0)
    assert torch.allclose(v, torch.tensor([1 / 2, 4 / 5, 5 / 10, 5 / 100], dtype=torch.float64))
    eps = min_snr_weight(abar, "eps", gamma=5.0)
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 5 / 9, 5 / 99], dtype=torch.float64))
    # gamma large: v weight is SNR / (SNR + 1) = abar, i.e. plain x0-space MSE.
    assert torch.allclose(min_snr_weight(abar, "v", gamma=1e9), snr / (snr + 1))
    with pytest.raises(ValueError, match="prediction"):
        min_snr_weight(abar, "x0")


def _recorded_loss_terms(prediction: str, **kwargs):
    """Run diffusion_loss with a recording model -> (loss, per-example MSE (B,), abar at the drawn t (B,))."""
    abar = cosine_schedule(100).float()
    x0 = torch.randn(32, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    seen = {}

    def model(x_t, t, y):
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t

    loss = diffusion_loss(model, x0, torch.arange(32) % 10, abar, DiffusionConfig(prediction=prediction, **kwargs),
                          seeds=torch.arange(32) + 7)
    a = abar[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["x_t"] - a.sqrt() * x0) / (1 - a).sqrt()
    tgt = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return loss, (0.5 * seen["x_t"] - tgt).square().flatten(1).mean(1), abar[seen["t"]]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_weighting_none_is_the_plain_mse_and_min_snr_reweights(prediction):
    plain, per_example, abar_t = _recorded_loss_terms(prediction)
    assert torch.equal(plain, _recorded_loss_terms(prediction, loss_weighting="none")[0])  # the default, bit for bit
    assert plain.item() == pytest.approx(per_example.mean().item(), rel=1e-5)
    weighted = _recorded_loss_terms(prediction, loss_weighting="min_snr", min_snr_gamma=2.0)[0]
    w = min_snr_weight(abar_t.double(), prediction, 2.0).float()
    assert weighted.item() == pytest.approx((w * per_example).mean().item(), rel=1e-5)
    assert weighted.item() < plain.item()  # every weight is <= 1 for eps and v
    with pytest.raises(ValueError, match="loss_weighting"):
        _recorded_loss_terms(prediction, loss_weighting="p2")


def test_retired_keys_load_where_they_meant_todays_behaviour():
    """A config.json from before the log-normal option's removal loads when it held the uniform default; a run that
    used it is refused with one line naming the key (docs/results.md, part 3 measured it no better)."""
    from latentdiff.config import from_dict
    from latentdiff.errors import ConfigError

    old = {"schedule": "cosine", "timestep_sampling": "uniform", "logsnr_mean": 1.0, "logsnr_std": 2.4}
    assert from_dict(DiffusionConfig, old) == DiffusionConfig()
    with pytest.raises(ConfigError, match=r"timestep_sampling='lognormal' was removed.*remove the key"):
        from_dict(DiffusionConfig, {**old, "timestep_sampling": "lognormal"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DiffusionConfig, {"timestep_samplin": "uniform"})

