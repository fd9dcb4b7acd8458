"""Edit and explore digits with a trained LDM: class swap, inpainting, interpolation, trajectories, latents.

    python edit.py swap        --model runs/ldm --data-dir DIR --indices 0 1 2 --to 8 --strengths 0 0.3 0.5 0.7 0.9 1
    python edit.py every-class --model runs/ldm --data-dir DIR --indices 0 1 2     # or --image my_3.png --label 3
    python edit.py inpaint     --model runs/ldm --data-dir DIR --indices 0 1 2 --keep left --labels 3
    python edit.py interp-seeds   --model runs/ldm --labels 0 1 2 --seed-a 0 --seed-b 1 --frames 8
    python edit.py interp-classes --model runs/ldm --pairs 3:8 1:7 --seed 0 --frames 8
    python edit.py trajectory  --model runs/ldm --labels 3 7 --seed 0
    (each writes edit_<command>.png unless --out says otherwise)
    python edit.py encode      --vae runs/vae --data-dir DIR --split test --out test_latents.safetensors
    python edit.py decode      --vae runs/vae --latents test_latents.safetensors --count 64 --out grid.png
"""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentdiff import VAE, LatentDiffusion, make_grid
from latentdiff import edit
from latentdiff.cli import check_output_file, check_output_image, run_main
from latentdiff.data import load_mnist
from latentdiff.drawings import check_ground, grey
from latentdiff.latents import decode_latents, encode_split, load_latents, save_latents
from latentdiff.sampling import SAMPLERS


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="LDM run folder written by train_ldm.py")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps for a full run (default: the model's)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output PNG (default edit_<command>.png, e.g. edit_interp_seeds.png)")
    p.add_argument("--zoom", type=int, default=1, help="enlarge the PNG by this integer factor (default 1)")


def source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (default: $LATENTDIFF_DATA, else ./data; downloaded there if missing)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--indices", type=int, nargs="+", default=list(range(8)), help="which digits of the split (default 0..7)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("swap", help="img2img / class swap: one row per digit, one column per strength")
    sampling_args(s)
    source_args(s)
    s.add_argument("--to", type=int, nargs="+", required=True, help="target class (one, or one per digit)")
    s.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
    s = sub.add_parser("every-class", help="each digit's hand in every class (DDIM inversion): source + one column per class")
    sampling_args(s)
    source_args(s)
    s.add_argument("--image", help="or one PNG of a digit (white on black, any square size; scaled to 28x28)")
    s.add_argument("--label", type=int, help="with --image: the digit it shows (default: invert without a label)")
    s.add_argument("--strength", type=float, default=edit.SWAP_STRENGTH,
                   help=f"how far to invert: 1 = all the way to noise (default {edit.SWAP_STRENGTH}; docs/editing.md)")
    s = sub.add_parser("inpaint", help="fill part of each digit: rows source / masked / result")
    sampling_args(s)
    source_args(s)
    s.add_argument("--keep", choices=["left", "right", "top", "bottom"], help="keep this half, fill the other")
    s.add_argument("--mask", help="or a 28x28 PNG mask: white = keep, black = fill")
    s.add_argument("--labels", type=int, nargs="+", required=True, help="class to fill towards (one, or one per digit)")
    s = sub.add_parser("interp-seeds", help="slerp between two seeds' noise; one row per label")
    sampling_args(s)
    s.add_argument("--labels", type=int, nargs="+", default=list(range(10)))
    s.add_argument("--seed-a", type=int, default=0)
    s.add_argument("--seed-b", type=int, default=1)
    s.add_argument("--frames", type=int, default=8)
    s = sub.add_parser("interp-classes", help="blend two label embeddings at one seed; one row per pair")
    sampling_args(s)
    s.add_argument("--pairs", nargs="+", default=["3:8"], help="A:B class pairs, e.g. 3:8 1:7")
    s.add_argument("--frames", type=int, default=8)
    s = sub.add_parser("trajectory", help="noisy latent and decoded x0 at every step: two rows per digit")
    sampling_args(s)
    s.add_argument("--labels", type=int, nargs="+", default=[3])
    s = sub.add_parser("encode", help="encode a whole MNIST split to a latents .safetensors file")
    s.add_argument("--vae", required=True, help="VAE folder (runs/vae, or runs/ldm/vae)")
    s.add_argument("--data-dir")
    s.add_argument("--split", choices=["train", "test"], default="test")
    s.add_argument("--limit", type=int, default=None, help="only the first N digits")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--out", help="output .safetensors (default <split>_latents.safetensors)")
    s = sub.add_parser("decode", help="decode a latents file to a PNG grid")
    s.add_argument("--vae", required=True)
    s.add_argument("--latents", required=True, help=".safetensors written by `edit.py encode` (or save_latents)")
    s.add_argument("--count", type=int, default=64, help="decode the first N (default 64)")
    s.add_argument("--nrow", type=int, default=8)
    s.add_argument("--zoom", type=int, default=1, help="enlarge the PNG by this integer factor (default 1)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--out", default="decoded.png", help="output PNG (default decoded.png)")
    return p


def sampling(args) -> dict:
    return {"guidance_scale": args.guidance, "steps": args.steps, "sampler": args.sampler, "eta": args.eta,
            "batch_size": args.batch_size}


def load_sources(args, with_labels: bool = False):
    images, labels = load_mnist(args.data_dir, args.split)
    bad = [i for i in args.indices if not 0 <= i < len(images)]
    if bad:
        raise ValueError(f"--indices {bad[0]} is out of range; the {args.split} split has {len(images)} digits")
    x = images[args.indices].float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
    return (x, labels[args.indices].tolist()) if with_labels else x


def open_image(path: str, what: str, hint: str) -> Image.Image:
    """The image file at ``path`` in grey levels; one error line naming ``what`` it is for otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path} is a folder; {hint}")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} not found; {hint}")
    try:
        return grey(Image.open(p))  # 16-bit grey scaled, transparency on black
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({e}); {hint}") from None


def read_digit(path: str) -> torch.Tensor:
    """A PNG of one digit -> (1, 1, 28, 28) in [0, 1] (grey levels; square images of any size are resized)."""
    img = open_image(path, "image", "pass a PNG of one digit, white on black")
    if img.width != img.height:
        raise ValueError(f"image {path} is {img.width}x{img.height}; pass a square PNG (it is scaled to 28x28)")
    arr = np.asarray(img.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255
    check_ground(arr, f"image {path}")
    return torch.from_numpy(arr)[None, None]


def save_png(image, path: str, zoom: int) -> None:
    """Save a PIL image, enlarged ``zoom`` times with nearest-neighbour pixels."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)


def read_mask(path: str) -> torch.Tensor:
    img = open_image(path, "mask", "pass a 28x28 PNG (white = keep, black = fill)")
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy((arr >= 128).astype(np.float32))  # (28, 28); check_mask checks the size


def main() -> None:
    args = build_parser().parse_args()
    if getattr(args, "zoom", 1) < 1:
        raise ValueError(f"--zoom must be an integer >= 1, got {args.zoom}")
    if args.out is None:  # like sample.py's samples.png: every command runs without --out
        args.out = f"{args.split}_latents.safetensors" if args.cmd == "encode" else f"edit_{args.cmd.replace('-', '_')}.png"
    # before any model loads: a bad name would otherwise fail only after the work
    if args.cmd == "encode":
        check_output_file(args.out, "--out", f"{args.split}_latents.safetensors")
        if Path(args.out).suffix != ".safetensors":  # what save_latents writes, whatever the name says
            raise ValueError(f"--out {args.out}: latents are written as safetensors; end the name in .safetensors")
    else:
        check_output_image(args.out)
    if args.cmd in ("encode", "decode"):
        vae = VAE.from_pretrained(args.vae, args.device)
        if args.cmd == "encode":
            data = encode_split(vae, args.data_dir, args.split, limit=args.limit)
            save_latents(args.out, data, vae=str(args.vae))
            print(f"wrote {len(data.latents)} latents {tuple(data.latents.shape[1:])} to {args.out} "
                  f"(scale {data.scaling_factor:.4f}, shift {data.shift_factor:.4f})")
        else:
            if args.count < 1 or args.nrow < 1:
                raise ValueError(f"--count and --nrow must be >= 1, got {args.count} and {args.nrow}")
            data = load_latents(args.latents)
            data = replace(data, latents=data.latents[:args.count], labels=data.labels[:args.count])
            save_png(make_grid(decode_latents(vae, data), nrow=args.nrow), args.out, args.zoom)
            print(f"decoded {len(data.latents)} latents to {args.out}")
        return
    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)
    kw = sampling(args)
    if args.cmd == "swap":
        src = load_sources(args)
        cols = [src.to(pipe.device)] + [edit.img2img(pipe, src, args.to, s, seed=args.seed, **kw) for s in args.strengths]
        grid, nrow = torch.stack(cols, 1).flatten(0, 1), len(cols)  # (N * cols, 1, 28, 28), one row per digit
    elif args.cmd == "every-class":
        if args.image:
            src, labels = read_digit(args.image), [args.label]
        else:
            if args.label is not None:
                raise ValueError("--label goes with --image (MNIST digits come with their own labels)")
            src, labels = load_sources(args, with_labels=True)
        rows = [torch.cat([x[None].to(pipe.device), edit.every_class(pipe, x[None], c, strength=args.strength, **kw)])
                for x, c in zip(src, labels)]
        grid, nrow = torch.cat(rows), pipe.num_classes + 1
    elif args.cmd == "inpaint":
        if (args.keep is None) == (args.mask is None):
            raise ValueError("pass exactly one of --keep left|right|top|bottom and --mask PNG")
        src = load_sources(args)
        mask = edit.half_mask(args.keep) if args.keep else read_mask(args.mask)
        out = edit.inpaint(pipe, src, mask, args.labels, seed=args.seed, **kw)
        shown = edit.check_mask(mask, len(src)) * src + (1 - edit.check_mask(mask, len(src))) * 0.5  # fill area grey
        grid, nrow = torch.cat([src, shown, out.cpu()]), len(src)
    elif args.cmd == "interp-seeds":
        rows = [edit.interpolate_seeds(pipe, c, args.seed_a, args.seed_b, args.frames, **kw) for c in args.labels]
        grid, nrow = torch.cat(rows), args.frames
    elif args.cmd == "interp-classes":
        pairs = []
        for p in args.pairs:
            a, sep, b = p.partition(":")
            if not sep or not a.strip().lstrip("-").isdigit() or not b.strip().lstrip("-").isdigit():
                raise ValueError(f"--pairs takes A:B class pairs like 3:8, got {p!r}")
            pairs.append((int(a), int(b)))
        rows = [edit.interpolate_classes(pipe, a, b, args.seed, args.frames, **kw) for a, b in pairs]
        grid, nrow = torch.cat(rows), args.frames
    else:  # trajectory
        traj = edit.trajectory(pipe, args.labels, seed=args.seed, **kw)
        save_png(edit.trajectory_strip(traj), args.out, args.zoom)
        print(f"wrote {len(args.labels)} trajectories of {traj.x0.shape[1]} steps to {args.out}")
        return
    save_png(make_grid(grid, nrow=nrow), args.out, args.zoom)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
