"""Noise schedules, forward noising and the training loss: pure tensor functions.

Variance-preserving diffusion: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0, ..., T-1}.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .noise import seeded_normal, uniform_bits


def linear_schedule(num_timesteps: int) -> torch.Tensor:
    """abar_t for DDPM's linear betas (1e-4 .. 0.02 at T=1000, rescaled for other T; Ho et al. 2020)."""
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas.clamp(max=0.999), dim=0)  # clip as cosine does: T <= 20 would give betas >= 1


def cosine_schedule(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, dim=0)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {"cosine": cosine_schedule, "linear": linear_schedule}
PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def make_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """alphas_cumprod (T,) float64 for a schedule name."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_timesteps)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in like's dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def renoise(x0: torch.Tensor, eps: torch.Tensor, abar, sigma=0.0) -> torch.Tensor:
    """sqrt(abar) x0 + sqrt(1 - abar - sigma^2) eps: the point at noise level ``abar`` made of a clean part and a noise part.

    With fresh noise ``eps`` it is the forward process q(x_t | x0) (DDPM eq. 4); with a model's estimates
    (x0, eps) it is the deterministic part of a DDIM step to ``abar`` (Song et al. 2021, eq. 12), ``sigma``
    the standard deviation of the fresh noise the step then adds. abar = 1 gives x0. abar: a number, a
    0-dim tensor or a per-example (B, 1, ..., 1) tensor; the coefficients are computed in its precision.
    """
    abar = abar if isinstance(abar, torch.Tensor) else torch.tensor(abar, dtype=torch.float64)
    var = 1 - abar if not isinstance(sigma, torch.Tensor) and sigma == 0 else (1 - abar - sigma**2).clamp(min=0)
    return abar.sqrt().to(x0.dtype) * x0 + var.sqrt().to(x0.dtype) * eps


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) with the given noise (DDPM eq. 4); t (B,)."""
    return renoise(x0, noise, alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))))


def target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network learns: eps, or v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return _bcast(abar.sqrt(), x0) * noise - _bcast((1 - abar).sqrt(), x0) * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def predict_x0_eps(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str):
    """Model output at x_t -> (x0, eps) estimates; abar is (B,) or a scalar tensor."""
    abar = abar.expand(x_t.shape[0]) if abar.ndim == 0 else abar
    a, s = _bcast(abar.sqrt(), x_t), _bcast((1 - abar).sqrt(), x_t)
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def min_snr_weight(abar: torch.Tensor, prediction: str, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight per example (Hang et al. 2023, eq. 9 / sec. 3.4), SNR = abar / (1 - abar).

    Clamping the x0-space weight SNR at gamma stops the low-noise steps dominating training. In the
    network's own target space that is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    snr = abar / (1 - abar)
    x0_weight = snr.clamp(max=gamma)
    if prediction == "eps":
        return x0_weight / snr
    if prediction == "v":
        return x0_weight / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def diffusion_loss(model: Callable, x0: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor, config,
                   null_label: int = 10, *, seeds: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between model(x_t, t, y') and its target at a uniform random timestep t, y' = the labels with the CFG
    dropout: the objective a ``config.DiffusionConfig`` describes (prediction eps or v, label_dropout,
    loss_weighting: "none" for the plain mean, "min_snr" for ``min_snr_weight`` with gamma min_snr_gamma).

    Randomness comes from ``generator``, or, with ``seeds`` (B,) int64, from each example's own seed
    (counter-based), so an example's t, noise and dropout do not depend on how the batch is split.
    """
    b, T = x0.shape[0], alphas_cumprod.shape[0]
    if seeds is not None:
        u = uniform_bits(seeds, 2, stream=0)  # (B, 2): timestep, label dropout
        t = (u[:, 0] * T).long().clamp(max=T - 1)
        noise = seeded_normal(seeds, tuple(x0.shape[1:]), stream=1, dtype=x0.dtype)
        y = torch.where(u[:, 1] < config.label_dropout, torch.full_like(y, null_label), y)  # the CFG label dropout
    else:
        t = torch.randint(0, T, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        y = drop_labels(y, config.label_dropout, null_label, generator)  # the CFG label dropout
    abar = alphas_cumprod.to(x0.device, torch.float32)[t]
    x_t = q_sample(x0, t, noise, alphas_cumprod.to(torch.float32))
    out = model(x_t, t, y)
    if config.loss_weighting == "none":
        return F.mse_loss(out.float(), target(x0, noise, abar, config.prediction).float())
    if config.loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {config.loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    per_example = (out.float() - target(x0, noise, abar, config.prediction).float()).square().flatten(1).mean(1)  # (B,)
    weight = min_snr_weight(alphas_cumprod.to(x0.device, torch.float64)[t], config.prediction, config.min_snr_gamma)  # (B,)
    return (weight.float() * per_example).mean()
