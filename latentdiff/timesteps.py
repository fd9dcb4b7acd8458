"""Which timesteps a sampler visits: spacings of ``steps`` points from T-1 down to the clean end.

Every spacing returns a long (steps,) tensor on the CPU, strictly descending, starting at T-1:

- ``uniform``: evenly spaced in t from T-1 to 0 (DDIM's default; the original behaviour here).
- ``trailing``: evenly spaced from T-1 with stride T/steps, ending at T/steps - 1, not 0 (Lin et al.
  2024, "Common diffusion noise schedules and sample steps are flawed", table 2).
- ``logsnr``: evenly spaced in log-SNR, log(abar / (1 - abar)) = -2 log sigma, down to t = 0 (the
  variable DPM-Solver integrates in; Lu et al. 2022 use it for their "logSNR" skip type).
- ``karras``: sigma = sqrt((1 - abar) / abar) spaced as sigma_i^(1/rho) linear with rho = 7
  (Karras et al. 2022, eq. 5), down to sigma(0).

The continuous spacings start from sigma_max = min(sigma(T-1), 80), EDM's sigma_max (Karras et al.
2022, table 1), and then put the first step back at T-1 (the sampler's input is noise at T-1). Without
the cap, the cosine schedule's clipped last betas (sigma(999) ~ 20,000, sigma(990) ~ 71) would draw
half of a 10-step log-SNR sequence into t >= 990, where the sample is still pure noise.

The continuous spacings are rounded to the nearest timestep; where rounding would repeat a timestep
(at many steps the dense end of a spacing is finer than one timestep), neighbours are pushed apart
by one so that the sequence stays strictly descending and still starts at T-1 and ends at 0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

KARRAS_RHO = 7.0
SIGMA_MAX = 80.0  # the noisiest point the continuous spacings resolve (EDM's sigma_max)


def _check_steps(num_timesteps: int, steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > num_timesteps:
        raise ValueError(f"steps={steps} exceeds the {num_timesteps} timesteps of the schedule; use at most {num_timesteps}")


def sampling_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from T-1 down to 0 (long, descending, unique)."""
    _check_steps(num_timesteps, steps)
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()


def check_timesteps(timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Validate an explicit timestep sequence: 1-D integer, strictly descending, within 0..T-1."""
    ts = torch.as_tensor(timesteps)
    if ts.ndim != 1 or ts.numel() < 1 or ts.is_floating_point() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps must be a non-empty 1-D integer sequence, got shape {tuple(ts.shape)} {ts.dtype}")
    ts = ts.long().cpu()
    if ts.min() < 0 or ts.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in 0..{num_timesteps - 1}, got {ts.min().item()}..{ts.max().item()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly descending (noisiest first)")
    return ts


def _trailing(abar: torch.Tensor, steps: int) -> torch.Tensor:
    T = abar.shape[0]
    return (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1


def _nearest(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``values`` (monotone in t) for each target."""
    return (values[None, :] - targets[:, None]).abs().argmin(dim=1)


def _logsnr(abar: torch.Tensor, steps: int) -> torch.Tensor:
    lam = torch.log(abar) - torch.log1p(-abar)  # (T,), decreasing in t
    lam_min = max(lam[-1].item(), -2 * math.log(SIGMA_MAX))
    return _nearest(lam, torch.linspace(lam_min, lam[0].item(), steps, dtype=torch.float64))


def _karras(abar: torch.Tensor, steps: int) -> torch.Tensor:
    inv = (((1 - abar) / abar).sqrt()) ** (1 / KARRAS_RHO)  # sigma^(1/rho), increasing in t
    inv_max = min(inv[-1].item(), SIGMA_MAX ** (1 / KARRAS_RHO))
    return _nearest(inv, torch.linspace(inv_max, inv[0].item(), steps, dtype=torch.float64))


def _make_descending(ts: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Start at T-1 and push rounded timesteps apart so they are strictly descending (a final 0 stays 0)."""
    n = len(ts)
    # Step i can only lie in [n-1-i, T-1-i] if every later step is to fit below it.
    lo, hi = torch.arange(n - 1, -1, -1), num_timesteps - 1 - torch.arange(n)
    out = torch.minimum(torch.maximum(ts, lo), hi).tolist()
    out[0] = num_timesteps - 1
    for i in range(1, n):
        out[i] = min(out[i], out[i - 1] - 1)
    return torch.tensor(out, dtype=torch.long)


SPACINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "uniform": lambda abar, steps: sampling_timesteps(abar.shape[0], steps),
    "trailing": _trailing, "logsnr": _logsnr, "karras": _karras}


def make_timesteps(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """``steps`` timesteps (long, strictly descending, first T-1) for a schedule ``alphas_cumprod`` (T,)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    num_timesteps = alphas_cumprod.shape[0]
    _check_steps(num_timesteps, steps)
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    return check_timesteps(_make_descending(SPACINGS[spacing](abar, steps), num_timesteps), num_timesteps)
