"""Sampling-quality sweep (issue 8): guidance scale x guidance interval x spacing x sampler:steps.

Every setting draws the same class-balanced digits (sample i uses seed + i) and is scored by
latentdiff.evaluate's classifier against the real-data floor at the same N. Prints a table, writes
JSON (and a PNG of FLD / floor against accuracy), and names the best setting by the issue's
targets: accuracy >= 99.5%, worst class >= 99.0%, recall >= 0.9x the floor, then lowest FLD.

    python bench/quality_sweep.py --model runs/ldm --data-dir ../shared/data --n-per-class 200 \\
        --guidance 1.5 2 3 --intervals all 100:800 100:600 --spacings uniform logsnr --samplers dpm++:10 \\
        --out bench/results/cpu/quality_sweep.json --plot bench/results/cpu/quality_sweep.png
    python bench/quality_sweep.py ... --no-grid --settings 1.5/all/uniform/dpm++:20 3/100:800/logsnr/dpm++:10

--cache DIR keeps each setting's digits (safetensors) so a rerun only scores; --generate-only fills it
without the classifier.

Cost columns: "NFE" is UNet evaluations per digit with CFG's doubled batch counted once (= steps);
"rows" counts the batch rows the UNet actually ran per digit (guided steps count twice).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.cli import run_main  # noqa: E402
from latentdiff.evaluate import (extract, load_or_train_classifier, parse_sampler, real_floor, reference_set,  # noqa: E402
                                 sample_metrics, write_json)
from latentdiff.sampling import check_guidance_interval, unet_rows  # noqa: E402
from latentdiff.timesteps import SPACINGS, make_timesteps  # noqa: E402

TARGETS = {"accuracy": 0.995, "worst_class_accuracy": 0.99, "recall_ratio": 0.9}


def parse_interval(spec: str) -> tuple[int, int] | None:
    """'all' -> None (every step); 'LO:HI' -> (LO, HI)."""
    if spec == "all":
        return None
    lo, sep, hi = spec.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise ValueError(f"interval {spec!r} must be 'all' or LO:HI timesteps, e.g. 100:800")
    return check_guidance_interval((int(lo), int(hi)))


def parse_setting(spec: str) -> tuple:
    """'G/INTERVAL/SPACING/SAMPLER:STEPS', e.g. '3/100:800/logsnr/dpm++:10' -> (3.0, (100, 800), 'logsnr', 'dpm++', 10)."""
    parts = spec.split("/")
    if len(parts) != 4 or parts[2] not in SPACINGS:
        raise ValueError(f"setting {spec!r} must look like G/INTERVAL/SPACING/SAMPLER:STEPS, e.g. 3/100:800/logsnr/dpm++:10")
    return (float(parts[0]), parse_interval(parts[1]), parts[2], *parse_sampler(parts[3]))


def every_step_if_none(pipe, interval):
    """This script's "all" (None) as generate() needs it: to generate(), None means the model's default interval."""
    return interval if interval is not None else (0, pipe.config.diffusion.num_timesteps - 1)


def generate(pipe, labels: torch.Tensor, guidance: float, interval, spacing: str, sampler: str, steps: int,
             seed: int, batch_size: int | None, cache: str | None) -> tuple[torch.Tensor, float]:
    """The setting's digits and the seconds they took; with ``cache``, reuse (or keep) them as safetensors."""
    iv = "all" if interval is None else f"{interval[0]}-{interval[1]}"
    path = Path(cache or ".") / f"g{guidance:g}_{iv}_{spacing}_{sampler}{steps}_n{len(labels)}_s{seed}.safetensors"
    if cache and path.is_file():
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("images"), float(f.metadata()["generate_s"])
    t0 = time.perf_counter()
    images = pipe.generate(labels, guidance_scale=guidance, steps=steps, sampler=sampler, seed=seed,
                           batch_size=batch_size, guidance_interval=every_step_if_none(pipe, interval), spacing=spacing).cpu()
    gen_s = time.perf_counter() - t0
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, str(path), metadata={"generate_s": repr(gen_s)})
    return images, gen_s


def run_setting(pipe, clf, ref, floor: dict, n_per_class: int, guidance: float, interval, spacing: str,
                sampler: str, steps: int, seed: int, batch_size: int | None, cache: str | None = None) -> dict:
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    images, gen_s = generate(pipe, labels, guidance, interval, spacing, sampler, steps, seed, batch_size, cache)
    if clf is None:  # --generate-only
        return {"guidance_scale": guidance, "guidance_interval": interval, "spacing": spacing, "sampler": sampler,
                "steps": steps, "generate_s": gen_s}
    feats, logits = extract(clf, images)
    m = sample_metrics(feats, logits, labels, ref, num_classes=clf.config.num_classes)
    ts = make_timesteps(pipe.alphas_cumprod, steps, spacing)
    return {"guidance_scale": guidance, "guidance_interval": list(interval) if interval else None, "spacing": spacing,
            "sampler": sampler, "steps": steps, "nfe": steps, "unet_rows": unet_rows(ts, guidance, interval),
            "timesteps": ts.tolist(), "generate_s": gen_s, "digits_per_s": len(labels) / gen_s,
            "fld_ratio": m["fld"] / floor["fld"], "class_fld_ratio": m["fld_per_class_mean"] / floor["fld_per_class_mean"],
            "recall_ratio": m["recall"] / floor["recall"], "metrics": m}


def time_settings(pipe, results: list[dict], batch: int, repeats: int) -> None:
    """Median digits/s of one ``batch``-digit generate() per setting, settings interleaved per round so that
    load from other processes on a shared machine hits them alike; stored as r["batch_digits_per_s"]."""
    labels = torch.arange(batch) % pipe.num_classes
    times: list[list[float]] = [[] for _ in results]
    for _ in range(repeats + 1):  # the first round warms up
        for i, r in enumerate(results):
            t0 = time.perf_counter()
            pipe.generate(labels, guidance_scale=r["guidance_scale"], steps=r["steps"], sampler=r["sampler"], seed=0,
                          batch_size=batch, guidance_interval=every_step_if_none(pipe, r["guidance_interval"]),
                          spacing=r["spacing"])
            times[i].append(time.perf_counter() - t0)
    for r, ts in zip(results, times):
        r["batch_digits_per_s"] = batch / statistics.median(ts[1:])
        r["timing"] = {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads()}


def meets_targets(r: dict) -> bool:
    m = r["metrics"]
    return (m["accuracy"] >= TARGETS["accuracy"] and m["worst_class_accuracy"] >= TARGETS["worst_class_accuracy"]
            and r["recall_ratio"] >= TARGETS["recall_ratio"])


def pick(results: list[dict], max_nfe: int) -> dict | None:
    """Lowest FLD among settings that meet the targets within max_nfe; else None."""
    ok = [r for r in results if r["nfe"] <= max_nfe and meets_targets(r)]
    return min(ok, key=lambda r: r["metrics"]["fld"]) if ok else None


def name(r: dict) -> str:
    iv = "all" if r["guidance_interval"] is None else "{}:{}".format(*r["guidance_interval"])
    return f"g={r['guidance_scale']:g} [{iv}] {r['spacing']} {r['sampler']}:{r['steps']}"


def table(results: list[dict], floor: dict) -> str:
    header = ("setting", "NFE", "rows", "acc", "worst", "FLD", "xfloor", "class-FLD x", "P", "R", "R x", "ok")
    rows = [(name(r), str(r["nfe"]), str(r["unet_rows"]), f"{r['metrics']['accuracy']:.2%}",
             f"{r['metrics']['worst_class_accuracy']:.2%}", f"{r['metrics']['fld']:.3f}", f"{r['fld_ratio']:.2f}",
             f"{r['class_fld_ratio']:.2f}", f"{r['metrics']['precision']:.3f}", f"{r['metrics']['recall']:.3f}",
             f"{r['recall_ratio']:.2f}", "yes" if meets_targets(r) else "") for r in results]
    rows.append(("real floor", "", "", f"{floor['accuracy']:.2%}", f"{floor['worst_class_accuracy']:.2%}",
                 f"{floor['fld']:.3f}", "1.00", "1.00", f"{floor['precision']:.3f}", f"{floor['recall']:.3f}", "1.00", ""))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [header, tuple("-" * w for w in widths), *rows])


def plot(results: list[dict], path: str) -> None:
    """The frontier: FLD / floor against accuracy, one line per (interval, spacing, sampler:steps) over guidance."""
    from latentdiff.plot import line_plot

    lines: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["guidance_scale"]):
        lines.setdefault(name(r).split(" ", 1)[1], []).append(r)
    series = {k: ([100 * r["metrics"]["accuracy"] for r in v], [r["fld_ratio"] for r in v]) for k, v in lines.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, path, title="FLD / real floor vs accuracy (%), each line over guidance scales", xlabel="accuracy %",
              logy=True, size=(900, 600))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="LDM run folder")
    p.add_argument("--data-dir", help="MNIST IDX folder (default: $LATENTDIFF_DATA)")
    p.add_argument("--classifier", help="judge classifier folder (default: latentdiff.evaluate's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="default: generate()'s (256 CPU, 4096 GPU)")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--intervals", nargs="+", default=["all"], help="'all' or LO:HI timesteps, e.g. 100:800")
    p.add_argument("--spacings", nargs="+", default=["uniform"], choices=sorted(SPACINGS))
    p.add_argument("--samplers", nargs="+", default=["dpm++:10"], help="NAME:STEPS, e.g. dpm++:10 ddim:20")
    p.add_argument("--settings", nargs="+", default=[],
                   help="explicit settings G/INTERVAL/SPACING/SAMPLER:STEPS, run after the grid above (if given)")
    p.add_argument("--no-grid", action="store_true", help="run only --settings")
    p.add_argument("--time-repeats", type=int, default=0,
                   help="also time one --time-batch generate() per setting this many times (interleaved)")
    p.add_argument("--time-batch", type=int, default=256)
    p.add_argument("--max-nfe", type=int, default=10, help="budget for the pick (default 10 UNet evaluations)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache", help="folder to keep each setting's digits in (safetensors) and reuse them from")
    p.add_argument("--generate-only", action="store_true", help="fill --cache without scoring (no classifier)")
    p.add_argument("--out", help="JSON results")
    p.add_argument("--plot", help="PNG: FLD / floor vs accuracy, a line per interval and spacing")
    args = p.parse_args()
    if args.n_per_class < 2:
        raise ValueError(f"--n-per-class must be >= 2, got {args.n_per_class}")
    intervals = [parse_interval(s) for s in args.intervals]
    samplers = [parse_sampler(s) for s in args.samplers]
    [parse_setting(s) for s in args.settings]  # fail fast on a typo, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate_only and not args.cache:
        raise ValueError("--generate-only needs --cache DIR to keep the digits in")
    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)
    clf = ref = floor = None
    if not args.generate_only:
        clf = load_or_train_classifier(args.classifier, args.data_dir, args.device)
        ref = reference_set(clf, args.data_dir)
        floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    results = []
    grid = [] if args.no_grid else [(g, i, sp, *smp) for g, i, sp, smp in
                                     itertools.product(args.guidance, intervals, args.spacings, samplers)]
    for g, interval, spacing, sampler, steps in grid + [parse_setting(s) for s in args.settings]:
        if interval is not None and g in (0.0, 1.0):
            continue  # no guidance to limit
        r = run_setting(pipe, clf, ref, floor, args.n_per_class, g, interval, spacing, sampler, steps, args.seed,
                        args.batch_size, args.cache)
        if clf is None:
            print(f"generated g={g:g} {interval} {spacing} {sampler}:{steps} in {r['generate_s']:.0f} s", file=sys.stderr)
            continue
        results.append(r)
        print(f"{name(r)}: acc {r['metrics']['accuracy']:.2%} worst {r['metrics']['worst_class_accuracy']:.2%} "
              f"FLD x{r['fld_ratio']:.2f} R x{r['recall_ratio']:.2f} [{r['generate_s']:.0f} s]", file=sys.stderr, flush=True)
    if clf is None:
        return
    if args.time_repeats:
        time_settings(pipe, results, args.time_batch, args.time_repeats)
        for r in results:
            print(f"{name(r)}: {r['batch_digits_per_s']:.1f} digits/s at batch {args.time_batch}")
    best = pick(results, args.max_nfe)
    print(f"{args.model}: N = {args.n_per_class * pipe.num_classes} per setting, seed {args.seed}, device {args.device}")
    print(table(results, floor))
    print(f"best within {args.max_nfe} NFE meeting {TARGETS}: {name(best) if best else 'none'}")
    if args.out:
        write_json({"model": str(args.model), "n_per_class": args.n_per_class, "seed": args.seed, "device": args.device,
                    "targets": TARGETS, "best": best, "results": results, "floor": floor}, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    run_main(main)
