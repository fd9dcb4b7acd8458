"""Sample digits from a trained LDM folder: a PNG grid (one row per label) and optionally an .npz, or, with
--out-dir, a data set of safetensors shards made by any number of processes (accelerate launch / torchrun)."""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latentdiff import LatentDiffusion, make_grid
from latentdiff.cli import check_output_dir, check_output_file, check_output_image, run_main
from latentdiff.sampling import SAMPLERS
from latentdiff.timesteps import SPACINGS


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--autoguidance", type=float, default=None, metavar="W",
                   help="autoguidance weight by the folder's guide/ model, 1 = off (default: the model's; docs/autoguidance.md)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="digit i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="digits sampled together (memory; default 256 on CPU, 4096 on GPU): the digits do not depend on it")
    p.add_argument("--tile-size", type=int, default=None,
                   help="rows per network call (default 64 on CPU, 1024 on GPU): part of what a digit's bits depend on; "
                        "docs/scale.md")
    p.add_argument("--device", default=None, help="default: cuda if available; with --out-dir, each process's own device")
    p.add_argument("--out", default=None, help="output PNG grid (default samples.png)")
    p.add_argument("--npz", help="also write images (N,28,28 uint8) and labels (N,) to this .npz")
    g = p.add_argument_group("data sets (sharded, resumable; see docs/scale.md)")
    g.add_argument("--out-dir", help="write safetensors shards + index.json here instead of a grid; rerun the same "
                                     "command to resume a killed job")
    g.add_argument("--num-digits", type=int, help="digits in the data set; digit i has label labels[i %% len(labels)] "
                                                  "(default: per-label x number of labels)")
    g.add_argument("--shard-size", type=int, default=10_000, help="digits per shard file (default 10000: 7.8 MB)")
    return p.parse_args()


def sampler_kwargs(args: argparse.Namespace) -> dict:
    return dict(guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler, eta=args.eta,
                guidance_interval=args.guidance_interval, spacing=args.spacing, autoguidance_scale=args.autoguidance)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that would fail only after sampling (all the work lost): checked before the model loads."""
    check_output_image(args.out or "samples.png", "--out")
    if args.npz:
        check_output_file(args.npz, "--npz", "samples.npz")


def small_job(args: argparse.Namespace) -> None:
    """Today's grid (+ .npz): everything in memory, one process."""
    check_outputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusion.from_pretrained(args.model, device=device, tile_size=args.tile_size)
    labels = [c for c in args.labels for _ in range(args.per_label)]
    images = pipe.generate(labels, seed=args.seed, batch_size=args.batch_size, progress=True, **sampler_kwargs(args))
    out = args.out or "samples.png"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=args.per_label).save(out)
    print(f"wrote {len(labels)} samples to {out}")
    if args.npz:
        u8 = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        npz = Path(args.npz if args.npz.endswith(".npz") else args.npz + ".npz")  # the name numpy writes
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, images=u8, labels=np.asarray(labels, dtype=np.int64))
        print(f"wrote {npz}")


def sharded_job(args: argparse.Namespace) -> None:
    """Shards over every process accelerate (or torchrun) started; a rerun keeps verified shards."""
    from accelerate import Accelerator

    from latentdiff import shards

    if args.out or args.npz:
        raise ValueError("--out-dir writes shards; --out and --npz are for small in-memory jobs: pass one or the other")
    # cpu=True without a GPU: otherwise accelerate treats a CPU torchrun launch as N lone main processes (see train.py)
    cpu = args.device == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accel = Accelerator(cpu=cpu)
    out_dir = check_output_dir(args.out_dir, "--out-dir")
    tile = args.tile_size
    if tile is None:  # resuming: the job's own tile, whatever this device's default
        tile = (shards.saved_job(out_dir) or {}).get("tile_size")
    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device or accel.device, tile_size=tile)
    settings = json.loads(json.dumps(pipe.settings(**sampler_kwargs(args)).to_kwargs()))  # as job.json will hold them
    job = shards.Job(model=str(Path(args.model).resolve()), labels=pipe.check_labels(args.labels).tolist(),
                     num_digits=args.per_label * len(args.labels) if args.num_digits is None else args.num_digits, seed=args.seed,
                     shard_size=args.shard_size, settings=settings, tile_size=pipe.tile_size)
    batch_size = pipe.check_batch_size(args.batch_size)
    shards.check_job(out_dir, job)  # every process refuses on its own: no process waits on one that failed
    accel.wait_for_everyone()
    if accel.is_main_process:
        shards.start_job(out_dir, job)
    accel.wait_for_everyone()
    mine = sum(b - a for a, b in map(job.span, range(accel.process_index, job.num_shards, accel.num_processes)))
    bar = tqdm(total=mine, unit="digit", disable=not accel.is_main_process, dynamic_ncols=True,
               desc=f"process 0 of {accel.num_processes}", mininterval=0.1 if sys.stderr.isatty() else 30)
    start = time.perf_counter()
    made, kept = shards.run_shards(pipe, job, out_dir, accel.process_index, accel.num_processes, batch_size, bar.update)
    bar.close()
    totals = torch.tensor([made, kept], device=accel.device)
    made, kept = (accel.reduce(totals, reduction="sum") if accel.num_processes > 1 else totals).tolist()
    accel.wait_for_everyone()
    seconds = time.perf_counter() - start
    if accel.is_main_process:
        shards.write_index(out_dir, job)
        rate = made / seconds if seconds > 0 else 0.0
        print(f"wrote {job.num_digits} digits in {job.num_shards} shards to {out_dir} ({shards.INDEX_NAME}): made {made} "
              f"in {seconds:.1f} s on {accel.num_processes} process(es), {rate:.1f} digits/s; kept {kept} from an "
              "earlier run", flush=True)


def main() -> None:
    args = parse_args()
    if args.per_label < 1:
        raise ValueError(f"--per-label must be >= 1, got {args.per_label}")
    if args.out_dir:
        sharded_job(args)
    elif args.num_digits is not None:
        raise ValueError("--num-digits is for data sets written with --out-dir; for a grid use --per-label")
    else:
        small_job(args)


if __name__ == "__main__":
    run_main(main)
