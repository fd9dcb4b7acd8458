"""Training loops for both stages, with Accelerate (CPU, one GPU, many GPUs, mixed precision).

Step-based: the batch at step s is a pure function of (seed, s), and each example's training noise
comes from a counter-based generator keyed by (seed, s, position in the global batch), so
``--resume latest`` continues exactly and the process count does not change what is drawn.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import claim_run_dir, load_checkpoint, resolve_resume, save_checkpoint
from .config import LDMRunConfig, UNetConfig, VAEConfig, VAERunConfig
from .data import batch_indices, epoch_permutation, to_model_range, training_set
from .diffusion import diffusion_loss, make_schedule
from .ema import EMA, ema_decay_at
from .errors import ConfigError, RunDirError, TrainingDiverged
from .pipeline import GUIDE_DIR, LatentDiffusion, PipelineConfig, make_grid
from .precision import resolve_mixed_precision
from .serialization import CONFIG_NAME
from .threads import use_cpu_cores
from .tracking import finish_trackers, log_image, start_trackers, tracker_names
from .unet import UNet
from .vae import VAE, encode_all, latent_stats, vae_loss

METRICS_NAME = "metrics.jsonl"


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then constant or cosine decay to 10% (a pure function of the step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused on a CPU or CUDA GPU: one kernel over all parameters instead of a loop of small ops per tensor
    (the quick UNet's 129 tensors: 2.1 ms a step against 7.7 on a CPU, ~5% of its step; docs/training.md).
    Same maths, other rounding; torch's default elsewhere (e.g. MPS)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A distinct seed per (run seed, step, micro-batch, process)."""
    return (seed * 1_000_003 + step) * 4099 + micro * 131 + rank


def example_seeds(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """Per-example seeds for the training noise: a function of (run seed, step, position in the global
    batch) only, so 1 or N processes and any grad_accum draw the same t / noise / dropout per example."""
    key = ((seed * 1_000_003 + step) << 24) & ((1 << 62) - 1)  # global batches stay below 2^24; fits int64
    return positions.to(torch.int64) + key


def make_accelerator(cfg) -> Accelerator:
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+/Hopper: ~free speed for fp32 matmuls/convs
    torch.backends.cudnn.allow_tf32 = True
    # cpu=True when there is no GPU: otherwise accelerate (1.x) treats a CPU-only multi-process launch
    # (torchrun) as DistributedType.NO, and every rank trains alone on the whole batch as "main process".
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    device = torch.device("cpu" if cpu else "cuda" if torch.cuda.is_available() else "mps")
    main = os.environ.get("RANK", "0") == "0"  # before the Accelerator exists: say it once, on the main process
    if cpu:  # first: accelerate launch and torchrun default to one thread per process on a CPU
        use_cpu_cores(announce=main)
    mixed = resolve_mixed_precision(cfg.train.mixed_precision, device, announce=main)
    # Trackers are checked here, first: a missing package fails before anything is loaded or written.
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.train.grad_accum,
                       cpu=cpu, log_with=tracker_names(cfg.train.log_with) or None, project_dir=cfg.out_dir)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
"""``loss(model, idx, seeds) -> (loss, parts)``: the loss of the examples ``idx`` (one micro-batch), each drawing its
noise from its seed (``example_seeds``); ``parts``: extra numbers for the log line (e.g. the VAE's kl)."""
PreviewFn = Callable[[Path], None]
"""``preview(path)``: write a preview grid PNG to ``path`` (main process)."""


class Schedule:
    """The named hooks a run may steer its training with, besides its loss.

    ``lr(step)``: the learning rate of 0-based ``step``. ``after_step(done, optimizer, resumed)``: runs on every
    process whenever the weights are those after ``done`` steps: after each step's EMA update (before its log line,
    preview and checkpoint), and once with ``resumed=True`` after a resume from the checkpoint of step ``done``.
    This default: one warm-up and decay over the whole run (``lr_at``), nothing after a step. Subclasses:
    ``GuideSnapshot`` (autoguidance) here, ``distill.ProgressiveStages`` (a stage switch and a per-stage warm-up).
    """

    def __init__(self, tc):
        self.tc = tc

    def lr(self, step: int) -> float:
        return lr_at(step, self.tc)

    def after_step(self, done: int, optimizer: torch.optim.Optimizer, resumed: bool = False) -> None:
        pass


@dataclass
class TrainTask:
    """What ``train_loop`` trains: ``model`` (the weights it optimises), ``ema`` (its EMA copy, or None),
    ``n_examples`` (the data set size: batches index 0..n-1), the loss and preview functions, the name in the
    progress lines (``desc``) and the ``schedule``."""

    model: torch.nn.Module
    ema: torch.nn.Module | None
    n_examples: int
    loss: LossFn
    preview: PreviewFn
    desc: str
    schedule: Schedule


def micro_batches(idx: torch.Tensor, accel: Accelerator, accum: int) -> list[torch.Tensor]:
    """Split the global batch: micro-batch j of process r is idx.view(accum, world, -1)[j, r]."""
    world = accel.num_processes
    if idx.numel() % (world * accum):
        raise ValueError(f"train.batch_size={idx.numel()} must be divisible by processes x grad_accum = "
                         f"{world} x {accum}")
    return list(idx.view(accum, world, -1)[:, accel.process_index])


def check_batching(n_examples: int, tc, accel: Accelerator) -> None:
    """Fail on an impossible batch split before anything is written."""
    micro_batches(torch.arange(tc.batch_size), accel, tc.grad_accum)
    batch_indices(n_examples, tc.batch_size, 0, tc.seed)


def seed_all(seed: int) -> None:
    """Seed the model initialisation; per-step randomness uses explicit generators (``step_seed``, ``example_seeds``)."""
    torch.manual_seed(seed)


class BatchOrder:
    """The examples of each step: the same batches as ``data.batch_indices`` (one permutation per epoch), sliced
    on the device, and this process's micro-batches of them."""

    def __init__(self, n_examples: int, tc, accel: Accelerator):
        self.n, self.tc, self.accel = n_examples, tc, accel
        self.per_epoch = n_examples // tc.batch_size
        self.epoch, self.perm = -1, None
        # Where each of this process's micro-batches sits in the global batch (keys the per-example noise).
        self.positions = micro_batches(torch.arange(tc.batch_size, device=accel.device), accel, tc.grad_accum)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, epoch_permutation(self.n, self.tc.seed, epoch).to(self.accel.device)
        idx = self.perm[k * self.tc.batch_size:(k + 1) * self.tc.batch_size]
        return micro_batches(idx, self.accel, self.tc.grad_accum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def checkpoint_due(done: int, tc) -> bool:
    """Every ``checkpoint_every`` steps and after the last one (0: never)."""
    return bool(tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == tc.steps))


def log_due(done: int, tc) -> bool:
    """Every ``log_every`` steps, after the last one and with every checkpoint (the NaN check comes with it)."""
    return done % tc.log_every == 0 or done == tc.steps or checkpoint_due(done, tc)


def preview_due(done: int, tc) -> bool:
    """Every ``preview_every`` steps (0: never) but the last: the final preview comes with the saved model."""
    return bool(tc.preview_every and done % tc.preview_every == 0 and done < tc.steps)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines after ``step`` (a resume from the checkpoint of that step writes them again)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def resume_from(accel: Accelerator, run_dir: Path, resume: str, task: TrainTask,
                optimizer: torch.optim.Optimizer) -> tuple[int, Path]:
    """Restore model, EMA and optimizer from the checkpoint ``resume`` names; returns (its step, its folder)."""
    ckpt = resolve_resume(run_dir, resume)
    start = load_checkpoint(ckpt, task.model, task.ema, optimizer)["step"]
    if accel.is_main_process:
        trim_metrics(run_dir / METRICS_NAME, start)
    accel.print(f"resuming from {ckpt} at step {start}")
    return start, ckpt


def save_preview(accel: Accelerator, preview: PreviewFn, run_dir: Path, done: int) -> None:
    """Main process: the preview grid after ``done`` steps, into previews/ and the trackers."""
    path = run_dir / "previews" / f"step_{done:08d}.png"
    preview(path)
    log_image(accel, "preview", path, done)


def checkpoint(accel: Accelerator, run_dir: Path, done: int, task: TrainTask, optimizer: torch.optim.Optimizer,
               tc, last: Path | None) -> Path | None:
    """Main process writes checkpoints/step_N (checkpoint.save_checkpoint), every process waits for it; returns the
    newest checkpoint this process knows of (``last`` on the others)."""
    if accel.is_main_process:
        last = save_checkpoint(run_dir, done, task.model, task.ema, optimizer, tc.keep_checkpoints)
    accel.wait_for_everyone()
    return last


class TrainLog:
    """The run's log: losses summed on the device between log lines (the only host sync is once per line, never
    per step), the first step with a non-finite loss, metrics.jsonl, the progress bar (or, when stderr is not a
    terminal: CI, nohup, a scheduler, one plain line per log interval) and the trackers."""

    def __init__(self, accel: Accelerator, run_dir: Path, desc: str, start: int, steps: int):
        self.accel, self.path, self.desc, self.steps = accel, run_dir / METRICS_NAME, desc, steps
        self.loss_sum = torch.zeros((), device=accel.device)
        self.first_bad = torch.full((), -1, device=accel.device, dtype=torch.long)  # first step with a non-finite loss
        self.t0, self.seen, self.since, self.t_start = time.perf_counter(), 0, 0, time.perf_counter()
        self.plain = accel.is_main_process and not sys.stderr.isatty()
        self.bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc,
                        disable=self.plain or not accel.is_main_process, dynamic_ncols=True)

    def add(self, step: int, losses: list[torch.Tensor], batch_size: int) -> None:
        """The micro-batch losses of ``step`` (on the device, no sync)."""
        for loss in losses:
            self.loss_sum += loss / len(losses)
            self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                         torch.full_like(self.first_bad, step), self.first_bad)
        self.seen, self.since = self.seen + batch_size, self.since + 1

    def check_finite(self, last_ckpt: Path | None) -> None:
        """Raise TrainingDiverged if any process saw a non-finite loss since the start."""
        bad_here = (self.first_bad >= 0).float()
        accel = self.accel
        if (accel.reduce(bad_here, reduction="sum") if accel.num_processes > 1 else bad_here).item() > 0:
            where = f"at step {int(self.first_bad.item()) + 1}" if self.first_bad.item() >= 0 else "on another process"
            raise TrainingDiverged(
                f"loss became NaN/inf {where}; nothing was saved over good weights. Last good checkpoint: "
                f"{last_ckpt or 'none'}. Lower train.lr or use mixed_precision=no, then resume with "
                f"{'--resume latest' if last_ckpt else 'a fresh run'}")

    def write(self, done: int, lr: float, parts: dict) -> None:
        """One log line: the mean loss since the last one, the lr, throughput and the loss's ``parts``."""
        elapsed = time.perf_counter() - self.t0
        avg = self.loss_sum.item() / self.since
        rec = {"step": done, "loss": avg, "lr": lr, "images_per_s": self.seen / elapsed,
               "elapsed_s": time.perf_counter() - self.t_start, **{k: float(v) for k, v in parts.items()}}
        if self.accel.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            self.bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            if self.plain:
                print(f"{self.desc} step {done}/{self.steps}  loss {avg:.4f}  lr {rec['lr']:.3g}  "
                      f"{rec['images_per_s']:.0f} img/s  {rec['elapsed_s']:.0f}s", file=sys.stderr, flush=True)
        self.accel.log({k: v for k, v in rec.items() if k not in ("step", "elapsed_s")}, step=done)
        self.loss_sum.zero_()
        self.t0, self.seen, self.since = time.perf_counter(), 0, 0

    def close(self) -> None:
        self.bar.close()


def train_loop(cfg, accel: Accelerator, run_dir: Path, task: TrainTask, resume: str | None) -> None:
    """The optimisation loop of every stage (VAE, LDM, distillation), one iteration read top to bottom."""
    tc, model, schedule = cfg.train, task.model, task.schedule
    optimizer = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, accel.device)
    start, last_ckpt = 0, None
    if resume:
        start, last_ckpt = resume_from(accel, run_dir, resume, task, optimizer)
        schedule.after_step(start, optimizer, resumed=True)
    start_trackers(accel, cfg, run_dir, start)
    train_model = torch.compile(model) if tc.compile else model
    train_model, optimizer = accel.prepare(train_model, optimizer)
    ema = EMA(task.ema, model) if task.ema is not None else None
    batches = BatchOrder(task.n_examples, tc, accel)
    log = TrainLog(accel, run_dir, task.desc, start, tc.steps)
    for step in log.bar:
        set_lr(optimizer, schedule.lr(step))  # 1. the learning rate of this step
        micros = batches.micro_batches(step)  # 2. its examples: a pure function of (seed, step)
        torch.manual_seed(step_seed(tc.seed, step, 0, accel.process_index))  # 3. dropout etc.: also of the step
        losses = []
        for j, micro in enumerate(micros):  # 4. forward and backward per micro-batch; the last one steps
            with accel.accumulate(train_model):
                loss, parts = task.loss(train_model, micro, example_seeds(tc.seed, step, batches.positions[j]))
                accel.backward(loss)
                if accel.sync_gradients and tc.grad_clip > 0:
                    accel.clip_grad_norm_(train_model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if ema is not None:  # 5. the EMA (latentdiff/ema.py)
            ema.update(ema_decay_at(step, tc.ema_decay, tc.ema_std))
        log.add(step, losses, tc.batch_size)
        done = step + 1
        schedule.after_step(done, optimizer)  # 6. the schedule's hook (guide snapshot, stage switch)
        if log_due(done, tc):  # 7. NaN check and a log line
            log.check_finite(last_ckpt)
            log.write(done, schedule.lr(step), parts)
        if accel.is_main_process and preview_due(done, tc):  # 8. preview
            save_preview(accel, task.preview, run_dir, done)
        if checkpoint_due(done, tc):  # 9. checkpoint
            last_ckpt = checkpoint(accel, run_dir, done, task, optimizer, tc, last_ckpt)
    log.close()


def finish_run(accel: Accelerator, run_dir: Path, preview: PreviewFn, steps: int) -> None:
    """Main process, after the final model is saved: final preview grid and loss-curve PNG (also to the trackers),
    then close the trackers."""
    from .plot import loss_plot  # imported here: matplotlib costs ~0.5 s of start-up that a run stopping early never needs
    preview(run_dir / "previews" / "final.png")
    metrics = [json.loads(ln) for ln in (run_dir / METRICS_NAME).read_text().splitlines() if ln]
    loss_plot([m["step"] for m in metrics], [m["loss"] for m in metrics], run_dir / "loss.png",
              title=f"training loss ({run_dir.name})")
    log_image(accel, "preview", run_dir / "previews" / "final.png", steps)
    finish_trackers(accel)


def train_vae(cfg: VAERunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the VAE; writes config.json + model.safetensors (with latent stats) into cfg.out_dir."""
    accel = make_accelerator(cfg)
    images_u8, _ = training_set(cfg.data)  # bad data fails before out_dir is touched
    images = to_model_range(images_u8).to(accel.device)  # (N, 1, 28, 28) in [-1, 1], on the device once
    check_batching(len(images), cfg.train, accel)
    with claim_run_dir(cfg, resume, overwrite, accel) as (run_dir, resume):  # one run per folder (a lock)
        seed_all(cfg.train.seed)
        model = VAE(cfg.model).to(accel.device)
        fixed = images[:8]

        def loss_fn(m, idx, seeds):
            loss, parts, _ = vae_loss(m, images[idx], cfg.kl_weight, seeds=seeds)
            return loss, parts

        def preview(path: Path) -> None:
            model.eval()
            with torch.no_grad():
                recon = model._decode(model._encode(fixed).mean).clamp(-1, 1)
            model.train()
            path.parent.mkdir(parents=True, exist_ok=True)
            make_grid((torch.cat([fixed, recon]) + 1) / 2, nrow=8).save(path)  # row 1: originals, row 2: recons

        model.train()
        task = TrainTask(model, None, len(images), loss_fn, preview, "vae", Schedule(cfg.train))
        train_loop(cfg, accel, run_dir, task, resume)
        if accel.is_main_process:
            model.eval()
            shift, scale = latent_stats(model, images[:10000])
            model.with_latent_stats(shift, scale)
            model.save_pretrained(run_dir)
            finish_run(accel, run_dir, preview, cfg.train.steps)
            accel.print(f"saved VAE to {run_dir} (latent shift {shift:.4f}, scale {scale:.4f})")
        accel.wait_for_everyone()
    return run_dir


# ------------------------------------------------------------------------------------------ LDM
@torch.no_grad()
def encode_dataset(vae: VAE, images_u8: torch.Tensor, accel: Accelerator) -> torch.Tensor:
    """The whole dataset as scaled latents (N, C, h, w), once, with the frozen VAE: what the LDM trains on.

    Under the run's autocast: bf16 halves this pass (~20 s of the quick preset on 2 cores) at the precision
    the UNet's bf16 input convolution sees anyway; the shift and scale are applied in fp32.
    """
    with accel.autocast():
        z = encode_all(vae, to_model_range(images_u8))
    return vae.scale_latents(z.float())


def unet_config_for(cfg: UNetConfig, vae_cfg: VAEConfig, vae_path: str) -> UNetConfig:
    """``cfg`` with the latent shape of the VAE filled in where it is null; a set value that differs is an error."""
    want = {"in_channels": vae_cfg.latent_channels, "sample_size": vae_cfg.latent_size}
    for key, value in want.items():
        got = getattr(cfg, key)
        if got is not None and got != value:
            raise ConfigError(
                f"model.{key}={got} conflicts with the VAE in {vae_path}, whose latents are ({vae_cfg.latent_channels}, "
                f"{vae_cfg.latent_size}, {vae_cfg.latent_size}); drop the model.{key} setting (null: the UNet follows "
                f"the VAE) or set it to {value}")
    return replace(cfg, **want)


class GuideSnapshot(Schedule):
    """Autoguidance (``guide.fraction``): after ``step`` steps, save ``net`` (the EMA, or the model) into guide/
    (main process). A resume past that step checks guide/ is there, once; ``step`` 0: no guide."""

    def __init__(self, tc, accel: Accelerator, net: torch.nn.Module, guide_dir: Path, step: int):
        super().__init__(tc)
        self.accel, self.net, self.dir, self.step = accel, net, guide_dir, step
        self.settled = False  # past the snapshot, guide/ is checked once (a resume), not stat'ed every step

    def after_step(self, done: int, optimizer: torch.optim.Optimizer, resumed: bool = False) -> None:
        if not self.accel.is_main_process or not self.step or self.settled:
            return
        if done == self.step:
            self.net.save_pretrained(self.dir)  # config.json is written last
            self.settled = True
        elif done > self.step:
            self.settled = True
            if not (self.dir / CONFIG_NAME).is_file():
                raise RunDirError(f"resuming at step {done}, past the guide snapshot at step {self.step}, but "
                                  f"{self.dir} is missing; restore it, or start again with --overwrite")


def train_ldm(cfg: LDMRunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the latent UNet on cached VAE latents; writes a LatentDiffusion folder into cfg.out_dir."""
    out, vae_dir = Path(cfg.out_dir).resolve(), Path(cfg.vae_path).resolve()
    if overwrite and (vae_dir == out or out in vae_dir.parents):  # --overwrite would delete the VAE this run trains on
        raise RunDirError(f"--vae {cfg.vae_path} lies in --out {cfg.out_dir}, which --overwrite clears before training; "
                          "copy the VAE folder elsewhere first (e.g. cp -r it to runs/vae) and pass that, or choose another --out")
    accel = make_accelerator(cfg)
    vae = VAE.from_pretrained(cfg.vae_path, accel.device)  # fails fast on a bad path, before touching out_dir
    unet_cfg = unet_config_for(cfg.model, vae.config, cfg.vae_path)  # run.yaml keeps the user's null: "follow the VAE"
    if cfg.model.num_classes != 10:
        raise ValueError("train_ldm trains on MNIST, which has 10 classes; set model.num_classes=10")
    images_u8, labels = training_set(cfg.data)
    check_batching(len(images_u8), cfg.train, accel)
    with claim_run_dir(cfg, resume, overwrite, accel) as (run_dir, resume):  # one run per folder (a lock)
        seed_all(cfg.train.seed)
        model = UNet(unet_cfg).to(accel.device)
        latents = encode_dataset(vae, images_u8, accel)  # (N, C, h, w), on the device
        labels = labels.to(accel.device)
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.train.ema_decay > 0 else None
        alphas_cumprod = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps).float().to(accel.device)
        dc = cfg.diffusion

        def loss_fn(m, idx, seeds):
            loss = diffusion_loss(m, latents[idx], labels[idx], alphas_cumprod, dc, cfg.model.num_classes, seeds=seeds)
            return loss, {}

        pipe_cfg = PipelineConfig(diffusion=dc, sample=cfg.sample)

        def preview(path: Path) -> None:
            net = ema if ema is not None else model
            pipe = LatentDiffusion(net, vae, pipe_cfg)
            images = pipe.generate([c for c in range(10) for _ in range(8)], seed=0, autoguidance_scale=1.0)  # a row per class
            net.train(net is model)
            path.parent.mkdir(parents=True, exist_ok=True)
            make_grid(images, nrow=8).save(path)

        guide_step, guide_dir = cfg.guide.step(cfg.train.steps), run_dir / GUIDE_DIR
        schedule = GuideSnapshot(cfg.train, accel, ema if ema is not None else model, guide_dir, guide_step)
        model.train()
        train_loop(cfg, accel, run_dir, TrainTask(model, ema, len(latents), loss_fn, preview, "ldm", schedule), resume)
        if accel.is_main_process:
            final = ema if ema is not None else model
            guide = UNet.from_pretrained(guide_dir, accel.device) if guide_step else None
            LatentDiffusion(final, vae, pipe_cfg, guide).save_pretrained(run_dir)
            finish_run(accel, run_dir, preview, cfg.train.steps)
            accel.print(f"saved latent diffusion pipeline to {run_dir}")
        accel.wait_for_everyone()
    return run_dir
