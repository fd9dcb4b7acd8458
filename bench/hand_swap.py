"""Your hand in every class, measured: real test digits swapped to a random other class, scored for the class and the hand.

    python bench/hand_swap.py --model runs/ldm --data-dir DIR --n 1000 --out bench/results/cpu/issue34/hand_swap.json \\
        --method plain --method sdedit:strength=0.7 --method sdedit:strength=0.9 \\
        --method swap:steps=20,guidance_scale=2 --method swap:steps=20,guidance_scale=2,strength=0.8

For N test digits (a seeded draw) each with a seeded random target class other than its own, every method makes
one output per digit; the figures are the evaluator's accuracy at the target class (``latentdiff.evaluate``'s
classifier), the Pearson correlation between source and output of the ink mass (the sum of the pixels:
thickness x size) and of the slant (the second-moment shear mu11 / mu02), and the pixel MSE to the source.
Methods: ``plain`` (a fresh sample of the target class: the no-hand baseline), ``sdedit`` (``edit.img2img``) and
``swap`` (``edit.swap_class``); ``key=value`` pairs after the colon are the function's keywords.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import LatentDiffusion, edit  # noqa: E402
from latentdiff.data import load_mnist  # noqa: E402
from latentdiff.evaluate.classifier import extract, load_or_train_classifier  # noqa: E402


def ink_and_slant(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ink mass (sum of the pixels) and slant (mu11 / mu02, the shear of the second moments) of (N, 1, H, W) in [0, 1]."""
    x = images[:, 0].double()
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    mass = x.sum((1, 2)).clamp(min=1e-9)
    r0 = (x * rows).sum((1, 2)) / mass
    c0 = (x * cols).sum((1, 2)) / mass
    dr, dc = rows - r0.view(-1, 1, 1), cols - c0.view(-1, 1, 1)
    mu11, mu02 = (x * dr * dc).sum((1, 2)), (x * dr * dr).sum((1, 2))
    return mass, mu11 / mu02.clamp(min=1e-9)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


def append_jsonl(path: str | None, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (its folder made if missing); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if name not in ("plain", "sdedit", "swap"):
        raise SystemExit(f"--method {spec!r}: the name must be plain, sdedit or swap")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def run_method(pipe: LatentDiffusion, name: str, kwargs: dict, src: torch.Tensor, src_labels: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    kwargs = dict(kwargs)
    if name == "plain":
        return pipe.generate(targets, seed=kwargs.pop("seed", 0), **kwargs)
    if name == "sdedit":
        return edit.img2img(pipe, src, targets, kwargs.pop("strength"), seed=kwargs.pop("seed", 0), **kwargs)
    labels = None if kwargs.pop("unconditional", False) else src_labels
    return edit.swap_class(pipe, src, labels, targets, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an LDM run folder (a teacher)")
    p.add_argument("--data-dir", help="MNIST (default: $LATENTDIFF_DATA or ./data)")
    p.add_argument("--classifier", help="the evaluation classifier's folder (trained there once if missing)")
    p.add_argument("--n", type=int, default=1000, help="test digits")
    p.add_argument("--seed", type=int, default=0, help="which digits and which targets")
    p.add_argument("--method", action="append", required=True, help="plain | sdedit:strength=S | swap[:key=value,...]")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="append the results as JSON lines here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [parse_method(m) for m in args.method]  # fail fast on a bad spec
    pipe = LatentDiffusion.from_pretrained(args.model)
    clf = load_or_train_classifier(args.classifier, args.data_dir)
    images_u8, labels = load_mnist(args.data_dir, "test")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(labels), generator=g)[:args.n]
    src, src_labels = images_u8[idx].float().div(255).unsqueeze(1), labels[idx]
    targets = (src_labels + torch.randint(1, 10, (args.n,), generator=g)) % 10  # a random other class
    ink_src, slant_src = ink_and_slant(src)
    rows = []
    for name, kwargs in methods:
        t0 = time.perf_counter()
        out = run_method(pipe, name, kwargs, src, src_labels, targets).cpu()
        seconds = time.perf_counter() - t0
        _, logits = extract(clf, out)
        ink, slant = ink_and_slant(out)
        row = {"method": name, **kwargs, "n": args.n, "accuracy": float((logits.argmax(1) == targets).double().mean()),
               "ink_corr": pearson(ink_src, ink), "slant_corr": pearson(slant_src, slant),
               "pixel_mse": float((out - src).square().mean()), "seconds": round(seconds, 1),
               "model": args.model, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        rows.append(row)
        print(f"{name:7s} {json.dumps(kwargs):48s} target acc {row['accuracy']:.1%}  ink r {row['ink_corr']:.2f}  "
              f"slant r {row['slant_corr']:.2f}  mse {row['pixel_mse']:.3f}  {seconds:.0f} s", flush=True)
        append_jsonl(args.out, row)


if __name__ == "__main__":
    main()
