"""Few-step students of a trained LDM: latent consistency distillation (LCD, the default) or guided progressive
distillation (``distill.method: progressive``, progressive.py).

LCD (Luo et al. 2023, "Latent consistency models"): the student is a copy of the teacher's UNet that also
takes the guidance scale w as an input (a zero-initialised embedding, so at step 0 it is exactly the
teacher). For a training latent x0 at a random point t of a coarse grid of ``solver_steps`` timesteps, the
frozen teacher takes one guided DDIM step from x_t to the grid's next point s; the student's consistency
output f(x_t, t) is pulled towards the target network's f(x_s, s) (an EMA of the student).
f = c_skip x + c_out x0_hat, with f(x, 0) = x (``sampling.consistency_x0``). The result samples with
``sampler="lcm"`` in 1-4 UNet calls, no CFG batch.

Progressive: the same w-input student learns, stage by stage, one DDIM step per two of its teacher; every
finished stage is saved as a student folder of its own under ``stages/`` (and teaches the next stage).

The loop, checkpoints, exact resume, run lock, logging and previews are train.py's (``train_loop``).
"""

from __future__ import annotations

import bisect
import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml

from .checkpoint import RUN_CONFIG, claim_run_dir
from .config import DataConfig, SampleConfig, TrainConfig, _require
from .data import training_set
from .diffusion import q_sample
from .errors import ConfigError, ModelLoadError, RunDirError
from .noise import seeded_normal, uniform_bits
from .pipeline import ADAPTER_CONFIG, LatentDiffusion, PipelineConfig, make_grid, read_adapter
from .progressive import ddim_to, progressive_loss, stage_grids, teacher_estimates
from .sampling import Denoiser, consistency_x0
from .serialization import CONFIG_NAME
from .timesteps import make_timesteps
from .train import (Schedule, TrainTask, check_batching, encode_dataset, finish_run, lr_at, make_accelerator, seed_all,
                    train_loop)
from .unet import UNet

STAGES_DIR = "stages"  # progressive: stages/<n>_steps/, the student after each stage but the last (the run itself)


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DistillConfig:
    """What the student learns: the teacher's guided ODE on a coarse grid, for a range of guidance scales."""

    method: str = "lcd"  # lcd | progressive
    # Teacher solver grid: this many trailing timesteps (T-1, T-1-T/N, ...). lcd: each training pair is one guided
    # DDIM step between neighbours (the skipping step k = T/N of the LCM paper). progressive: the stage-1
    # teacher's DDIM steps n0; stage k's student takes n0 / 2^k.
    solver_steps: int = 20
    stages: int = 4  # progressive only: halvings of the step count, train.steps / stages steps each
    # progressive only: training steps per stage, summing to train.steps (e.g. [1400, 800, 800]: stage 1, which learns
    # the guidance from the CFG teacher, has the most to learn); default: train.steps / stages each
    stage_steps: Optional[tuple[int, ...]] = None
    guidance_min: float = 1.0  # w is drawn uniformly from [guidance_min, guidance_max] per example;
    guidance_max: float = 3.0  # the student's guidance knob is trained on this range (1 = conditional only)
    huber_c: float = 0.0  # lcd only: pseudo-Huber loss sqrt(d^2 + c^2) - c (LCM); 0 = plain MSE
    guidance_embed_scale: float = 1000.0  # the student's w features: sinusoids of w * this (model.guidance_embed_scale)

    @property
    def student_steps(self) -> int | None:
        """The progressive student's DDIM steps, n0 / 2^stages (None for lcd: any step count)."""
        return self.solver_steps // 2 ** self.stages if self.method == "progressive" else None

    def stage_ends(self, total_steps: int) -> list[int]:
        """Progressive: the training step at which each stage ends (the last is ``total_steps``)."""
        return list(itertools.accumulate(self.stage_steps or [total_steps // self.stages] * self.stages))

    def validate(self) -> None:
        _require(self.method in ("lcd", "progressive"), "distill.method must be lcd or progressive")
        _require(self.solver_steps >= 1, "distill.solver_steps must be >= 1")
        if self.method == "progressive":
            _require(self.stages >= 1, "distill.stages must be >= 1")
            _require(self.solver_steps % 2 ** self.stages == 0,
                     f"distill.solver_steps={self.solver_steps} must be divisible by 2^stages = {2 ** self.stages} "
                     "(each stage halves the steps); e.g. 32 with 4 stages")
        if self.stage_steps is not None:
            _require(self.method == "progressive", "distill.stage_steps is for method=progressive only; remove it")
            _require(len(self.stage_steps) == self.stages and min(self.stage_steps) >= 1,
                     f"distill.stage_steps={list(self.stage_steps)} needs one positive step count per stage "
                     f"({self.stages} stages)")
        _require(0 <= self.guidance_min <= self.guidance_max, "distill needs 0 <= guidance_min <= guidance_max")
        _require(self.huber_c >= 0, "distill.huber_c must be >= 0")
        _require(self.guidance_embed_scale > 0, "distill.guidance_embed_scale must be > 0")


@dataclass(frozen=True)
class DistillRunConfig:
    """Everything distill_ldm needs; ``sample`` is the student's default sampling (saved in its config.json)."""

    out_dir: str = "runs/ldm_fast"
    teacher: str = "runs/ldm"  # a finished LDM run folder (train_ldm.py)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(sampler="lcm", steps=2, spacing="trailing",
                                                                      guidance_scale=1.75))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, ema_decay=0.95))

    def validate(self) -> None:
        self.distill.validate()
        self.data.validate()
        self.sample.validate(student=True)
        self.train.validate()
        _require(self.train.ema_decay > 0, "train.ema_decay must be > 0: its EMA is the consistency target network "
                 "(lcd) or the next stage's teacher (progressive), and the saved student")
        n = self.distill.student_steps
        if n is not None:
            _require(self.sample.sampler == "ddim" and self.sample.spacing == "trailing", "distill.method=progressive "
                     "trains a DDIM student on trailing timesteps: set sample.sampler=ddim and sample.spacing=trailing")
            _require(self.sample.steps == n, f"distill.method=progressive with solver_steps={self.distill.solver_steps} "
                     f"and {self.distill.stages} stages trains a {n}-step student: set sample.steps={n}")
            if self.distill.stage_steps is None:
                _require(self.train.steps % self.distill.stages == 0, f"train.steps={self.train.steps} must be "
                         f"divisible by distill.stages={self.distill.stages} (each stage trains train.steps / stages "
                         "steps), or give distill.stage_steps")
            else:
                _require(sum(self.distill.stage_steps) == self.train.steps, f"distill.stage_steps="
                         f"{list(self.distill.stage_steps)} sums to {sum(self.distill.stage_steps)}, not train.steps="
                         f"{self.train.steps}: make them agree")


# ------------------------------------------------------------------------------------------ teacher and student
def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> LatentDiffusion:
    """The teacher pipeline, or one ModelLoadError line naming what the folder is instead."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"teacher {path} does not exist; pass --teacher, a finished run folder of train_ldm.py")
    if (path / RUN_CONFIG).is_file() and not (path / CONFIG_NAME).is_file():
        raise ModelLoadError(f"teacher {path} is an unfinished training run (no final model yet); finish it with "
                             f"train_ldm.py --out {path} --resume latest, or pass a finished run")
    if (path / ADAPTER_CONFIG).is_file():  # teach.py's folder: the base plus taught classes, which a student cannot take
        try:
            base = read_adapter(path)[0]
        except ModelLoadError:
            base = path
        raise ModelLoadError(f"teacher {path} is a taught-classes adapter (teach.py), which distillation does not "
                             f"support; distil its base LDM ({base}) instead")
    if (path / CONFIG_NAME).is_file() and not (path / "unet").is_dir():
        raise ModelLoadError(f"teacher {path} is not an LDM run folder (no unet/; a VAE folder?); pass the folder "
                             "written by train_ldm.py")
    teacher = LatentDiffusion.from_pretrained(path, device)
    if teacher.unet.config.guidance_input:
        raise ModelLoadError(f"teacher {path} is already a distilled student; distil from its teacher instead")
    return teacher


def make_student(teacher: UNet, guidance_embed_scale: float = 1000.0) -> UNet:
    """The teacher's UNet plus a zero-initialised guidance-scale input: unet(x, t, y, w) == teacher(x, t, y) for every w."""
    config = replace(teacher.config, guidance_input=True, guidance_embed_scale=guidance_embed_scale)
    student = UNet(config).to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_embed.") for k in missing), (missing, unexpected)
    return student


def solver_grid(alphas_cumprod: torch.Tensor, solver_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s): the grid's timesteps (N,), noisiest first, and each one's next point (the last goes to 0)."""
    t = make_timesteps(alphas_cumprod, solver_steps, "trailing")
    return t, torch.cat([t[1:], t.new_zeros(1)])


def lcd_loss(student, target, teacher, x0: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor,
             alphas_cumprod: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], dc: DistillConfig,
             prediction: str, null_label: int) -> tuple[torch.Tensor, dict]:
    """The LCD loss of one batch (LCM Alg. 1): d(f_student(x_t, t, w), f_target(DDIM_w(x_t, t -> s), s, w)).

    x0 (B, C, H, W) scaled latents, y (B,) labels; each example's grid point, w and noise come from its seed.
    student / target: unet(x, t, y, w); teacher: unet(x, t, y), label ``null_label`` = unconditional.
    """
    u = uniform_bits(seeds, 2, stream=0)  # (B, 2): grid point, guidance scale
    n = (u[:, 0] * len(grid[0])).long().clamp(max=len(grid[0]) - 1).cpu()
    t, s = grid[0][n].to(x0.device), grid[1][n].to(x0.device)
    w = (dc.guidance_min + (dc.guidance_max - dc.guidance_min) * u[:, 1]).to(x0.dtype)
    noise = seeded_normal(seeds, tuple(x0.shape[1:]), stream=1, dtype=x0.dtype)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    with torch.no_grad():  # one guided DDIM step (eta 0) of the teacher: t -> s
        x_s = ddim_to(alphas_cumprod, s, *teacher_estimates(teacher, True, x_t, t, y, w, alphas_cumprod, prediction,
                                                            null_label))
        f_target = consistency_x0(Denoiser(target, alphas_cumprod, prediction)(x_s, s, y, w)[0], x_s, s)
    f = consistency_x0(Denoiser(student, alphas_cumprod, prediction)(x_t, t, y, w)[0], x_t, t)
    if dc.huber_c > 0:
        d = ((f.float() - f_target.float()).square().flatten(1).mean(1) + dc.huber_c**2).sqrt() - dc.huber_c
        return d.mean(), {}
    return F.mse_loss(f.float(), f_target.float()), {}


# ------------------------------------------------------------------------------------------ the run
def distill_ldm(cfg: DistillRunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Distil cfg.teacher into a few-step student; writes an ordinary LatentDiffusion folder into cfg.out_dir."""
    if Path(cfg.out_dir).resolve() == Path(cfg.teacher).resolve():
        raise ConfigError(f"--out {cfg.out_dir} is the teacher's folder; write the student to another folder")
    accel = make_accelerator(cfg)
    teacher = load_teacher(cfg.teacher, accel.device)  # fails fast on a bad teacher, before touching out_dir
    diffusion = teacher.config.diffusion
    if cfg.distill.solver_steps > diffusion.num_timesteps:
        raise ConfigError(f"distill.solver_steps={cfg.distill.solver_steps} exceeds the teacher's "
                          f"{diffusion.num_timesteps} timesteps")
    if cfg.distill.method == "progressive" and resume and (Path(cfg.out_dir) / RUN_CONFIG).is_file():
        saved = (yaml.safe_load((Path(cfg.out_dir) / RUN_CONFIG).read_text()) or {}).get("train", {}).get("steps")
        if saved is not None and saved != cfg.train.steps:
            raise ConfigError(f"cannot resume {cfg.out_dir} with train.steps={cfg.train.steps}: a progressive run's "
                              f"stages are set by train.steps; resume with train.steps={saved}")
    images_u8, labels = training_set(cfg.data)
    check_batching(len(images_u8), cfg.train, accel)
    with claim_run_dir(cfg, resume, overwrite, accel) as (run_dir, resume):  # one run per folder (a lock)
        seed_all(cfg.train.seed)
        teacher_unet, vae = teacher.unet.requires_grad_(False), teacher.vae
        model = make_student(teacher_unet, cfg.distill.guidance_embed_scale)
        target = copy.deepcopy(model).requires_grad_(False)  # the EMA target network; also the saved student
        latents = encode_dataset(vae, images_u8, accel)  # (N, C, h, w), on the device, under the run's autocast
        labels = labels.to(accel.device)
        alphas_cumprod = teacher.alphas_cumprod.float().to(accel.device)

        def pipeline(unet: UNet, steps: int | None = None) -> LatentDiffusion:
            sample = replace(cfg.sample, steps=steps) if steps else cfg.sample
            return LatentDiffusion(unet, vae, PipelineConfig(diffusion=diffusion, sample=sample))

        if cfg.distill.method == "progressive":
            stages = ProgressiveStages(cfg, accel, run_dir, teacher, model, target, latents, labels, alphas_cumprod,
                                       pipeline)
            loss_fn, schedule = stages.loss, stages
        else:
            grid = solver_grid(teacher.alphas_cumprod, cfg.distill.solver_steps)
            schedule = Schedule(cfg.train)

            def loss_fn(m, idx, seeds):
                return lcd_loss(m, target, teacher_unet, latents[idx], labels[idx], seeds, alphas_cumprod, grid,
                                cfg.distill, diffusion.prediction, teacher.num_classes)

        def preview(path: Path) -> None:
            images = pipeline(target).generate([c for c in range(10) for _ in range(8)], seed=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            make_grid(images, nrow=8).save(path)

        model.train()
        train_loop(cfg, accel, run_dir, TrainTask(model, target, len(latents), loss_fn, preview, "distill", schedule),
                   resume)
        if accel.is_main_process:
            pipeline(target).save_pretrained(run_dir)
            finish_run(accel, run_dir, preview, cfg.train.steps)
            accel.print(f"saved the {cfg.sample.steps}-step student to {run_dir}")
        accel.wait_for_everyone()
    return run_dir


class ProgressiveStages(Schedule):
    """The stages of a progressive run: the loss of the current stage, its learning rate and the stage switch.

    Stage k (1-based) trains steps [e_(k-1), e_k) (``DistillConfig.stage_ends``; equal lengths unless
    distill.stage_steps), each with its own warm-up and decay (``lr``). After step e_k (``after_step``) the EMA
    (stage k's student) is saved as stages/<n>_steps/, becomes the teacher, and the student restarts from it with a
    fresh optimizer state; a resume inside stage k reloads its teacher from there. ``stage`` and ``teacher``: the
    current stage (1-based) and its teacher network.
    """

    def __init__(self, cfg: DistillRunConfig, accel, run_dir: Path, teacher: LatentDiffusion, model: UNet, ema: UNet,
                 latents, labels, alphas_cumprod, pipeline):
        super().__init__(cfg.train)
        self.dc, self.accel, self.run_dir, self.model, self.ema, self.pipeline = (cfg.distill, accel, run_dir, model,
                                                                                  ema, pipeline)
        self.latents, self.labels, self.alphas_cumprod = latents, labels, alphas_cumprod
        self.ends = self.dc.stage_ends(self.tc.steps)
        self.starts = [0] + self.ends[:-1]
        self.prediction, self.null = teacher.config.diffusion.prediction, teacher.num_classes
        self.grids = [stage_grids(teacher.alphas_cumprod.cpu(), self.dc.solver_steps, k)
                      for k in range(1, self.dc.stages + 1)]
        self.stage, self.teacher = 1, teacher.unet

    def folder(self, stage: int) -> Path:
        """Where stage ``stage``'s student is saved (the last stage's is the run folder itself)."""
        return self.run_dir / STAGES_DIR / f"{self.dc.solver_steps // 2 ** stage}_steps"

    def after_step(self, done: int, optimizer, resumed: bool = False) -> None:
        """Switch stages after a stage's last step (a resume from that step's checkpoint has switched already);
        after a resume inside a later stage, load its teacher."""
        dc, accel = self.dc, self.accel
        finished = bisect.bisect_right(self.ends, done)  # stages whose last step is done
        if done in self.ends[:-1] and not resumed:
            if accel.is_main_process:
                self.pipeline(self.ema, dc.solver_steps // 2 ** finished).save_pretrained(self.folder(finished))
            accel.wait_for_everyone()
            self.model.load_state_dict(self.ema.state_dict())  # the next stage starts from this stage's student
            optimizer.state.clear()  # and from fresh Adam moments (the bias correction restarts)
        if finished + 1 != self.stage and finished < dc.stages:
            path = self.folder(finished)
            if not (path / CONFIG_NAME).is_file():
                raise RunDirError(f"resuming at step {done}, in stage {finished + 1} of {dc.stages}, but its teacher "
                                  f"{path} (stage {finished}'s student) is missing; restore it, or start again with --overwrite")
            self.stage, self.teacher = finished + 1, UNet.from_pretrained(path / "unet", accel.device).requires_grad_(False)

    def loss(self, m, idx, seeds):
        """The loss of the current stage: one student DDIM step against two of its teacher (progressive_loss)."""
        k, dc = self.stage, self.dc
        return progressive_loss(m, self.teacher, k == 1, self.latents[idx], self.labels[idx], seeds, self.alphas_cumprod,
                                self.grids[k - 1], (dc.guidance_min, dc.guidance_max), self.prediction, self.null,
                                self.accel.autocast)

    def lr(self, step: int) -> float:
        k = min(bisect.bisect_right(self.ends, step), self.dc.stages - 1)  # 0-based stage of this step
        return lr_at(step - self.starts[k], replace(self.tc, steps=self.ends[k] - self.starts[k]))
