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
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import claim_run_dir, load_checkpoint, resolve_resume, save_checkpoint
from .config import LDMRunConfig, UNetConfig, VAEConfig, VAERunConfig
from .data import batch_indices, epoch_permutation, load_mnist, to_model_range
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


# Test hook: SIGKILL this process right after the given step (and its checkpoint), as a pre-emption would.
_KILL_AT_STEP = int(os.environ.get("LATENTDIFF_TEST_KILL_AT_STEP", "-1"))


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


def _micro_batches(idx: torch.Tensor, accel: Accelerator, accum: int) -> list[torch.Tensor]:
    """Split the global batch: micro-batch j of process r is idx.view(accum, world, -1)[j, r]."""
    world = accel.num_processes
    if idx.numel() % (world * accum):
        raise ValueError(f"train.batch_size={idx.numel()} must be divisible by processes x grad_accum = "
                         f"{world} x {accum}")
    return list(idx.view(accum, world, -1)[:, accel.process_index])


def _check_batching(n_examples: int, tc, accel: Accelerator) -> None:
    """Fail on an impossible batch split before anything is written."""
    _micro_batches(torch.arange(tc.batch_size), accel, tc.grad_accum)
    batch_indices(n_examples, tc.batch_size, 0, tc.seed)


def _run_loop(cfg, accel: Accelerator, run_dir: Path, model: torch.nn.Module, ema: torch.nn.Module | None,
              n_examples: int, loss_fn: Callable, preview_fn: Callable, resume: str | None, desc: str,
              on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
              lr_fn: Callable[[int], float] | None = None) -> None:
    """The shared optimisation loop: accumulate, clip, step, EMA, log, preview, checkpoint.

    ``on_step(s, optimizer)``, on every process, whenever the weights are those after s steps: after each step
    (after the EMA update, before the checkpoint) and once after a resume from step s. ``lr_fn(step)``: the
    learning rate of 0-based ``step`` (default ``lr_at``, one warm-up and decay over the run).
    """
    tc = cfg.train
    lr_fn = lr_fn or (lambda step: lr_at(step, tc))
    optimizer = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, accel.device)
    start, last_ckpt = 0, None
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        last_ckpt = resolve_resume(run_dir, resume)
        start = load_checkpoint(last_ckpt, model, ema, optimizer)["step"]
        if accel.is_main_process and metrics_path.is_file():  # drop log lines after the checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
        accel.print(f"resuming from {last_ckpt} at step {start}")
        if on_step is not None:
            on_step(start, optimizer)
    start_trackers(accel, cfg, run_dir, start)
    train_model = torch.compile(model) if tc.compile else model
    train_model, optimizer = accel.prepare(train_model, optimizer)
    device = accel.device
    ema_state = EMA(ema, model) if ema is not None else None
    perm_epoch, perm = -1, None
    # Where each of this process's micro-batches sits in the global batch (keys the per-example noise).
    positions = _micro_batches(torch.arange(tc.batch_size, device=device), accel, tc.grad_accum)
    per_epoch = n_examples // tc.batch_size
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
    t0, seen, since, t_start = time.perf_counter(), 0, 0, time.perf_counter()
    # Not a terminal (CI, nohup, a scheduler): one plain line per log interval instead of a redrawn bar.
    plain = accel.is_main_process and not sys.stderr.isatty()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=desc,
               disable=plain or not accel.is_main_process, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_fn(step)
        epoch, k = divmod(step, per_epoch)  # the same batches as data.batch_indices, sliced on the device
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, epoch_permutation(n_examples, tc.seed, epoch).to(device)
        idx = perm[k * tc.batch_size:(k + 1) * tc.batch_size]
        torch.manual_seed(step_seed(tc.seed, step, 0, accel.process_index))  # dropout etc.: also a function of the step
        for j, micro in enumerate(_micro_batches(idx, accel, tc.grad_accum)):
            with accel.accumulate(train_model):
                loss, parts = loss_fn(train_model, micro, example_seeds(tc.seed, step, positions[j]))
                accel.backward(loss)
                if accel.sync_gradients and tc.grad_clip > 0:
                    accel.clip_grad_norm_(train_model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            loss_sum += loss / tc.grad_accum
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), torch.full_like(first_bad, step), first_bad)
        if ema is not None:
            ema_state.update(ema_decay_at(step, tc.ema_decay, tc.ema_std))  # latentdiff/ema.py
        seen, since = seen + tc.batch_size, since + 1
        done = step + 1
        if on_step is not None:
            on_step(done, optimizer)
        ckpt_now = tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == tc.steps)  # final one: extend later
        if done % tc.log_every == 0 or done == tc.steps or ckpt_now:
            # The only host-device sync: once per log interval, never per step.
            bad_here = (first_bad >= 0).float()
            if (accel.reduce(bad_here, reduction="sum") if accel.num_processes > 1 else bad_here).item() > 0:
                where = f"at step {int(first_bad.item()) + 1}" if first_bad.item() >= 0 else "on another process"
                raise TrainingDiverged(
                    f"loss became NaN/inf {where}; nothing was saved over good weights. Last good checkpoint: "
                    f"{last_ckpt or 'none'}. Lower train.lr or use mixed_precision=no, then resume with "
                    f"{'--resume latest' if last_ckpt else 'a fresh run'}")
            elapsed = time.perf_counter() - t0
            avg = loss_sum.item() / since
            rec = {"step": done, "loss": avg, "lr": lr_fn(step), "images_per_s": seen / elapsed,
                   "elapsed_s": time.perf_counter() - t_start, **{k: float(v) for k, v in parts.items()}}
            if accel.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{rec['images_per_s']:.0f}")
                if plain:
                    print(f"{desc} step {done}/{tc.steps}  loss {avg:.4f}  lr {rec['lr']:.3g}  "
                          f"{rec['images_per_s']:.0f} img/s  {rec['elapsed_s']:.0f}s", file=sys.stderr, flush=True)
            accel.log({k: v for k, v in rec.items() if k not in ("step", "elapsed_s")}, step=done)
            loss_sum.zero_()
            t0, seen, since = time.perf_counter(), 0, 0
        if accel.is_main_process and tc.preview_every and done % tc.preview_every == 0 and done < tc.steps:
            preview_fn(run_dir / "previews" / f"step_{done:08d}.png")
            log_image(accel, "preview", run_dir / "previews" / f"step_{done:08d}.png", done)
        if ckpt_now:
            if accel.is_main_process:
                last_ckpt = save_checkpoint(run_dir, done, model, ema, optimizer, tc.keep_checkpoints)
            accel.wait_for_everyone()
        if done == _KILL_AT_STEP:  # fault injection for the resume tests: die like a pre-empted job
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def _finish(run_dir: Path, preview_fn: Callable) -> None:
    """Final preview grid and the loss-curve PNG."""
    from .plot import loss_plot  # imported here: matplotlib costs ~0.5 s of start-up that a run stopping early never needs
    preview_fn(run_dir / "previews" / "final.png")
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    loss_plot([m["step"] for m in metrics], [m["loss"] for m in metrics], run_dir / "loss.png",
              title=f"training loss ({run_dir.name})")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # model initialisation; per-step randomness uses explicit generators


def _end(accel: Accelerator, run_dir: Path, preview_fn: Callable, steps: int) -> None:
    """Main process: final preview and loss curve (also to the trackers), then close the trackers."""
    _finish(run_dir, preview_fn)
    log_image(accel, "preview", run_dir / "previews" / "final.png", steps)
    finish_trackers(accel)


def train_vae(cfg: VAERunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the VAE; writes config.json + model.safetensors (with latent stats) into cfg.out_dir."""
    accel = make_accelerator(cfg)
    images_u8, _ = load_mnist(cfg.data.root, "train", cfg.data.download)  # bad data fails before out_dir is touched
    images = to_model_range(images_u8).to(accel.device)  # (N, 1, 28, 28) in [-1, 1], on the device once
    _check_batching(len(images), cfg.train, accel)
    with claim_run_dir(cfg, resume, overwrite, accel) as (run_dir, resume):  # one run per folder (a lock)
        _seed_all(cfg.train.seed)
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
        _run_loop(cfg, accel, run_dir, model, None, len(images), loss_fn, preview, resume, "vae")
        if accel.is_main_process:
            model.eval()
            shift, scale = latent_stats(model, images[:10000])
            model.with_latent_stats(shift, scale)
            model.save_pretrained(run_dir)
            _end(accel, run_dir, preview, cfg.train.steps)
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


def train_ldm(cfg: LDMRunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the latent UNet on cached VAE latents; writes a LatentDiffusion folder into cfg.out_dir."""
    accel = make_accelerator(cfg)
    vae = VAE.from_pretrained(cfg.vae_path, accel.device)  # fails fast on a bad path, before touching out_dir
    unet_cfg = unet_config_for(cfg.model, vae.config, cfg.vae_path)  # run.yaml keeps the user's null: "follow the VAE"
    if cfg.model.num_classes != 10:
        raise ValueError("train_ldm trains on MNIST, which has 10 classes; set model.num_classes=10")
    images_u8, labels = load_mnist(cfg.data.root, "train", cfg.data.download)
    _check_batching(len(images_u8), cfg.train, accel)
    with claim_run_dir(cfg, resume, overwrite, accel) as (run_dir, resume):  # one run per folder (a lock)
        _seed_all(cfg.train.seed)
        model = UNet(unet_cfg).to(accel.device)
        latents = encode_dataset(vae, images_u8, accel)  # (N, C, h, w), on the device
        labels = labels.to(accel.device)
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.train.ema_decay > 0 else None
        alphas_cumprod = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps).float().to(accel.device)
        dc = cfg.diffusion

        def loss_fn(m, idx, seeds):
            loss = diffusion_loss(m, latents[idx], labels[idx], alphas_cumprod, dc.prediction, dc.label_dropout,
                                  cfg.model.num_classes, seeds=seeds, loss_weighting=dc.loss_weighting,
                                  min_snr_gamma=dc.min_snr_gamma, timestep_sampling=dc.timestep_sampling,
                                  logsnr_mean=dc.logsnr_mean, logsnr_std=dc.logsnr_std)
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
        guide_checked = [False]  # past the snapshot, guide/ is checked once (a resume), not stat'ed every step

        def keep_guide(done: int, _optimizer) -> None:
            """Autoguidance: snapshot the (EMA) weights after ``guide_step`` steps into guide/ (main process)."""
            if not accel.is_main_process or not guide_step or guide_checked[0]:
                return
            if done == guide_step:
                (ema if ema is not None else model).save_pretrained(guide_dir)  # config.json is written last
                guide_checked[0] = True
            elif done > guide_step:
                guide_checked[0] = True
                if not (guide_dir / CONFIG_NAME).is_file():
                        raise RunDirError(f"resuming at step {done}, past the guide snapshot at step {guide_step}, but "
                                      f"{guide_dir} is missing; restore it, or start again with --overwrite")

        model.train()
        _run_loop(cfg, accel, run_dir, model, ema, len(latents), loss_fn, preview, resume, "ldm", keep_guide)
        if accel.is_main_process:
            final = ema if ema is not None else model
            guide = UNet.from_pretrained(guide_dir, accel.device) if guide_step else None
            LatentDiffusion(final, vae, pipe_cfg, guide).save_pretrained(run_dir)
            _end(accel, run_dir, preview, cfg.train.steps)
            accel.print(f"saved latent diffusion pipeline to {run_dir}")
        accel.wait_for_everyone()
    return run_dir
