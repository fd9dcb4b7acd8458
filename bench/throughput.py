"""Throughput benchmarks: training images/s per stage, sampling digits/s, and the FLOP ceiling.

    python bench/throughput.py --preset quick --device cpu --out bench/results/cpu_quick.json
    python bench/throughput.py --preset full --device cuda --compile --batches 256 4096

Sampling is timed end to end (noise -> sampler with CFG -> VAE decode -> [0,1] images) with the
model's default sampler and steps. The ceiling is the measured matmul rate divided by the FLOPs of
one image (2 x UNet per step for CFG, plus one decode); the fraction says how close we get.
Models are randomly initialised from the preset's configs unless --model names a trained run
(speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import LatentDiffusion, PipelineConfig, UNet, VAE, load_config  # noqa: E402
from latentdiff.cli import resolve_config_path  # noqa: E402
from latentdiff.config import DiffusionConfig, LDMRunConfig, VAERunConfig  # noqa: E402
from latentdiff.diffusion import diffusion_loss, make_schedule  # noqa: E402
from latentdiff.sampling import unet_rows  # noqa: E402
from latentdiff.timesteps import make_timesteps  # noqa: E402
from latentdiff.vae import vae_loss  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median wall time of fn() over repeats, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, 10 if device.type == "cuda" else 5)
    return 2 * n**3 / t, f"{dtype} {n}x{n}x{n}".replace("torch.", "")


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def build_pipeline(preset: str, model: str | None, device: torch.device):
    """(pipeline, VAE run config, LDM run config): a trained folder if given, else random init from the preset."""
    vcfg = load_config(VAERunConfig, resolve_config_path(preset, "vae"))
    lcfg = load_config(LDMRunConfig, resolve_config_path(preset, "ldm"))
    if model:
        return LatentDiffusion.from_pretrained(model, device), vcfg, lcfg
    pipe = LatentDiffusion(UNet(lcfg.model), VAE(vcfg.model), PipelineConfig(lcfg.diffusion, lcfg.sample)).to(device)
    return pipe, vcfg, lcfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--model", help="a trained LDM folder (default: random init from the preset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per stage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile for sampling and training")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    pipe, vcfg, lcfg = build_pipeline(args.preset, args.model, device)
    sc = pipe.config.sample
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
                 "sampler": sc.sampler, "steps": sc.steps, "guidance_scale": sc.guidance_scale, "compile": args.compile}

    rate, what = matmul_rate(device)
    res["matmul_flops_per_s"], res["matmul"] = rate, what
    shape = pipe.vae.latent_shape
    unet_f = count_flops(lambda: pipe.unet(torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)))
    dec_f = count_flops(lambda: pipe.vae._decode(torch.zeros(1, *shape, device=device)))
    # UNet rows per digit: a guided step runs the doubled batch, an unguided one (scale 0/1, or a step
    # outside the guidance interval) the single batch.
    evals = unet_rows(make_timesteps(pipe.alphas_cumprod, sc.steps, sc.spacing), sc.guidance_scale, sc.guidance_interval)
    guided = evals - sc.steps
    per_image = evals * unet_f + dec_f
    res.update(unet_flops_per_image_step=unet_f, decode_flops_per_image=dec_f, flops_per_sample=per_image,
               unet_evaluations=evals, guided_steps=guided, spacing=sc.spacing, guidance_interval=sc.guidance_interval,
               ceiling_images_per_s=rate / per_image)
    print(f"{res['device']}: matmul {what} {rate / 1e12:.2f} TFLOP/s; UNet {unet_f / 1e6:.1f} MFLOP/image/step, "
          f"decode {dec_f / 1e6:.1f} MFLOP; ceiling {rate / per_image:,.0f} digits/s "
          f"({sc.sampler}, {sc.steps} steps, {guided} of them guided: {evals} UNet evaluations)")

    if args.compile:
        pipe.compile()
    res["sampling"] = []
    for b in args.batches:
        labels = [i % 10 for i in range(b)]
        t = timed(lambda: pipe.generate(labels, seed=0, batch_size=b), device, args.repeats)
        r = {"batch": b, "seconds": t, "images_per_s": b / t, "fraction_of_ceiling": b / t / res["ceiling_images_per_s"]}
        res["sampling"].append(r)
        print(f"sampling batch {b:5d}: {b / t:10,.1f} digits/s ({t * 1000:.1f} ms/batch), "
              f"{100 * r['fraction_of_ceiling']:.1f}% of ceiling")

    if not args.skip_train:
        res["training"] = {}
        ac = make_schedule(lcfg.diffusion.schedule, lcfg.diffusion.num_timesteps).float().to(device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        for stage, cfg in (("vae", vcfg), ("ldm", lcfg)):
            bsz = cfg.train.batch_size
            model = (VAE(cfg.model) if stage == "vae" else UNet(cfg.model)).to(device).train()
            fwd = torch.compile(model) if args.compile else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if stage == "vae":
                x = torch.rand(bsz, 1, 28, 28, device=device) * 2 - 1
                def loss_fn():
                    return vae_loss(fwd, x, cfg.kl_weight)[0]
            else:
                z = torch.randn(bsz, *shape, device=device)
                y = torch.randint(0, 10, (bsz,), device=device)
                def loss_fn():
                    return diffusion_loss(fwd, z, y, ac, DiffusionConfig(prediction=lcfg.diffusion.prediction), 10)

            def step():
                for _ in range(args.train_steps):
                    with amp:
                        loss = loss_fn()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            t = timed(step, device, 1)
            ips = bsz * args.train_steps / t
            res["training"][stage] = {"batch": bsz, "images_per_s": ips, "step_ms": 1000 * t / args.train_steps}
            print(f"training {stage}: batch {bsz}, {ips:,.0f} images/s ({1000 * t / args.train_steps:.1f} ms/step)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
