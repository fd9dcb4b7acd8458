"""The command line: ``python -m latentdiff.evaluate classifier|ldm|vae|sweep|samples|plot ...``.

    python -m latentdiff.evaluate classifier --data-dir DIR            # train/check it, print real-data floors
    python -m latentdiff.evaluate ldm --model runs/ldm --data-dir DIR   # accuracy, FLD, precision/recall
    python -m latentdiff.evaluate vae --model runs/vae --data-dir DIR   # MSE, PSNR, recon accuracy, latent stats
    python -m latentdiff.evaluate sweep --model runs/ldm --guidance 1 2 3 --intervals all 100:800 --samplers dpm++:10 ddim:20 --plot sweep.png
    python -m latentdiff.evaluate sweep --model runs/ldm --guidance 2 3 --vary spacing uniform logsnr --set steps=10 --samplers
    python -m latentdiff.evaluate sweep --model runs/ldm --settings '{}' '{"guidance_scale": 2, "guidance_interval": [100, 800]}'
    python -m latentdiff.evaluate samples other.npz --data-dir DIR      # any generator's samples, same metrics
    python -m latentdiff.evaluate plot sweep.json --out sweep.png       # re-draw a sweep (or a metrics.jsonl)

FLD ("Frechet LeNet distance") is FID with Inception swapped for this classifier's penultimate layer.
Frechet distances and k-NN radii are biased by the sample size N, so every number carries its N and
sits next to a real-data floor computed at the same N: train digits scored against test digits.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..cli import check_output_file, check_output_image
from ..serialization import CONFIG_NAME, atomic_write_bytes
from ..timesteps import SPACINGS
from .classifier import (CLASSIFIER_ENV, DEFAULT_CLASSIFIER, Classifier, classifier_info, default_classifier_path,
                         load_or_train_classifier)
from .metrics import Reference
from .samples import load_samples
from .score import evaluate_ldm, evaluate_vae, real_floor, reference_set, score_images
from .sweep import (choose_default, parse_interval, parse_sampler, pick_best, run_sweep, setting_name, sweep_options,
                    sweep_table)

DEFAULT_GUIDANCE = [1, 1.5, 2, 3, 4, 6]
DEFAULT_SAMPLERS = ["dpm++:5", "dpm++:10", "dpm++:20", "ddim:10", "ddim:20", "ddim:50"]


# ------------------------------------------------------------------------------------------ reporting
def format_table(rows: list[tuple[str, str, str]], header: tuple[str, str, str] = ("metric", "model", "real floor")) -> str:
    """Three left-aligned columns under a header and a rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{v:.2%}"


def metric_rows(m: dict, floor: dict | None) -> list[tuple[str, str, str]]:
    """(metric, model value, floor value) rows for a sample_metrics dict and its real floor."""
    f = floor or {}
    spec = [("accuracy", "accuracy", _pct), ("worst-class accuracy", "worst_class_accuracy", _pct),
            (f"FLD (N={m['n']} vs {m['n_ref']} test)", "fld", "{:.3f}".format),
            ("mean per-class FLD", "fld_per_class_mean", "{:.3f}".format),
            (f"precision (k={m['k']})", "precision", "{:.3f}".format), (f"recall (k={m['k']})", "recall", "{:.3f}".format)]
    rows = [(name, fmt(m[key]), fmt(f[key]) if key in f else "") for name, key, fmt in spec]
    rows[1] = (rows[1][0], f"{rows[1][1]} (class {m['worst_class']})", rows[1][2] + (f" (class {f['worst_class']})" if f else ""))
    return rows


def write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------ commands
def _setup(args) -> tuple[Classifier, Reference, dict]:
    clf = load_or_train_classifier(args.classifier, args.data_dir, args.device, getattr(args, "retrain", False))
    ref = reference_set(clf, args.data_dir)
    info = {"path": str(Path(args.classifier).expanduser() if args.classifier else default_classifier_path()),
            **classifier_info(args.classifier)}
    return clf, ref, info


def cmd_classifier(args) -> dict:
    clf, ref, info = _setup(args)
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    print(f"classifier {info['path']}: test accuracy {_pct(info.get('test_accuracy', float('nan')))}, "
          f"trained in {info.get('train_wall_s', float('nan')):.0f} s")
    print(format_table([(n, v, "") for n, v, _ in metric_rows(floor, None)], ("real-data floor", "train vs test", "")))
    return {"classifier": info, "floor": floor}


def _interval_option(args, pipe) -> tuple[int, int] | None:
    """``--guidance-interval LO HI`` or ``all`` -> (lo, hi); None (not given) leaves the model's default."""
    values = args.guidance_interval
    return None if values is None else parse_interval(" ".join(values), pipe.config.diffusion.num_timesteps)


def load_pipe(args):
    """The LDM folder, with ``--guide`` (a UNet folder, or a training checkpoint's EMA) as its autoguidance guide."""
    from ..pipeline import LatentDiffusion

    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)
    if getattr(args, "guide", None):
        pipe.guide = load_guide(args.guide, pipe)
    return pipe


def load_guide(path: str | Path, pipe):
    """A guide UNet from a UNet folder (config.json + model.safetensors) or a checkpoint folder (its EMA weights)."""
    from ..errors import ModelLoadError
    from ..pipeline import check_compatible
    from ..serialization import read_tensors
    from ..unet import UNet

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        guide = UNet.from_pretrained(path, pipe.device)
    elif (path / "ema.safetensors").is_file():  # checkpoints/step_N/ of the same run: the EMA weights at step N
        guide = UNet(pipe.unet.config).to(pipe.device)
        guide.load_state_dict(read_tensors(path / "ema.safetensors"))
    else:
        raise ModelLoadError(f"--guide {path}: not a UNet folder (no {CONFIG_NAME}) nor a checkpoint (no ema.safetensors)")
    check_compatible(guide, pipe.vae, "guide UNet")
    return guide.eval()


def cmd_ldm(args) -> dict:
    pipe = load_pipe(args)  # fail fast, before the classifier
    interval = _interval_option(args, pipe)
    pipe.settings(guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler, guidance_interval=interval,
                  spacing=args.spacing, autoguidance_scale=args.autoguidance)  # checks them too
    clf, ref, info = _setup(args)
    r = evaluate_ldm(pipe, clf, ref, args.n_per_class, args.guidance, args.sampler, args.steps, args.seed, args.batch_size,
                     guidance_interval=interval, spacing=args.spacing, autoguidance_scale=args.autoguidance)
    images = r.pop("images")
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    print(f"{args.model}: {setting_name(r, pipe.config.diffusion.num_timesteps)}, {r['spacing']} spacing, "
          f"{len(images)} samples in {r['generate_s']:.1f} s (+ {r['metrics_s']:.1f} s metrics)")
    print(format_table(metric_rows(r["metrics"], floor)))
    if args.samples:
        from ..pipeline import make_grid

        make_grid(images.view(pipe.num_classes, args.n_per_class, 1, 28, 28)[:, :10].flatten(0, 1), nrow=min(10, args.n_per_class)).save(args.samples)
    return {"model": str(args.model), **r, "floor": floor, "classifier": info}


def cmd_vae(args) -> dict:
    from ..vae import VAE

    model = Path(args.model)
    vae = VAE.from_pretrained(model / "vae" if (model / "vae" / CONFIG_NAME).is_file() else model, args.device)
    clf, ref, info = _setup(args)
    r = evaluate_vae(vae, clf, ref, args.data_dir, args.batch_size, args.n_per_class, args.seed)
    rows = [("MSE ([0,1] pixels)", f"{r['mse']:.5f}"), ("PSNR (dB, of the mean MSE)", f"{r['psnr']:.2f}"),
            ("PSNR (dB, mean per image)", f"{r['psnr_mean_per_image']:.2f}"),
            ("recon accuracy", f"{_pct(r['accuracy'])} (originals {_pct(r['accuracy_originals'])})"),
            ("recon worst-class accuracy", f"{_pct(r['worst_class_accuracy'])} (class {r['worst_class']})"),
            (f"FLD recon vs test (N={r['n']})", f"{r['fld']:.3f}"), ("precision / recall", f"{r['precision']:.3f} / {r['recall']:.3f}"),
            (f"FLD of {r['train_n']} train digits' recon vs test", f"{r['train_recon_fld']:.4f} = "
             f"{r['train_recon_fld_ratio']:.2f}x the real digits' own {r['train_real_fld']:.4f} (the floor for any LDM)"),
            ("scaled latent mean per channel", " ".join(f"{v:+.3f}" for v in r["latent_mean"])),
            ("scaled latent std per channel", " ".join(f"{v:.3f}" for v in r["latent_std"]))]
    print(f"{args.model} on the {r['n']} test digits")
    print(format_table([(a, b, "") for a, b in rows], ("metric", "value", "")))
    return {"model": str(args.model), **r, "classifier": info}


def cmd_sweep(args) -> dict:
    for name in ("min_accuracy", "min_worst_class"):  # fractions: 0.995 is 99.5% (NaN fails too)
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} is a fraction in [0, 1] (0.995 = 99.5%), got {getattr(args, name)}")
    if not args.min_recall_ratio >= 0:
        raise ValueError(f"--min-recall-ratio is a multiple of the real floor's recall, >= 0, got {args.min_recall_ratio}")
    samplers = [parse_sampler(s) for s in _or_default(args.samplers, args.settings, DEFAULT_SAMPLERS)]  # fail fast
    guidances = _or_default(args.guidance, args.settings, DEFAULT_GUIDANCE)
    if not (samplers or guidances or args.settings):
        raise ValueError("nothing to sweep: --guidance and --samplers are both empty; give scales (--guidance 1 2), "
                         "samplers (--samplers ddim:20) or --settings")
    pipe = load_pipe(args)
    T = pipe.config.diffusion.num_timesteps
    interval = _interval_option(args, pipe)
    intervals = [parse_interval(s, T) for s in args.intervals] if args.intervals else [None]
    pipe.settings(guidance_scale=args.sampler_guidance, guidance_interval=interval, spacing=args.spacing)  # checks them
    fixed, vary, settings = sweep_options(pipe, args.set, args.vary, args.settings, args.spacing)
    clf, ref, info = _setup(args)
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    sweep = run_sweep(pipe, clf, ref, guidances, samplers, args.n_per_class, args.seed, args.batch_size,
                      args.sampler_guidance, intervals=intervals, guidance_interval=interval, spacing=args.spacing,
                      fixed=fixed, vary=vary, settings=settings, floor=floor)
    sweep["choice"] = choose_default(sweep, args.min_accuracy)
    sweep["best"] = pick_best(sweep, args.min_accuracy, args.min_worst_class, args.min_recall_ratio, args.max_unet_rows)
    print(f"{args.model}: N = {args.n_per_class * pipe.num_classes} samples per setting, seed {args.seed}, "
          f"{sweep['spacing']} spacing")
    print(sweep_table(sweep, floor, T))
    print(f"choice: {sweep['choice']}")
    print(f"best ({sweep['best']['rule']}): {json.dumps(sweep['best']['setting'])}")
    if args.plot:
        from ..plot import sweep_has_curves, sweep_plot

        if sweep_has_curves(sweep):
            sweep_plot(sweep, floor, args.plot)
            print(f"wrote {args.plot}")
        else:
            print(f"not writing {args.plot}: the figure draws guidance and sampler runs, and these --settings vary "
                  "more than the guidance scale and interval")
    return {"model": str(args.model), "n_per_class": args.n_per_class, "seed": args.seed, **sweep, "floor": floor,
            "classifier": info}


def _or_default(values: list | None, settings: list | None, default: list) -> list:
    """An option's values; when not given, its default, or nothing when the sweep is given explicit --settings."""
    if values is not None:
        return values
    return [] if settings else default


def cmd_samples(args) -> dict:
    images, labels = load_samples(args.file)  # fail fast on a bad file, before the classifier
    clf, ref, info = _setup(args)
    r = score_images(clf, ref, images, labels, args.batch_size)
    counts = torch.bincount(labels, minlength=clf.config.num_classes).tolist()
    floor = real_floor(clf, args.data_dir, ref, counts, args.seed)  # real digits with the same class counts
    present = sorted({c for c in counts if c})
    per_class = f"{present[0]}" if len(present) == 1 else f"{present[0]}-{present[-1]}"
    print(f"{args.file}: {len(labels)} samples, {per_class} per class for {sum(c > 0 for c in counts)} classes; "
          f"scored in {r['metrics_s']:.1f} s")
    if floor["n"] != len(labels):
        print(f"note: the real floor uses {floor['n']} train digits (a class has fewer train digits than samples)")
    print(format_table(metric_rows(r["metrics"], floor)))
    return {"file": str(args.file), "class_counts": counts, **r, "floor": floor, "classifier": info}


def cmd_plot(args) -> None:
    """Re-draw a figure from saved results: a sweep JSON (``sweep --out``) or a run's metrics.jsonl."""
    from ..plot import loss_plot, sweep_has_curves, sweep_plot

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a sweep JSON written by `evaluate sweep --out` or a run's metrics.jsonl")
    text = path.read_text()
    try:
        records = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass a sweep JSON or a metrics.jsonl") from e
    if path.suffix == ".jsonl":
        rows = [r for r in records if isinstance(r, dict) and "step" in r and "loss" in r]
        if not rows:
            raise ValueError(f"{path} holds no records with 'step' and 'loss'; pass a run's metrics.jsonl")
        loss_plot([r["step"] for r in rows], [r["loss"] for r in rows], args.png, title=f"training loss ({path.parent.name})")
    else:
        sweep = records[0]
        if not isinstance(sweep, dict) or "floor" not in sweep or not sweep_has_curves(sweep):
            raise ValueError(f"{path} is not a sweep result (needs 'guidance' or 'sampler' runs, or --settings that "
                             "vary only the guidance, and a 'floor'); "
                             f"write one with `python -m latentdiff.evaluate sweep --out FILE`")
        sweep_plot(sweep, sweep["floor"], args.png)
    print(f"wrote {args.png}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m latentdiff.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def scoring(sp: argparse.ArgumentParser) -> None:  # every command that uses the classifier
        sp.add_argument("--data-dir", help="folder with the MNIST IDX files (default: $LATENTDIFF_DATA, else ./data; downloaded there if missing)")
        sp.add_argument("--classifier", help=f"classifier folder, trained there if missing (default: ${CLASSIFIER_ENV} "
                                             f"or {DEFAULT_CLASSIFIER})")
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--batch-size", type=int, default=500)
        sp.add_argument("--out", help="write the results as JSON here")
        sp.add_argument("--threads", type=int, help="torch CPU threads (1 is often faster on a busy shared CPU)")

    def common(sp: argparse.ArgumentParser, n_default: int = 1000) -> None:
        scoring(sp)
        sp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also seeds the real-floor subset")
        sp.add_argument("--n-per-class", type=int, default=n_default, help=f"samples per class (default {n_default})")

    def guidance_options(sp: argparse.ArgumentParser) -> None:  # passed through to LatentDiffusion.generate
        sp.add_argument("--guide", help="autoguidance guide instead of the folder's guide/: a UNet folder, or a "
                                        "checkpoint folder of the same run (checkpoints/step_N: its EMA weights)")
        sp.add_argument("--guidance-interval", nargs="+", metavar="BOUND",
                        help="LO HI: guide only at timesteps LO <= t <= HI of 0..T-1; or 'all' for every step "
                             "(default: the model's; in a sweep, the sampler part's interval)")
        sp.add_argument("--spacing", choices=sorted(SPACINGS), help="sampler timestep spacing (default: the model's)")

    sp = sub.add_parser("classifier", help="train (if missing) the classifier and print the real-data floors")
    common(sp)
    sp.add_argument("--retrain", action="store_true", help="train again even if the folder exists")
    sp.set_defaults(fn=cmd_classifier)

    sp = sub.add_parser("ldm", help="score samples of one LDM setting")
    common(sp)
    sp.add_argument("--model", required=True, help="LDM run folder")
    sp.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    sp.add_argument("--sampler", help="dpm++ | ddim | ddpm (default: the model's)")
    sp.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    guidance_options(sp)
    sp.add_argument("--autoguidance", type=float, metavar="W",
                    help="autoguidance weight by the folder's guide/ model, 1 = off (default: the model's; in a sweep: "
                         "--set autoguidance_scale=W or --vary autoguidance_scale W1 W2)")
    sp.add_argument("--samples", help="also save a PNG grid of the first 10 samples of each class")
    sp.set_defaults(fn=cmd_ldm)

    sp = sub.add_parser("vae", help="reconstruction metrics on the test split")
    common(sp)
    sp.add_argument("--model", required=True, help="VAE folder (or an LDM run folder, whose vae/ is used)")
    sp.set_defaults(fn=cmd_vae)

    sp = sub.add_parser("sweep", help="the one sweep driver: guidance x intervals x any generate() keyword, "
                                      "sampler x steps, explicit settings")
    common(sp)
    sp.add_argument("--model", required=True, help="LDM run folder")
    sp.add_argument("--guidance", type=float, nargs="*",
                    help=f"guidance scales (default {' '.join(map(str, DEFAULT_GUIDANCE))}; none with --settings)")
    sp.add_argument("--samplers", nargs="*", help=f"NAME:STEPS specs, e.g. dpm++:20 ddim:50 ddpm:1000 (default "
                                                  f"{' '.join(DEFAULT_SAMPLERS)}; none with --settings)")
    sp.add_argument("--intervals", nargs="+", metavar="SPEC",
                    help="guidance intervals to sweep with every --guidance scale: 'all' (every step) or LO:HI "
                         "timesteps, e.g. all 100:800 200:850 (default: the --guidance-interval)")
    sp.add_argument("--sampler-guidance", type=float, help="guidance for the sampler sweep (default: the model's)")
    guidance_options(sp)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a generate() keyword for every run, VALUE as JSON or a plain string; repeatable, "
                         "e.g. --set eta=0.5 --set spacing=logsnr --set steps=10")
    sp.add_argument("--vary", action="append", nargs="+", metavar=("KEY", "VALUE"),
                    help="sweep a generate() keyword over values, crossed with --guidance and --intervals; "
                         "repeatable, e.g. --vary spacing uniform logsnr --vary steps 10 20")
    sp.add_argument("--settings", nargs="+", metavar="JSON",
                    help="explicit points, each a JSON object of generate() keywords ({} = the model's defaults), "
                         "e.g. '{\"guidance_scale\": 2, \"guidance_interval\": [100, 800], \"spacing\": \"karras\"}'")
    sp.add_argument("--min-accuracy", type=float, default=0.98, help="accuracy bar for the choice and best (default 0.98)")
    sp.add_argument("--min-worst-class", type=float, default=0.0, help="worst-class accuracy bar for best (default 0)")
    sp.add_argument("--min-recall-ratio", type=float, default=0.0, help="recall / real floor bar for best (default 0)")
    sp.add_argument("--max-unet-rows", type=float, default=math.inf, help="cost bar for best: UNet rows per digit")
    sp.add_argument("--plot", help="write a PNG of the sweep here (its guidance and sampler runs)")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("samples", help="score any generator's samples saved as .npz (images + labels)")
    sp.add_argument("file", help=".npz with 'images' (N,28,28) or (N,1,28,28), uint8 or float in [0,1], and 'labels' "
                                 "(N,); or keys 'x' and 'y'. sample.py --npz writes one")
    scoring(sp)
    sp.add_argument("--seed", type=int, default=0, help="seeds the real-floor subset")
    sp.set_defaults(fn=cmd_samples)

    sp = sub.add_parser("plot", help="re-draw a figure from saved results (a sweep JSON or a metrics.jsonl)")
    sp.add_argument("file", help="sweep JSON from `sweep --out`, or a training run's metrics.jsonl (loss curve)")
    sp.add_argument("--out", dest="png", required=True, help="PNG to write")
    sp.set_defaults(fn=cmd_plot)
    return p


def check_outputs(args) -> None:
    """Refuse output names that would fail only after the evaluation (all its work lost): --out, --plot, --samples."""
    if getattr(args, "out", None):
        check_output_file(args.out, "--out", "results.json")
    if getattr(args, "samples", None):
        check_output_image(args.samples, "--samples")
    png = getattr(args, "plot", None) or (getattr(args, "png", None) if args.command == "plot" else None)
    if png:
        flag = "--plot" if args.command == "sweep" else "--out"
        check_output_file(png, flag, "sweep.png")
        from matplotlib.backend_bases import FigureCanvasBase

        suffix = Path(png).suffix  # none: matplotlib writes a PNG
        if suffix and suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
            raise ValueError(f"{flag} {png}: matplotlib writes no figure format with the extension {suffix}; end the "
                             "name in .png (or .pdf, .svg, .jpg)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "n_per_class", 2) < 2:
        raise ValueError(f"--n-per-class must be >= 2 (covariances and k-NN radii need several samples), got {args.n_per_class}")
    for flag in ("batch_size", "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    check_outputs(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    result = args.fn(args)
    if getattr(args, "out", None):
        write_json(result, args.out)
        print(f"wrote {args.out}")

