"""Sample digits from a trained LDM folder into a PNG grid (one row per label) and optionally an .npz."""

import argparse
from pathlib import Path

import numpy as np
import torch

from latentdiff import LatentDiffusion, make_grid
from latentdiff.cli import run_main
from latentdiff.sampling import SAMPLERS
from latentdiff.timesteps import SPACINGS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LDM run folder written by train_ldm.py")
    p.add_argument("--labels", type=int, nargs="+", default=list(range(10)), help="classes, one grid row each (default 0..9)")
    p.add_argument("--per-label", type=int, default=8, help="samples per label (default 8)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale: 1 = conditional only, 0 = unconditional (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's")
    p.add_argument("--guidance-interval", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only at timesteps LO <= t <= HI of the schedule (0..T-1, e.g. 100 800 of 1000); "
                        "conditional only elsewhere (default: the model's)")
    p.add_argument("--spacing", choices=sorted(SPACINGS), default=None,
                   help="which timesteps the sampler visits (default: the model's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 256 on CPU, 4096 on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    p.add_argument("--npz", help="also write images (N,28,28 uint8) and labels (N,) to this .npz")
    args = p.parse_args()
    if args.per_label < 1:
        raise ValueError(f"--per-label must be >= 1, got {args.per_label}")
    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)
    labels = [c for c in args.labels for _ in range(args.per_label)]
    images = pipe.generate(labels, guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler,
                           eta=args.eta, seed=args.seed, batch_size=args.batch_size, progress=True,
                           guidance_interval=args.guidance_interval, spacing=args.spacing)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=args.per_label).save(args.out)
    print(f"wrote {len(labels)} samples to {args.out}")
    if args.npz:
        u8 = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        np.savez_compressed(args.npz, images=u8, labels=np.asarray(labels, dtype=np.int64))
        print(f"wrote {args.npz}")


if __name__ == "__main__":
    run_main(main)
