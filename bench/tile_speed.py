"""Sampling speed against the pipeline's tile size (docs/scale.md, "The same digit whatever the batch").

Digits/s of ``generate`` for requests of 1, 10 and 256 digits (the quick preset's architecture, or a run
folder), at each tile size; median of ``--repeats`` timed runs after one warm-up. ``--tiles none`` runs a
pipeline without ``tile_size`` (a checkout from before tiles, for the A/B):

    python bench/tile_speed.py --tiles 16 32 64 128 --requests 1 10 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentdiff import LatentDiffusion, PipelineConfig, UNet, VAE
from latentdiff.config import LDMRunConfig, VAERunConfig, load_config


def quick_pipeline(tile) -> LatentDiffusion:
    """The quick preset's architecture with random weights (the speed does not depend on them)."""
    torch.manual_seed(0)
    cfg = load_config(LDMRunConfig, "configs/ldm_quick.yaml")
    unet, vae = UNet(cfg.model), VAE(load_config(VAERunConfig, "configs/vae_quick.yaml").model)
    config = PipelineConfig(diffusion=cfg.diffusion, sample=cfg.sample)  # the preset's sampler settings
    return LatentDiffusion(unet, vae, config) if tile is None else LatentDiffusion(unet, vae, config, tile_size=tile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a run folder (default: the quick architecture, random weights)")
    ap.add_argument("--tiles", nargs="+", default=["64"], help="tile sizes, or 'none' for no tile_size argument")
    ap.add_argument("--requests", nargs="+", type=int, default=[1, 10, 256], help="digits per generate call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for tile in args.tiles:
        t = None if tile == "none" else int(tile)
        if args.model:
            pipe = (LatentDiffusion.from_pretrained(args.model) if t is None
                    else LatentDiffusion.from_pretrained(args.model, tile_size=t))
        else:
            pipe = quick_pipeline(t)
        for n in args.requests:
            labels = [i % 10 for i in range(n)]
            reps = max(args.repeats, 1) if n >= 64 else max(args.repeats, 1) * 3  # small requests: more runs
            pipe.generate(labels, seed=0)  # warm-up
            times = []
            for r in range(reps):
                start = time.perf_counter()
                pipe.generate(labels, seed=r)
                times.append(time.perf_counter() - start)
            med = statistics.median(times)
            rows.append({"tile": tile, "digits": n, "seconds": round(med, 4), "digits_per_s": round(n / med, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
