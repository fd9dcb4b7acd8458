"""Measure class swap (img2img) and inpainting of a trained LDM on real test digits, judged by the evaluation classifier.

    python bench/edit_eval.py --model runs/ldm --data-dir DIR --out-dir bench/results/cpu

Class swap: the first N test digits, each sent to another class (target = label + 1 + i mod 9), at
every strength; scored by the classifier's accuracy towards the target, and by the distance to the
source (pixel MSE, and L2 in the classifier's feature space). Strength 0 is the VAE reconstruction
and strength 1 a plain sample of the target class from the same seed: the "unconditioned" reference.
Inpainting: keep one half (left / right / top / bottom), fill the other towards the digit's own
label; PSNR of the kept half against the input (next to the VAE reconstruction's PSNR there, the
ceiling without a pixel paste), the error against the reconstruction by distance from the seam,
and the classifier's accuracy on the result and on the half digit alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentdiff import LatentDiffusion
from latentdiff.cli import run_main
from latentdiff.data import load_mnist
from latentdiff.edit import half_mask, img2img, inpaint
from latentdiff.evaluate import extract, load_or_train_classifier, psnr, to_unit

SIDES = ("left", "right", "top", "bottom")


def seam_distance(side: str, size: int = 28) -> torch.Tensor:
    """(28, 28) distance in pixels from each pixel to the seam of the half mask (0 = the row/column next to it)."""
    i = torch.arange(size)
    h = size // 2
    d = {"left": h - 1 - i, "right": i - h, "top": h - 1 - i, "bottom": i - h}[side].abs()
    return d.expand(size, size) if side in ("left", "right") else d[:, None].expand(size, size)


def swap_metrics(out: torch.Tensor, src: torch.Tensor, f_src: torch.Tensor, clf, targets, labels) -> dict:
    feats, logits = extract(clf, out.cpu())
    pred = logits.argmax(1)
    return {"target_accuracy": (pred == targets).float().mean().item(),
            "source_accuracy": (pred == labels).float().mean().item(),
            "pixel_mse": (out.cpu() - src).pow(2).mean().item(),
            "feature_l2": (feats - f_src).norm(dim=1).mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--classifier", default=None, help="evaluation classifier folder (default: the cached one)")
    p.add_argument("-n", type=int, default=1000, help="test digits (default 1000)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--guidance", type=float, nargs="+", default=None, help="CFG scales for the swap (default: the model's); "
                   "inpainting uses the first")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out-dir", default="bench/results/cpu")
    args = p.parse_args()
    pipe = LatentDiffusion.from_pretrained(args.model)
    images_u8, labels = load_mnist(args.data_dir, "test")
    src, labels = to_unit(images_u8[:args.n]), labels[:args.n]
    targets = (labels + 1 + torch.arange(len(labels)) % 9) % 10  # never the source class
    guidances = args.guidance or [pipe.config.sample.guidance_scale]
    common = {"seed": 0, "steps": args.steps, "batch_size": args.batch_size}
    result = {"model": args.model, "n": len(src), "steps": args.steps, "sampler": pipe.config.sample.sampler,
              "swap": [], "inpaint": []}

    # Sample everything first, then score (the classifier may still be training elsewhere).
    recon = pipe.decode(pipe.encode(src)).cpu()
    swaps, fills = [], []
    for g in guidances:
        for s in [*args.strengths, 1.0]:
            t0 = time.perf_counter()
            swaps.append((g, s, img2img(pipe, src, targets, s, guidance_scale=g, **common).cpu(), time.perf_counter() - t0))
            print(f"swap g={g} s={s}: {swaps[-1][-1]:.0f} s", flush=True)
    g_fill = guidances[0]
    for side in SIDES:
        t0 = time.perf_counter()
        fills.append((side, inpaint(pipe, src, half_mask(side), labels, guidance_scale=g_fill, **common).cpu(),
                      time.perf_counter() - t0))
        print(f"inpaint {side}: {fills[-1][-1]:.0f} s", flush=True)

    clf = load_or_train_classifier(args.classifier, args.data_dir)
    f_src, _ = extract(clf, src)
    result["swap"].append({"strength": 0.0, "guidance": None, **swap_metrics(recon, src, f_src, clf, targets, labels)})
    for g, s, out, seconds in swaps:
        result["swap"].append({"strength": s, "guidance": g, **swap_metrics(out, src, f_src, clf, targets, labels),
                               "seconds": seconds})
    for side, out, seconds in fills:
        mask = half_mask(side)[0, 0].bool()  # (28, 28)
        dist = seam_distance(side)
        interior = mask & (dist >= 4)
        _, logits = extract(clf, out)
        _, half_logits = extract(clf, src * mask)
        profile = {d: (out - recon)[..., mask & (dist == d)].abs().mean().item() for d in range(14)}
        result["inpaint"].append({
            "side": side, "guidance": g_fill, "kept_psnr": psnr((out - src)[..., mask].pow(2).mean()),
            "kept_psnr_reconstruction": psnr((recon - src)[..., mask].pow(2).mean()),
            "kept_psnr_beyond_4px": psnr((out - src)[..., interior].pow(2).mean()),
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "half_digit_accuracy": (half_logits.argmax(1) == labels).float().mean().item(),
            "mae_vs_reconstruction_by_seam_distance": profile, "seconds": seconds})

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "edit_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    plot(result, out_dir / "edit_eval.png")
    print(f"wrote {out_dir / 'edit_eval.json'} and {out_dir / 'edit_eval.png'}")


def print_tables(result: dict) -> None:
    print(f"\nclass swap, N={result['n']} test digits, {result['sampler']} {result['steps']} steps (strength 1 = plain "
          "samples of the target class, strength 0 = VAE reconstruction)")
    print("| guidance | strength | target acc | still source | pixel MSE to source | feature L2 to source |")
    print("|---|---|---|---|---|---|")
    for r in result["swap"]:
        g = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        print(f"| {g} | {r['strength']:g} | {r['target_accuracy']:.1%} | {r['source_accuracy']:.1%} | "
              f"{r['pixel_mse']:.4f} | {r['feature_l2']:.2f} |")
    print(f"\ninpainting, N={result['n']}, the digit's own label, guidance {result['inpaint'][0]['guidance']:g}")
    print("| kept half | PSNR kept (dB) | VAE recon there | kept >= 4 px from seam | accuracy | half digit alone | "
          "MAE vs recon at seam d=0 / 1 / 2-3 / 4-7 / 8+ px |")
    print("|---|---|---|---|---|---|---|")
    for r in result["inpaint"]:
        m = r["mae_vs_reconstruction_by_seam_distance"]
        bands = [[0], [1], [2, 3], [4, 5, 6, 7], list(range(8, 14))]
        prof = " / ".join(f"{sum(m[d] for d in b) / len(b):.3f}" for b in bands)
        print(f"| {r['side']} | {r['kept_psnr']:.1f} | {r['kept_psnr_reconstruction']:.1f} | {r['kept_psnr_beyond_4px']:.1f} "
              f"| {r['accuracy']:.1%} | {r['half_digit_accuracy']:.1%} | {prof} |")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    recon = next(r for r in result["swap"] if r["strength"] == 0)
    for g in sorted({r["guidance"] for r in result["swap"] if r["guidance"] is not None}):
        rows = [recon] + [r for r in result["swap"] if r["guidance"] == g]
        xs = [r["strength"] for r in rows]
        ax1.plot(xs, [100 * r["target_accuracy"] for r in rows], "o-", label=f"guidance {g:g}")
        line, = ax2.plot(xs[:-1], [r["pixel_mse"] for r in rows[:-1]], "o-", label=f"guidance {g:g}")
        ax2.axhline(rows[-1]["pixel_mse"], ls="--", color=line.get_color(), lw=1,
                    label=f"plain samples of the target, g={g:g}")
    ax1.axhline(95, ls=":", color="grey", lw=1)
    ax1.set(xlabel="strength", ylabel="classified as the target class (%)", title="class swap: reaches the target")
    ax2.set(xlabel="strength", ylabel="pixel MSE to the source digit", title="class swap: stays close to the source")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"N={result['n']} MNIST test digits, {result['sampler']} {result['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run_main(main)
