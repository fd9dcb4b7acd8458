"""Moving averages of the weights: the classic warmed-up EMA and EDM2's power-function EMA.

Classic (``train.ema_decay``): after optimizer step t (0-based) the average moves with decay
``min(ema_decay, (1 + t) / (10 + t))``. The warm-up term is itself a power-function average: it gives step
tau a weight close to tau^8, so until t is about 9 / (1 - ema_decay) (9,000 steps at 0.999) the average is
a power-function EMA of relative width 0.09 and ``ema_decay`` does not bind.

Power function (``train.ema_std``, Karras et al. 2024, "Analyzing and improving the training dynamics of
diffusion models", section 3.1): after step t (1-based) the decay is (1 - 1/t)^(gamma + 1), so that step
tau has weight proportional to tau^gamma at every point of training. The averaging window scales with the
length of the run; its width relative to the run's length is ``sigma_rel`` (sigma_rel_to_gamma).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)  # called once per training step with the same width
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma whose weight profile tau^gamma on [0, t] has std sigma_rel * t.

    The profile's relative std is sqrt((g + 1) / ((g + 2)^2 (g + 3))), decreasing in g; solved by bisection.
    """
    if not 0.0 < sigma_rel < gamma_to_sigma_rel(0.0):
        raise ValueError(f"ema_std={sigma_rel} is outside (0, {gamma_to_sigma_rel(0.0):.4f}); EDM2 uses 0.05-0.2")
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the weight profile tau^gamma on [0, t] (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_decay(step: int, gamma: float) -> float:
    """Decay of the power-function EMA after ``step`` optimizer steps (1-based): (1 - 1/step)^(gamma + 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1) if step > 0 else 0.0


def ema_decay_at(step: int, ema_decay: float, ema_std: float | None) -> float:
    """The decay applied after 0-based optimizer step ``step`` (see the module docstring)."""
    if ema_std is not None:
        return power_decay(step + 1, sigma_rel_to_gamma(ema_std))
    return min(ema_decay, (1 + step) / (10 + step))


class EMA:
    """ema <- decay * ema + (1 - decay) * model over all float tensors, one fused call per step."""

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module):
        self.e = [p for p in ema.state_dict().values() if p.is_floating_point()]
        self.m = [p for p in model.state_dict().values() if p.is_floating_point()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.e, self.m, 1.0 - decay)
