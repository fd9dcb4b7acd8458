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
LOSS_WEIGHTINGS = ("none", "min_snr", "min_snr_plus_one")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")


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


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log(abar / (1 - abar)) per timestep: decreasing in t."""
    a = alphas_cumprod.double()
    return (a / (1 - a)).log()


def sample_timesteps(u: torch.Tensor, alphas_cumprod: torch.Tensor, sampling: str = "uniform",
                     logsnr_mean: float = 1.0, logsnr_std: float = 2.4) -> torch.Tensor:
    """Training timesteps (B,) from uniforms u (B,) in (0, 1).

    "uniform": t uniform on 0..T-1. "lognormal": log-SNR ~ N(mean, std^2), snapped to the schedule's nearest
    timestep: EDM's log-normal noise levels (Karras et al. 2022, ln sigma ~ N(P_mean, P_std^2)) written for
    unit-variance latents, where log-SNR = -2 ln sigma; EDM's P_mean = -1.2, P_std = 1.2 at sigma_data = 0.5
    is log-SNR ~ N(1.0, 2.4^2) here.
    """
    T = alphas_cumprod.shape[0]
    if sampling == "uniform":
        return (u * T).long().clamp(max=T - 1)
    if sampling != "lognormal":
        raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {TIMESTEP_SAMPLINGS}")
    z = math.sqrt(2.0) * torch.erfinv(2 * u.double() - 1)  # standard normal quantile of u
    target_snr = logsnr_mean + logsnr_std * z  # (B,)
    table = -log_snr(alphas_cumprod).to(u.device)  # increasing in t
    hi = torch.searchsorted(table, -target_snr).clamp(1, T - 1)  # first index with table >= -target
    lo = hi - 1
    nearer_lo = (-target_snr - table[lo]).abs() <= (table[hi] - (-target_snr)).abs()
    return torch.where(nearer_lo, lo, hi)


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def min_snr_weight(abar: torch.Tensor, prediction: str, gamma: float = 5.0, plus_one: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight per example (Hang et al. 2023, eq. 9 / sec. 3.4), SNR = abar / (1 - abar).

    Clamping the x0-space weight SNR at gamma stops the low-noise steps dominating training. In the
    network's own target space that is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    ``plus_one``: the x0-space weight is min(SNR + 1, gamma + 1) instead (Salimans & Ho 2022's "SNR + 1",
    which is the plain v loss, clamped the same way): the low-noise steps are capped as before, but the
    high-noise steps, where min-SNR's weight falls to SNR -> 0, keep the full v-loss weight.
    """
    snr = abar / (1 - abar)
    x0_weight = (snr + 1).clamp(max=gamma + 1) if plus_one else snr.clamp(max=gamma)
    if prediction == "eps":
        return x0_weight / snr
    if prediction == "v":
        return x0_weight / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def diffusion_loss(model: Callable, x0: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction: str = "v", label_dropout: float = 0.1, null_label: int = 10,
                   generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                   loss_weighting: str = "none", min_snr_gamma: float = 5.0, timestep_sampling: str = "uniform",
                   logsnr_mean: float = 1.0, logsnr_std: float = 2.4) -> torch.Tensor:
    """MSE between model(x_t, t, y') and the target, t from ``sample_timesteps``, y' = labels with CFG dropout.

    loss_weighting "min_snr" weights each example's MSE by ``min_snr_weight`` (gamma ``min_snr_gamma``);
    "none" is the plain mean. Randomness comes from ``generator``, or, with ``seeds`` (B,) int64, from each example's own seed
    (counter-based), so an example's t, noise and dropout do not depend on how the batch is split.
    """
    b, T = x0.shape[0], alphas_cumprod.shape[0]
    if seeds is not None:
        u = uniform_bits(seeds, 2, stream=0)  # (B, 2): timestep, label dropout
        t = sample_timesteps(u[:, 0], alphas_cumprod, timestep_sampling, logsnr_mean, logsnr_std)
        noise = seeded_normal(seeds, tuple(x0.shape[1:]), stream=1, dtype=x0.dtype)
        y = torch.where(u[:, 1] < label_dropout, torch.full_like(y, null_label), y)  # the CFG label dropout
    else:
        if timestep_sampling == "uniform":
            t = torch.randint(0, T, (b,), generator=generator, device=x0.device)
        else:
            u = torch.rand(b, generator=generator, device=x0.device, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            t = sample_timesteps(u, alphas_cumprod.to(x0.device), timestep_sampling, logsnr_mean, logsnr_std)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        y = drop_labels(y, label_dropout, null_label, generator)  # the CFG label dropout
    abar = alphas_cumprod.to(x0.device, torch.float32)[t]
    x_t = q_sample(x0, t, noise, alphas_cumprod.to(torch.float32))
    out = model(x_t, t, y)
    if loss_weighting == "none":
        return F.mse_loss(out.float(), target(x0, noise, abar, prediction).float())
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    per_example = (out.float() - target(x0, noise, abar, prediction).float()).square().flatten(1).mean(1)  # (B,)
    weight = min_snr_weight(alphas_cumprod.to(x0.device, torch.float64)[t], prediction, min_snr_gamma,
                            plus_one=loss_weighting == "min_snr_plus_one")  # (B,)
    return (weight.float() * per_example).mean()
