"""Guided progressive distillation (Salimans & Ho 2022; Meng et al. 2023): the comparison method for LCD.

    python bench/progressive_distill.py --teacher runs/ldm --out runs/pd --data-dir DIR
    python -m latentdiff.evaluate sweep --model runs/pd/stage3 --data-dir DIR --settings '{"guidance_scale": 1.45}'

Stage k trains a student (the teacher's UNet plus a guidance-scale input, `distill.make_student`) to take
ONE deterministic DDIM step where its teacher takes TWO, on a grid of n0 / 2^k trailing timesteps; stage 1's
teacher is the CFG-guided LDM (w drawn per example from [wmin, wmax]), each later stage's teacher is the
previous student (its EMA). n0 = 16 and 3 stages give students of 8, 4 and 2 steps, saved as ordinary run
folders stage1/ ... that sample with ``sampler="ddim"`` (eta 0), one undoubled UNet batch per step.

An experiment script, not a training stage: no checkpoints, resume, run lock or trackers (distill_ldm.py
has those, for LCD). Measurements and the comparison with LCD: docs/distillation.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff.config import SampleConfig  # noqa: E402
from latentdiff.data import load_mnist, to_model_range  # noqa: E402
from latentdiff.diffusion import predict_x0_eps, q_sample  # noqa: E402
from latentdiff.distill import load_teacher, make_student  # noqa: E402
from latentdiff.ema import EMA  # noqa: E402
from latentdiff.pipeline import LatentDiffusion, PipelineConfig  # noqa: E402
from latentdiff.precision import resolve_mixed_precision  # noqa: E402
from latentdiff.timesteps import make_timesteps  # noqa: E402
from latentdiff.train import make_optimizer  # noqa: E402
from latentdiff.vae import encode_all  # noqa: E402


def stage_grid(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` trailing timesteps, noisiest first, then -1 for "the end" (the clean latent)."""
    return torch.cat([make_timesteps(alphas_cumprod, steps, "trailing"), torch.tensor([-1])])


def abar_at(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar[t] as (B, 1, 1, 1), 1 at the end (t = -1)."""
    return torch.where(t >= 0, abar[t.clamp(min=0)], torch.ones_like(t, dtype=abar.dtype)).view(-1, 1, 1, 1)


def ddim_to(abar: torch.Tensor, s: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) to timestep s from the estimates (x0, eps); x0 itself at the end."""
    a_s = abar_at(abar, s)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def one_step_target(abar: torch.Tensor, x_t, t, x_s, s, prediction: str) -> torch.Tensor:
    """The network output (eps or v) at (x_t, t) whose single DDIM step lands on x_s (Salimans & Ho 2022, Alg. 2)."""
    a_t, a_s = abar_at(abar, t), abar_at(abar, s)
    sig_t, sig_s = (1 - a_t).sqrt(), (1 - a_s).sqrt()
    x0 = torch.where((s >= 0).view(-1, 1, 1, 1), (x_s - sig_s / sig_t * x_t) / (a_s.sqrt() - sig_s / sig_t * a_t.sqrt()), x_s)
    eps = (x_t - a_t.sqrt() * x0) / sig_t
    return eps if prediction == "eps" else a_t.sqrt() * eps - sig_t * x0


def teacher_estimates(unet, guided: bool, x, t, y, w, abar, prediction: str, null_label: int):
    """(x0, eps) of the teacher at (x, t): CFG with scale w for the LDM, the w input for a student."""
    if guided:
        cond, uncond = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)])).float().chunk(2)
        out = uncond + w.view(-1, 1, 1, 1) * (cond - uncond)
    else:
        out = unet(x, t, y, w).float()
    return predict_x0_eps(out, x, abar[t], prediction)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a finished LDM run folder (train_ldm.py)")
    p.add_argument("--out", required=True, help="folder for stage1/, stage2/, ... (each a student run folder)")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: download)")
    p.add_argument("--n0", type=int, default=16, help="the stage-1 teacher's DDIM steps (halved per stage)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--steps", type=int, default=800, help="training steps per stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="peak lr of each stage (50 warm-up steps, cosine to 10%%)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay; the EMA is saved and teaches the next stage")
    p.add_argument("--wmin", type=float, default=1.0)
    p.add_argument("--wmax", type=float, default=3.0)
    p.add_argument("--sample-w", type=float, default=1.45, help="guidance scale saved as the students' default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.n0 % 2 ** a.stages:
        p.error(f"--n0 {a.n0} must be divisible by 2^stages = {2 ** a.stages}")

    torch.manual_seed(a.seed)
    teacher = load_teacher(a.teacher)
    abar, prediction, null = teacher.alphas_cumprod.float(), teacher.config.diffusion.prediction, teacher.num_classes
    bf16 = resolve_mixed_precision("auto", torch.device("cpu")) == "bf16"
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    images, labels = load_mnist(a.data_dir, "train", a.data_dir is None)
    with torch.no_grad(), autocast():
        latents = teacher.vae.scale_latents(encode_all(teacher.vae, to_model_range(images)).float())
    unet, guided = teacher.unet.requires_grad_(False), True
    student = make_student(teacher.unet)
    t_all = time.perf_counter()
    for k in range(1, a.stages + 1):
        g_teacher, g_student = stage_grid(teacher.alphas_cumprod, a.n0 // 2 ** (k - 1)), stage_grid(teacher.alphas_cumprod, a.n0 // 2 ** k)
        assert torch.equal(g_teacher[::2], g_student), "trailing grids must nest"
        ema = copy.deepcopy(student).requires_grad_(False)
        ema_state = EMA(ema, student)
        opt = make_optimizer(student.parameters(), a.lr, 0.0, torch.device("cpu"))
        t0 = time.perf_counter()
        for step in range(a.steps):
            for group in opt.param_groups:
                group["lr"] = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
            idx = torch.randint(0, len(latents), (a.batch,))
            x0, y = latents[idx], labels[idx]
            i = torch.randint(0, len(g_student) - 1, (a.batch,))
            t, m, s = g_student[i], g_teacher[2 * i + 1], g_student[i + 1]  # t -> m -> s: two teacher steps
            w = a.wmin + (a.wmax - a.wmin) * torch.rand(a.batch)
            x_t = q_sample(x0, t, torch.randn_like(x0), abar)
            with torch.no_grad(), autocast():
                x_m = ddim_to(abar, m, *teacher_estimates(unet, guided, x_t, t, y, w, abar, prediction, null))
                x_s = ddim_to(abar, s, *teacher_estimates(unet, guided, x_m, m.clamp(min=0), y, w, abar, prediction, null))
                x_s = torch.where((m >= 0).view(-1, 1, 1, 1), x_s, x_m)  # m is the end: x_m is already clean
            with autocast():
                out = student(x_t, t, y, w).float()
            loss = F.mse_loss(out, one_step_target(abar, x_t, t, x_s, s, prediction))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_state.update(a.ema)
            if step % 100 == 0 or step == a.steps - 1:
                print(f"stage {k} ({len(g_student) - 1} steps) step {step} loss {loss.item():.5f} "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        unet, guided = ema, False
        student.load_state_dict(ema.state_dict())
        sample = SampleConfig(sampler="ddim", steps=len(g_student) - 1, spacing="trailing", guidance_scale=a.sample_w)
        LatentDiffusion(ema, teacher.vae, PipelineConfig(diffusion=teacher.config.diffusion, sample=sample)).save_pretrained(
            Path(a.out) / f"stage{k}")
        print(f"stage {k} done in {time.perf_counter() - t0:.0f} s -> {Path(a.out) / f'stage{k}'}", flush=True)
    print(f"all stages: {time.perf_counter() - t_all:.0f} s of training", flush=True)


if __name__ == "__main__":
    main()
