"""Training-step speed per stage, batch size and compile mode: where the training wall time goes.

    python bench/train_speed.py --preset full --batches 512 1024 2048 4096 --compile both --out speed.json
    python bench/train_speed.py --preset quick --batches 64 128 --compile no --precision both --threads 1
    python bench/train_speed.py --preset quick --stages ldm --batches 128 --compile no --set model.channels=[64,128]

For each (stage, batch, compile, precision) it builds the preset's model, runs warm-up steps (reported:
that is where torch.compile spends its time), then times ``--steps`` optimizer steps (fused AdamW on a
CPU or GPU, as train.py) and prints images/s and ms/step. Precision: bf16 autocast or fp32 (default: bf16 on a GPU, fp32 on
a CPU; ``both`` measures the two side by side). Random inputs: speed does not depend on the data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import UNet, VAE, load_config  # noqa: E402
from latentdiff.cli import resolve_config_path  # noqa: E402
from latentdiff.config import DiffusionConfig, LDMRunConfig, VAERunConfig  # noqa: E402
from latentdiff.diffusion import diffusion_loss, make_schedule  # noqa: E402
from latentdiff.train import make_optimizer  # noqa: E402
from latentdiff.vae import vae_loss  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(stage: str, cfg, batch: int, compile_: bool, steps: int, warmup: int, device: torch.device,
            bf16: bool, channels_last: bool = False) -> dict:
    """Warm-up seconds and timed ms/step for one setting."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = VAE(cfg.model) if stage == "vae" else UNet(cfg.model)  # UNet: the default VAE's latents
    model = model.to(device, memory_format=fmt).train()
    fwd = torch.compile(model) if compile_ else model
    opt = make_optimizer(model.parameters(), 1e-4, 1e-2, device)  # the training loop's optimizer (AdamW's default decay)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if stage == "vae":
        x = (torch.rand(batch, 1, 28, 28, device=device) * 2 - 1).contiguous(memory_format=fmt)

        def loss_fn():
            return vae_loss(fwd, x, cfg.kl_weight, seeds=torch.arange(batch, device=device))[0]
    else:
        shape = (cfg.model.in_channels or 4, cfg.model.sample_size or 7, cfg.model.sample_size or 7)  # null: the default VAE's
        z = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        ac = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps).float().to(device)

        def loss_fn():
            return diffusion_loss(fwd, z, y, ac, DiffusionConfig(prediction=cfg.diffusion.prediction), 10,
                                  seeds=torch.arange(batch, device=device))

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    return {"stage": stage, "batch": batch, "compile": compile_, "bf16": bf16, "channels_last": channels_last,
            "warmup_s": warm_s, "step_ms": 1000 * dt,
            "images_per_s": batch / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full")
    p.add_argument("--stages", nargs="+", default=["vae", "ldm"], choices=["vae", "ldm"])
    p.add_argument("--batches", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--memory-format", choices=["contiguous", "channels_last", "both"], default="contiguous",
                   help="model and inputs in NCHW (contiguous) or NHWC (channels_last) memory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of both stages' presets, e.g. --set model.channels=[64,128] "
                        "(repeatable; a key a stage lacks is an error, so time one stage with --stages)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amps = {"fp32": [False], "bf16": [True], "both": [False, True]}[precision]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfgs = {stage: load_config(cls, resolve_config_path(args.preset, stage), args.overrides)
            for stage, cls in (("vae", VAERunConfig), ("ldm", LDMRunConfig)) if stage in args.stages}
    fmts = {"contiguous": [False], "channels_last": [True], "both": [False, True]}[args.memory_format]
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    rows = []
    for stage, compile_, b, bf16, cl in itertools.product(args.stages, modes, args.batches, amps, fmts):
        r = measure(stage, cfgs[stage], b, compile_, args.steps, args.warmup, device, bf16, cl)
        rows.append(r)
        print(f"{stage} batch {b:5d} compile={str(compile_):5s} {'bf16' if bf16 else 'fp32'} {'NHWC' if cl else 'NCHW'}: "
              f"{r['images_per_s']:10,.0f} img/s ({r['step_ms']:.2f} ms/step; warm-up {r['warmup_s']:.1f} s)", flush=True)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides, "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
