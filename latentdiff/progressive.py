"""Guided progressive distillation (Salimans & Ho 2022; Meng et al. 2023, "On distillation of guided diffusion models").

Stage k of K teaches the student to take ONE deterministic DDIM step where its teacher takes TWO, on a
trailing grid of n0 / 2^k timesteps (n0 = ``distill.solver_steps``). Stage 1's teacher is the CFG-guided
LDM, with w drawn per example; each later stage's teacher is the previous stage's student (its EMA),
which takes w as an input. After K stages the student samples in n0 / 2^K steps with ``sampler="ddim"``
(eta 0), one undoubled UNet batch per step. Pure functions of their inputs; the run is distill.py's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .diffusion import q_sample, renoise, target
from .noise import seeded_normal, uniform_bits
from .sampling import Denoiser, guided
from .timesteps import make_timesteps


def stage_grids(alphas_cumprod: torch.Tensor, n0: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher grid, student grid) of 1-based ``stage``: n0 / 2^(stage-1) and n0 / 2^stage trailing timesteps,
    noisiest first, each followed by -1 for "the end" (the clean latent). The student's grid is every other
    point of the teacher's."""
    def grid(n: int) -> torch.Tensor:
        return torch.cat([make_timesteps(alphas_cumprod, n, "trailing"), torch.tensor([-1])])
    teacher, student = grid(n0 // 2 ** (stage - 1)), grid(n0 // 2 ** stage)
    assert torch.equal(teacher[::2], student), "trailing grids nest when n0 is divisible by 2^stages"
    return teacher, student


def _abar_at(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar[t] as (B, 1, 1, 1); 1 at the end (t = -1)."""
    return torch.where(t >= 0, abar[t.clamp(min=0)], torch.ones_like(t, dtype=abar.dtype)).view(-1, 1, 1, 1)


def ddim_to(abar: torch.Tensor, s: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) to timesteps s (B,) from the estimates (x0, eps); x0 itself at the end (s = -1)."""
    return renoise(x0, eps, _abar_at(abar, s))


def one_step_target(abar: torch.Tensor, x_t, t, x_s, s, prediction: str) -> torch.Tensor:
    """The network output (eps or v) at (x_t, t) whose single DDIM step lands exactly on x_s (Salimans & Ho 2022,
    Alg. 2, written for both parameterisations)."""
    a_t, a_s = _abar_at(abar, t), _abar_at(abar, s)
    sig_t, sig_s = (1 - a_t).sqrt(), (1 - a_s).sqrt()
    not_end = (s >= 0).view(-1, 1, 1, 1)
    x0 = torch.where(not_end, (x_s - sig_s / sig_t * x_t) / (a_s.sqrt() - sig_s / sig_t * a_t.sqrt()), x_s)
    eps = (x_t - a_t.sqrt() * x0) / sig_t
    return target(x0, eps, a_t, prediction)


def teacher_estimates(unet, guided_teacher: bool, x, t, y, w, abar, prediction: str, null_label: int):
    """(x0, eps) of a teacher at (x, t), guided with scale w (B,): CFG for the LDM (``guided_teacher``), the w input
    for a student (``sampling.guided`` either way). With ``ddim_to`` also the LCD loss's teacher step."""
    teacher = Denoiser(lambda *a: unet(*a).float(), abar, prediction, takes_scale=not guided_teacher)
    return guided(teacher, y, w, null_label)(x, t)


def progressive_loss(student, teacher, guided: bool, x0: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor,
                     alphas_cumprod: torch.Tensor, grids: tuple[torch.Tensor, torch.Tensor], w_range: tuple[float, float],
                     prediction: str, null_label: int, autocast=nullcontext) -> tuple[torch.Tensor, dict]:
    """MSE between the student's output at (x_t, t) and the output whose one DDIM step t -> s lands where the
    teacher's two steps t -> m -> s land (m: the teacher grid's point between). Each example's grid point, w and
    noise come from its seed; ``autocast`` wraps the teacher's calls (the student's run under the caller's)."""
    g_teacher, g_student = grids
    u = uniform_bits(seeds, 2, stream=0)  # (B, 2): grid point, guidance scale
    n = len(g_student) - 1  # student steps
    i = (u[:, 0] * n).long().clamp(max=n - 1).cpu()
    t, m, s = (g.to(x0.device) for g in (g_student[i], g_teacher[2 * i + 1], g_student[i + 1]))  # t -> m -> s
    w = (w_range[0] + (w_range[1] - w_range[0]) * u[:, 1]).to(x0.dtype)
    x_t = q_sample(x0, t, seeded_normal(seeds, tuple(x0.shape[1:]), stream=1, dtype=x0.dtype), alphas_cumprod)
    with torch.no_grad(), autocast():
        x_m = ddim_to(alphas_cumprod, m, *teacher_estimates(teacher, guided, x_t, t, y, w, alphas_cumprod, prediction,
                                                            null_label))
        x_s = ddim_to(alphas_cumprod, s, *teacher_estimates(teacher, guided, x_m, m.clamp(min=0), y, w, alphas_cumprod,
                                                            prediction, null_label))
        x_s = torch.where((m >= 0).view(-1, 1, 1, 1), x_s, x_m)  # m is the end: x_m is already the clean latent
    out = student(x_t, t, y, w).float()
    return F.mse_loss(out, one_step_target(alphas_cumprod, x_t, t, x_s, s, prediction)), {}
