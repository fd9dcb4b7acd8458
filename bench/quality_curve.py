"""Quality for the time you give it: train one LDM per CPU budget, score each, draw the curve (issue 36).

    time accelerate launch train_vae.py --config quick --out runs/vae --data-dir DIR    # the shared VAE, timed
    python bench/quality_curve.py probe 10-quick 20-width --vae runs/vae --data-dir DIR --out R
    python bench/quality_curve.py train 10-quick --vae runs/vae --runs runs/curve --data-dir DIR --out R \
        --vae-wall-s SECONDS                        # alone: this point calibrates the others' minutes
    python bench/quality_curve.py train 20-steps --vae runs/vae --runs runs/curve --data-dir DIR --out R
    python bench/quality_curve.py score 20-steps --runs runs/curve --data-dir DIR --out R
    make demo PRESET=hour RUNS=runs/hour && mv runs/hour/ldm runs/curve/hour     # the hour point, timed
    python bench/quality_curve.py score hour --runs runs/curve --data-dir DIR --out R
    python bench/quality_curve.py score hour --guidance 1.5 2 2.5 3 --intervals 100:800 --refine 0.1 \
        --runs runs/curve --data-dir DIR --out R         # the same model, guided on the middle steps only
    python bench/quality_curve.py score hour --seed 10000 --guidance 1.7 1.8 1.9 2 2.2 --intervals 100:800 \
        --refine 0 --runs runs/curve --data-dir DIR --out R   # a second draw near the bar: the rule reads the mean
    python bench/quality_curve.py report --out R --png docs/quality_curve.png --json R/curve.json

Each point is its own run of ``train_ldm.py --config quick`` with the overrides in ``POINTS`` (width,
steps, batch: chosen for the budget, each with its own learning-rate schedule, which follows
``train.steps``), on one VAE (the quick preset's; its reconstructions sit at the real digits' floor, see
docs/results.md). The budget is the *whole* pipeline's wall time on an idle 2-core CPU: the VAE's
training run plus the LDM's run, start-up, latent encoding and saving included.

* ``probe`` times each point alone for ``--steps`` optimizer steps on ``--threads`` threads (the rate
  between the first logged step and the last, so start-up is left out) and writes ``probe.json``: what
  a point's budget is sized with, and what ``report`` turns steps into minutes with.
* ``train`` trains the points one after the other and records each run's wall time and training time
  (``train_<point>.json``). Run it on an idle machine for wall times that mean something; a point
  trained beside other work still gets its minutes from the probe.
* ``score`` runs ``python -m latentdiff.evaluate sweep`` at N = 10,000 (``--n-per-class 1000``) over the
  guidance scales crossed with the guidance intervals (``--intervals all 100:800``: one sweep file each) and
  picks the default by the rule that chose the quick preset's (lowest FLD with accuracy >= 99.5%, every
  class >= 99.0%, recall >= 0.9x the floor, <= 20 UNet rows per digit) over all of them, then scores the
  scales between that pick and the one below it in its interval every ``--refine`` (a _refined file).
* ``report`` prints the table (minutes, the model alone, the chosen scale's numbers) and draws accuracy,
  FLD, per-class FLD, recall and the model alone against minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Per point: the preset it trains ("config", default quick) and its overrides. The quick point is the preset
# itself (`make demo`); the hour point is the hour preset (`make demo PRESET=hour`, timed from a fresh clone).
POINTS: dict[str, dict] = {
    "10-quick": {"overrides": []},
    "20-steps": {"overrides": ["train.steps=11500"], "probe": "10-quick"},  # the quick UNet, 4.8x the steps
    "20-width": {"overrides": ["model.channels=[64,128]", "train.steps=4950"]},  # twice the width, 2.1x the steps
    "40-width": {"overrides": ["model.channels=[64,128]", "train.steps=10750"], "probe": "20-width"},
    "hour": {"config": "hour", "overrides": [], "probe": "10-quick"},  # the quick UNet, 18,000 steps
    "60-steps": {"config": "hour", "overrides": ["train.steps=39000"], "probe": "10-quick"},  # 16x the quick's steps
}
GUIDANCE = [1.0, 1.15, 1.3, 1.45]
INTERVALS = ["all"]  # guidance intervals crossed with the scales (evaluate sweep's --intervals)
# The quick preset's rule for the default scale: pick_best's bars (also passed to `evaluate sweep` as its options).
RULE = {"min_accuracy": 0.995, "min_worst_class": 0.99, "min_recall_ratio": 0.9, "max_unet_rows": 20}
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def point_config(point: str):
    """The LDM run config a point trains: its preset (quick unless it names one) with the point's overrides."""
    from latentdiff.cli import resolve_config_path
    from latentdiff.config import LDMRunConfig, load_config

    return load_config(LDMRunConfig, resolve_config_path(preset(point), "ldm"), POINTS[point]["overrides"])


def preset(point: str) -> str:
    return POINTS[point].get("config", "quick")


def probed_rate(point: str, probes: dict) -> float | None:
    """Steps/s of the point's probe (a point of the same network and batch shares one: POINTS' "probe")."""
    return probes.get(POINTS[point].get("probe", point), {}).get("steps_per_s")


def launch(point: str, vae: str, out: Path, data_dir: str | None, threads: int, extra: list[str]) -> float:
    """Train one point with accelerate launch (as `make demo` does); its wall time in seconds."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
           "--mixed_precision", "no", "--num_cpu_threads_per_process", str(threads),
           str(ROOT / "train_ldm.py"), "--config", preset(point), "--vae", vae, "--out", str(out)]
    cmd += ["--data-dir", data_dir] if data_dir else []
    for o in POINTS[point]["overrides"] + extra:
        cmd += ["--set", o]
    print(" ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def probe(args) -> None:
    out = Path(args.out) / "probe.json"
    res = json.loads(out.read_text()) if out.exists() else {}
    for point in args.points:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            wall = launch(point, args.vae, run, args.data_dir, args.threads,
                          [f"train.steps={args.steps}", "train.log_every=25", "train.preview_every=0",
                           "train.checkpoint_every=0", "guide.fraction=0", *args.overrides])
            m = read_metrics(run)
        first, last = m[0], m[-1]
        rate = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
        key = point + (f" {args.label}" if args.label else "")
        res[key] = {"overrides": POINTS[point]["overrides"] + args.overrides, "threads": args.threads,
                    "probe_steps": args.steps, "steps_per_s": rate, "wall_s": wall, "cpu": cpu_name(),
                    "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "native")}
        print(f"{key}: {rate:.2f} steps/s", flush=True)
        save(out, res)


def train(args) -> None:
    for point in args.points:
        run = Path(args.runs) / point
        wall = launch(point, args.vae, run, args.data_dir, args.threads, ["--overwrite"] if args.overwrite else [])
        m = read_metrics(run)
        save(Path(args.out) / f"train_{point}.json",
             {"point": point, "overrides": POINTS[point]["overrides"], "threads": args.threads, "wall_s": wall,
              "train_s": m[-1]["elapsed_s"], "steps": m[-1]["step"], "cpu": cpu_name(),
              "alone": not args.beside_other_work,
              **({"vae_wall_s": args.vae_wall_s} if args.vae_wall_s is not None else {})})


def sweep_files(out: Path, point: str) -> list[Path]:
    """A point's sweep files: sweep_<point>.json (every step), sweep_<point>_t<lo>-<hi>.json (an interval),
    and their _refined files. Not another point's whose name extends this one's."""
    return sorted(f for f in out.glob(f"sweep_{point}*.json")
                  if f.stem == f"sweep_{point}" or f.stem.startswith(f"sweep_{point}_"))


def interval_tag(spec: str) -> str:
    """The file-name part of an --intervals spec: '' for every step, '_t100-800' for 100:800."""
    return "" if spec == "all" else "_t" + spec.replace(":", "-")


def run_key(r: dict) -> tuple:
    """(scale, interval): a sweep's runs are one per key; () is every step (``merged_runs`` reads a file's
    [0, T-1] as that)."""
    return r["guidance_scale"], tuple(r.get("guidance_interval") or ())


def merged_runs(out: Path, point: str) -> list[dict]:
    """Every guidance run of a point's sweep files (first sweeps, then refinements), one per (scale, interval): the
    first of each seed, and where several draws (``score --seed``) scored a setting, their mean (``pooled``)."""
    runs: dict[tuple, dict[int, dict]] = {}
    for f in sweep_files(out, point):
        sweep = json.loads(f.read_text())
        every_step = [0, sweep.get("num_timesteps", 1000) - 1]
        for r in sweep["guidance"]:
            r = {**r, "guidance_interval": None if r.get("guidance_interval") == every_step else r.get("guidance_interval")}
            runs.setdefault(run_key(r), {}).setdefault(r.get("seed", 0), r)
    return [pooled(list(runs[k].values())) for k in sorted(runs, key=lambda k: (k[1], k[0]))]


def pooled(draws: list[dict]) -> dict:
    """One run from draws of the same setting with different seeds: the mean of each figure, the worst class
    that of the mean per-class accuracies, ``n`` summed, ``draws`` counted. One draw is returned as it is."""
    if len(draws) == 1:
        return draws[0]
    mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
    m = [d["metrics"] for d in draws]
    per_class = [mean([x["per_class_accuracy"][c] for x in m]) for c in range(len(m[0]["per_class_accuracy"]))]
    metrics = {k: mean([x[k] for x in m]) for k in ("accuracy", "fld", "fld_per_class_mean", "precision", "recall")}
    metrics.update(per_class_accuracy=per_class, worst_class_accuracy=min(per_class),
                   worst_class=per_class.index(min(per_class)), n=sum(x["n"] for x in m))
    ratios = {k: mean([d["ratios"][k] for d in draws]) for k in draws[0]["ratios"]}
    return {**draws[0], "metrics": metrics, "ratios": ratios, "seed": [d.get("seed", 0) for d in draws],
            "draws": len(draws)}


def as_list(seed) -> list[int]:
    return seed if isinstance(seed, list) else [seed]


def guidance_label(r: dict | None) -> str:
    """'1.4' (every step) or '2 on t in [100, 800]'; '-' for no run."""
    if r is None:
        return "-"
    scale, lo_hi = run_key(r)
    return f"{scale:g}" + (f" on t in [{lo_hi[0]}, {lo_hi[1]}]" if lo_hi else "")


def alone(runs: list[dict]) -> dict | None:
    """The model alone: guidance scale 1 on every step."""
    return next((r for r in runs if run_key(r) == (1.0, ())), None)


def chosen(runs: list[dict]) -> dict | None:
    """The default rule over a point's runs: the quick preset's (pick_best with RULE's bars), over the settings
    scored in the most draws."""
    from latentdiff.evaluate.sweep import pick_best

    most = max((r.get("draws", 1) for r in runs), default=1)
    runs = [r for r in runs if r.get("draws", 1) == most]  # settings scored in every draw: compared on equal terms
    best = pick_best({"guidance": runs}, **RULE)
    return next((r for r in runs if best["setting"] is not None and r["setting"] == best["setting"]), None)


def score(args) -> None:
    out = Path(args.out)
    for point in args.points:
        def sweep(scales: list[float], interval: str, name: str) -> None:
            cmd = [sys.executable, "-m", "latentdiff.evaluate", "sweep", "--model", str(Path(args.runs) / point),
                   "--n-per-class", str(args.n_per_class), "--samplers", "--guidance", *map(str, scales),
                   "--intervals", interval, "--seed", str(args.seed), "--out", str(out / name)]
            cmd += [arg for key, bar in RULE.items() for arg in (f"--{key.replace('_', '-')}", str(bar))]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)

        draw = f"_s{args.seed}" if args.seed else ""  # another draw of the same settings: its own files
        for interval in args.intervals:
            tag = interval_tag(interval) + draw
            if not (out / f"sweep_{point}{tag}.json").exists():
                sweep(args.guidance, interval, f"sweep_{point}{tag}.json")
        # Refine the rule's pick (over every interval scored): between the largest scale of the pick's interval
        # under it and the pick, every --refine step.
        runs = merged_runs(out, point)
        pick = chosen(runs)
        if pick is None or args.refine <= 0:
            continue
        extra = refine_scales(runs, pick, args.refine, args.seed)
        if extra:
            lo_hi = run_key(pick)[1]
            interval = f"{lo_hi[0]}:{lo_hi[1]}" if lo_hi else "all"
            sweep(extra, interval, f"sweep_{point}{interval_tag(interval)}{draw}_refined.json")


def refine_scales(runs: list[dict], pick: dict, step: float, seed: int = 0) -> list[float]:
    """The scales to score between the pick and the largest scale under it in the pick's interval, every ``step``,
    that this draw (``seed``) has not scored. Scale 1 is no guidance, the same on every interval: where the pick is
    its interval's lowest scale, the refinement runs down from it towards 1 (over the model alone's run)."""
    same = [r for r in runs if run_key(r)[1] == run_key(pick)[1] and seed in as_list(r.get("seed", 0))]
    below = [r["guidance_scale"] for r in same if r["guidance_scale"] < pick["guidance_scale"]]
    if not below and any(r["guidance_scale"] == 1 and seed in as_list(r.get("seed", 0)) for r in runs):
        below = [1.0]
    if not below or step <= 0:
        return []
    lo, hi = max(below), pick["guidance_scale"]
    extra = [round(lo + step * i, 4) for i in range(1, int(round((hi - lo) / step)))]
    return [g for g in extra if g not in {r["guidance_scale"] for r in same}]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def minutes(point: str, probes: dict, loop_factor: float, overhead_s: float) -> float | None:
    """The point's budget in minutes: its LDM steps at the probed rate (a point of the same network and batch
    shares its probe) times ``loop_factor`` (a whole run's rate over the probe's: checkpoints, previews,
    the guide snapshot), plus the fixed cost (the VAE run, start-up, latents, saving)."""
    rate = probed_rate(point, probes)
    if rate is None:
        return None
    return (point_config(point).train.steps / (rate * loop_factor) + overhead_s) / 60


def calibration(res: Path, probes: dict) -> tuple[float, float]:
    """(loop factor, fixed seconds) from the points trained alone: their steps/s over the probe's, and their VAE
    run plus the LDM run's time outside optimizer steps. (1, 0) when no point was trained alone."""
    factors, fixed = [], []
    for point in POINTS:
        f = res / f"train_{point}.json"
        rate = probed_rate(point, probes)
        if f.exists() and rate:
            t = json.loads(f.read_text())
            if t.get("alone"):
                factors.append(t["steps"] / t["train_s"] / rate)
                fixed.append(t.get("vae_wall_s", 0.0) + t["wall_s"] - t["train_s"])
    return (sum(factors) / len(factors), sum(fixed) / len(fixed)) if factors else (1.0, 0.0)


def wall_minutes(train_json: Path) -> float | None:
    """A point's measured wall time (VAE run included where recorded), if it trained alone on the machine."""
    if not train_json.exists():
        return None
    t = json.loads(train_json.read_text())
    return (t["wall_s"] + t.get("vae_wall_s", 0.0)) / 60 if t.get("alone") else None


def report(args) -> None:
    res = Path(args.out)
    probes = json.loads((res / "probe.json").read_text()) if (res / "probe.json").exists() else {}
    factor, fixed = calibration(res, probes)
    if args.overhead_s is not None:
        fixed = args.overhead_s
    print(f"minutes = LDM steps / (probed steps/s x {factor:.3f}) + {fixed:.0f} s (calibrated on the points trained alone)")
    rows = []
    for point in POINTS:
        runs = merged_runs(res, point)
        if not runs:
            continue
        tr = res / f"train_{point}.json"
        rows.append({"point": point, "minutes": minutes(point, probes, factor, fixed),
                     "wall_min": wall_minutes(tr),
                     "alone": alone(runs), "chosen": chosen(runs),
                     "runs": runs})
    fmt = lambda r: ("-" if r is None else f"{r['metrics']['accuracy']:.2%} / {r['metrics']['worst_class_accuracy']:.1%} / "
                     f"{r['ratios']['fld']:.2f}x / {r['ratios']['fld_per_class']:.2f}x / {r['ratios']['recall']:.2f}x")
    print("| point | minutes | wall | model alone (g = 1) | default g | at the default: accuracy / worst class / FLD / "
          "per-class FLD / recall |\n|---|---|---|---|---|---|")
    for r in rows:
        num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 - no wall time: trained beside other work
        print(f"| {r['point']} | {num(r['minutes'])} | {num(r['wall_min'])} | "
              f"{fmt(r['alone'])} | {guidance_label(r['chosen'])} | {fmt(r['chosen'])} |")
    if args.png and rows:
        plot(rows, args.png)
    if args.json:  # the table as data: each point's minutes, its model alone and its default (pooled over draws)
        save(Path(args.json), {"minutes_rule": {"loop_factor": factor, "fixed_s": fixed}, "rule": RULE,
                               "points": {r["point"]: {k: r[k] for k in ("minutes", "wall_min", "alone", "chosen")}
                                          for r in rows}})


def plot(rows: list[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["minutes"] is not None]
    families: dict[str, list[dict]] = {}  # one line per UNet width: the points differ in steps along it
    for r in rows:
        width = "-".join(map(str, point_config(r["point"]).model.channels))
        families.setdefault(width, []).append(r)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    panels = [("accuracy (%)", lambda r: 100 * r["metrics"]["accuracy"]), ("FLD / floor", lambda r: r["ratios"]["fld"]),
              ("per-class FLD / floor", lambda r: r["ratios"]["fld_per_class"]), ("recall / floor", lambda r: r["ratios"]["recall"])]
    for ax, (name, get) in zip(axes, panels):
        for (width, fam), color in zip(families.items(), ("C0", "C1", "C2", "C3")):
            x = [r["minutes"] for r in fam]
            for key, label, style in (("chosen", "default g", "o-"), ("alone", "model alone", "s--")):
                ax.plot(x, [get(r[key]) if r[key] else float("nan") for r in fam], style, color=color,
                        label=f"UNet {width}: {label}")
        ax.set_xlabel("minutes of a 2-core CPU")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "train", "score", "report"):
        sp = sub.add_parser(name)
        sp.add_argument("--out", required=True, help="results folder (JSON per point)")
        if name != "report":
            sp.add_argument("points", nargs="+", choices=sorted(POINTS))
            sp.add_argument("--data-dir", default=os.environ.get("LATENTDIFF_DATA"))
            sp.add_argument("--threads", type=int, default=os.cpu_count() if name != "score" else None)
        if name in ("probe", "train"):
            sp.add_argument("--vae", required=True, help="the VAE run folder every point trains on")
        if name in ("train", "score"):
            sp.add_argument("--runs", required=True, help="one LDM run folder per point is made here")
    sub.choices["probe"].add_argument("--steps", type=int, default=200)
    sub.choices["probe"].add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                                      help="more overrides, e.g. 'train.mixed_precision=\"no\"' (fp32: the CPUs without bf16; YAML reads a bare no as false)")
    sub.choices["probe"].add_argument("--label", help="stored as '<point> <label>' in probe.json")
    sub.choices["train"].add_argument("--overwrite", action="store_true")
    sub.choices["train"].add_argument("--vae-wall-s", type=float,
                                      help="the VAE run's wall seconds (timed alone), recorded for the calibration")
    sub.choices["train"].add_argument("--beside-other-work", action="store_true",
                                      help="record that the machine was not idle (the wall time is then not the budget)")
    sub.choices["score"].add_argument("--guidance", type=float, nargs="+", default=GUIDANCE)
    sub.choices["score"].add_argument("--intervals", nargs="+", default=INTERVALS, metavar="SPEC",
                                      help="guidance intervals, each crossed with --guidance in its own sweep file: "
                                           "'all' (every step) or LO:HI, e.g. all 100:800")
    sub.choices["score"].add_argument("--n-per-class", type=int, default=1000)
    sub.choices["score"].add_argument("--seed", type=int, default=0,
                                      help="sample i uses seed + i; another seed scores another draw of the same "
                                           "settings (files _s<seed>), and the rule then reads the draws' mean")
    sub.choices["score"].add_argument("--refine", type=float, default=0.05,
                                      help="then score every REFINE between the rule's pick and the scale below it (0: off)")
    sub.choices["report"].add_argument("--png")
    sub.choices["report"].add_argument("--json", help="also write the table's rows here")
    sub.choices["report"].add_argument("--overhead-s", type=float,
                                       help="seconds each point spends outside LDM optimizer steps (VAE run, start-up); "
                                            "default: measured on the points trained alone")
    args = p.parse_args()
    {"probe": probe, "train": train, "score": score, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
