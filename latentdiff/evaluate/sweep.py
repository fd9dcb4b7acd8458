"""The one sweep driver: guidance scales x intervals x any generate() keyword, sampler x steps, explicit settings.

A sweep has up to three parts, each a list of scored runs: "guidance" (every scale at every interval and
every combination of the ``vary`` keywords), "sampler" (sampler x steps at one scale) and "settings"
(explicit ``generate()`` keyword dicts). ``fixed`` keywords apply to every run. Keywords are checked
against ``LatentDiffusion.generate``'s signature, so a new generate option sweeps without changes here.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import sys
from typing import Any, Sequence

from ..sampling import SAMPLERS, interval_label
from .classifier import Classifier
from .metrics import Reference
from .score import evaluate_ldm, run_settings


def parse_sampler(spec: str) -> tuple[str, int]:
    """'dpm++:20' -> ('dpm++', 20)."""
    name, _, steps = spec.rpartition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler spec {spec!r} must look like NAME:STEPS with NAME in {sorted(SAMPLERS)}, e.g. dpm++:20")
    return name, int(steps)


def parse_interval(spec: str, num_timesteps: int) -> tuple[int, int]:
    """'all' -> (0, T-1), guidance at every step; '100:800' or '100 800' -> (100, 800), checked against 0..T-1."""
    parts = spec.replace(":", " ").split()
    if parts == ["all"]:
        return 0, num_timesteps - 1
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"guidance interval {spec!r} must be 'all' (every step) or LO:HI timesteps with "
                         f"0 <= LO <= HI <= {num_timesteps - 1}, e.g. 100:800")
    lo, hi = int(parts[0]), int(parts[1])
    if not lo <= hi < num_timesteps:
        raise ValueError(f"guidance interval {spec!r} needs 0 <= LO <= HI <= {num_timesteps - 1} (timesteps of the "
                         f"schedule; {num_timesteps - 1} is pure noise), e.g. 100:800")
    return lo, hi


# generate() keywords a sweep sets itself (class-balanced labels, seed + i, batching), and the ones with their own options.
NOT_SWEPT = ("labels", "seed", "generator", "batch_size", "progress")
OWN_OPTIONS = {"guidance_scale": "--guidance", "guidance_interval": "--intervals (or --guidance-interval)"}


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (2, 0.5, [100, 800], null, true), else the plain string (logsnr)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(spec: str) -> tuple[str, Any]:
    """'eta=0.5' -> ('eta', 0.5); 'spacing=logsnr' -> ('spacing', 'logsnr')."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {spec!r} must look like KEY=VALUE with KEY a generate() keyword, e.g. eta=0.5")
    return key.strip(), parse_value(value)


def parse_setting(spec: str) -> dict:
    """A JSON object of generate() keywords, e.g. '{"guidance_scale": 2, "guidance_interval": [100, 800]}'."""
    try:
        setting = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings {spec!r} is not JSON ({e.msg}); pass an object like "
                         '\'{"guidance_scale": 2, "steps": 10}\'') from e
    if not isinstance(setting, dict):
        raise ValueError(f"--settings {spec!r} must be a JSON object of generate() keywords, e.g. '{{\"steps\": 10}}'")
    return setting


def check_generate_keys(pipe, keys, option: str, allow_own: bool = False) -> None:
    """ValueError unless every key is a keyword of ``pipe.generate`` that a sweep may set."""
    params = inspect.signature(pipe.generate).parameters
    named = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in NOT_SWEPT]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for key in keys:
        if key in NOT_SWEPT:
            raise ValueError(f"{option} cannot set {key!r}: the sweep sets it (class-balanced labels, sample i uses "
                             f"--seed + i, --batch-size)")
        if key in OWN_OPTIONS and not allow_own:
            raise ValueError(f"{option} cannot set {key!r}; use {OWN_OPTIONS[key]}, or --settings for single points")
        if key not in named and not takes_any:
            raise ValueError(f"{option}: {key!r} is not a generate() keyword; choose from {sorted(named)}")


def resolve_interval(value, num_timesteps: int):
    """A guidance interval as a setting may give it: 'all', '100:800', [100, 800] or None (the model's)."""
    return parse_interval(value, num_timesteps) if isinstance(value, str) else value


def sweep_options(pipe, sets: Sequence[str] | None, varies: Sequence[Sequence[str]] | None,
                  settings: Sequence[str] | None, spacing: str | None = None) -> tuple[dict, dict, list[dict]]:
    """``--set``, ``--vary`` and ``--settings`` as (fixed, vary, settings), checked before any work is done."""
    T = pipe.config.diffusion.num_timesteps
    fixed = dict(parse_assignment(a) for a in sets or [])
    vary = {key: [parse_value(v) for v in values] for key, *values in varies or []}
    for key, values in vary.items():
        if not values:
            raise ValueError(f"--vary {key} needs at least one value, e.g. --vary {key} A B")
    settings = [parse_setting(s) for s in settings or []]
    check_generate_keys(pipe, [*fixed, *vary], "--set / --vary")
    for setting in settings:
        check_generate_keys(pipe, setting, "--settings", allow_own=True)
    # The keywords the pipeline knows are checked now (by pipe.settings), not after the first runs.
    for c in [{**fixed, **s} for s in settings] + [{**fixed, k: v} for k, vs in vary.items() for v in vs] + [fixed]:
        pipe.settings(guidance_scale=c.get("guidance_scale"), steps=c.get("steps"), sampler=c.get("sampler"),
                      eta=c.get("eta"), guidance_interval=resolve_interval(c.get("guidance_interval"), T),
                      spacing=c.get("spacing", spacing))
    return fixed, vary, settings


def choose_default(sweep: dict, min_accuracy: float = 0.98, fld_tolerance: float = 0.05, max_steps: int = 50) -> dict:
    """Pick default sampling settings from a sweep's results.

    Guidance: lowest FLD among (scale, interval) runs whose accuracy >= min_accuracy (accuracy alone would
    pick the largest scale, which trades diversity for legibility); if none qualifies, the most accurate one.
    Sampler: among qualifying runs with at most ``max_steps`` steps (ddpm:1000 is a reference, too slow
    for a default), the fewest steps whose FLD is within ``fld_tolerance`` (relative) of their best.
    """
    def pick_guidance(runs: list[dict]) -> tuple[dict | None, str]:
        ok = [r for r in runs if r["metrics"]["accuracy"] >= min_accuracy]
        if ok:
            return min(ok, key=lambda r: r["metrics"]["fld"]), f"lowest FLD with accuracy >= {min_accuracy:.1%}"
        if runs:
            return max(runs, key=lambda r: r["metrics"]["accuracy"]), f"no scale reached {min_accuracy:.1%}: most accurate"
        return None, "no guidance runs"

    out: dict = {"min_accuracy": min_accuracy}
    best_g, out["guidance_reason"] = pick_guidance(sweep.get("guidance", []))
    if best_g is not None:
        out["guidance_scale"] = best_g["guidance_scale"]
        if "guidance_interval" in best_g:  # sweeps from before intervals have none
            out["guidance_interval"] = best_g["guidance_interval"]
    runs = [r for r in sweep.get("sampler", []) if r["steps"] <= max_steps]
    runs = [r for r in runs if r["metrics"]["accuracy"] >= min_accuracy] or runs
    if runs:
        best = min(r["metrics"]["fld"] for r in runs)
        near = [r for r in runs if r["metrics"]["fld"] <= best * (1 + fld_tolerance)]
        pick = min(near, key=lambda r: (r["steps"], r["metrics"]["fld"]))
        out.update(sampler=pick["sampler"], steps=pick["steps"],
                   sampler_reason=f"fewest steps (<= {max_steps}) with FLD within {fld_tolerance:.0%} of their best ({best:.3g})")
    return out


def run_sweep(pipe, clf: Classifier, ref: Reference, guidances: Sequence[float], samplers: Sequence[tuple[str, int]],
              n_per_class: int, seed: int = 0, batch_size: int = 500, sampler_guidance: float | None = None,
              progress: bool = True, *, intervals: Sequence[Sequence[int] | None] = (None,),
              guidance_interval: Sequence[int] | None = None, spacing: str | None = None,
              fixed: dict | None = None, vary: dict[str, list] | None = None, settings: Sequence[dict] = (),
              floor: dict | None = None) -> dict:
    """Guidance scales x intervals x ``vary`` combinations, sampler x steps at one scale, then ``settings``.

    ``intervals``: the guidance intervals swept (None: ``guidance_interval``). ``guidance_interval``: the
    interval of the sampler sweep (None: the model's). ``spacing``: for every run (None: the model's).
    ``fixed``: generate() keywords for every run (``sampler``/``steps``/``spacing`` there also set the
    guidance part's). ``vary``: keyword -> values, crossed with each other and with the guidance grid.
    ``settings``: explicit generate() keyword dicts ({} = the model's defaults), with ``fixed`` under them.
    ``floor``: the real-data metrics; with it each run also gets ``ratios`` to the floor.
    """
    fixed, vary = dict(fixed or {}), dict(vary or {})
    check_generate_keys(pipe, [*fixed, *vary], "fixed / vary")
    for setting in settings:
        check_generate_keys(pipe, setting, "settings", allow_own=True)
    T = pipe.config.diffusion.num_timesteps
    spacing = fixed.get("spacing", spacing)
    base = run_settings(pipe, sampler_guidance, fixed.get("sampler"), fixed.get("steps"),
                        guidance_interval=guidance_interval, spacing=spacing, eta=fixed.get("eta"))
    rest = {k: v for k, v in fixed.items() if k not in ("sampler", "steps", "spacing")}  # base holds those
    intervals = [base["guidance_interval"] if iv is None else list(iv) for iv in intervals]
    out: dict = {"default_sampler": f"{base['sampler']}:{base['steps']}", "sampler_guidance": base["guidance_scale"],
                 "sampler_interval": base["guidance_interval"], "intervals": intervals, "spacing": base["spacing"],
                 "num_timesteps": T, "fixed": fixed, "vary": vary, "guidance": [], "sampler": [], "settings": []}
    # (part, label, keyword arguments of evaluate_ldm); a label names what a run varies beyond scale and interval.
    points: list[tuple[str, str | None, dict]] = []
    for combo in (dict(zip(vary, values)) for values in itertools.product(*vary.values())):
        label = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in combo.items()) or None
        for iv in intervals:
            points += [("guidance", label, {"guidance": g, "sampler": base["sampler"], "steps": base["steps"],
                                            "spacing": base["spacing"], "guidance_interval": iv, **rest, **combo})
                       for g in guidances]
    points += [("sampler", None, {"guidance": base["guidance_scale"], "spacing": base["spacing"],
                                  "guidance_interval": base["guidance_interval"], **rest, "sampler": name, "steps": steps})
               for name, steps in samplers]
    for setting in settings:
        kw = {"spacing": spacing, **fixed, **setting}
        kw["guidance"] = kw.pop("guidance_scale", None)
        kw["guidance_interval"] = resolve_interval(kw.get("guidance_interval"), T)
        points.append(("settings", json.dumps(setting), kw))
    for part, label, kw in points:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, seed=seed, batch_size=batch_size, progress=progress, **kw)
        r.pop("images")
        if label:
            r["label"] = label
        if floor:
            m = r["metrics"]
            r["ratios"] = {"fld": m["fld"] / floor["fld"], "fld_per_class": m["fld_per_class_mean"] / floor["fld_per_class_mean"],
                           "recall": m["recall"] / floor["recall"]}
        out[part].append(r)
        print(summary_line(r, T), file=sys.stderr)
    return out


def pick_best(sweep: dict, min_accuracy: float = 0.98, min_worst_class: float = 0.0, min_recall_ratio: float = 0.0,
              max_unet_rows: float = math.inf) -> dict:
    """The lowest-FLD run of any part that meets every bar: accuracy, worst class, recall / floor, UNet rows per digit.

    Returns {"setting": generate() keywords or None, "metrics", "rule"}; ``min_recall_ratio`` needs runs
    with ``ratios`` (a sweep given its floor). Runs from older sweeps (no ``setting``) are skipped.
    """
    rule = (f"lowest FLD with accuracy >= {min_accuracy:.2%}, worst class >= {min_worst_class:.2%}, "
            f"recall >= {min_recall_ratio:g}x floor, UNet rows <= {max_unet_rows:g}")
    runs = [r for part in ("guidance", "sampler", "settings") for r in sweep.get(part, []) if "setting" in r]
    ok = [r for r in runs if r["metrics"]["accuracy"] >= min_accuracy
          and r["metrics"]["worst_class_accuracy"] >= min_worst_class and r["unet_rows"] <= max_unet_rows
          and (min_recall_ratio <= 0 or r.get("ratios", {}).get("recall", 0.0) >= min_recall_ratio)]
    if not ok:
        return {"setting": None, "metrics": None, "rule": rule}
    best = min(ok, key=lambda r: r["metrics"]["fld"])
    return {"setting": best["setting"], "metrics": best["metrics"], "unet_rows": best["unet_rows"], "rule": rule}


def setting_name(r: dict, num_timesteps: int | None = None) -> str:
    """'g=2 dpm++:20 t in [100, 800]' (no interval for runs from sweeps before intervals), plus the run's label."""
    name = f"g={r['guidance_scale']:g} {r['sampler']}:{r['steps']}"
    name += f" {interval_label(r['guidance_interval'], num_timesteps)}" if "guidance_interval" in r else ""
    name += f" autoguidance w={r['autoguidance_scale']:g}" if r.get("autoguidance_scale", 1.0) != 1.0 else ""
    return name + (f" [{r['label']}]" if r.get("label") else "")


def summary_line(r: dict, num_timesteps: int | None = None) -> str:
    """One line per sweep point, printed as the sweep goes."""
    m = r["metrics"]
    return (f"{setting_name(r, num_timesteps)}  acc {m['accuracy']:.2%} (worst {m['worst_class_accuracy']:.2%})"
            f"  FLD {m['fld']:.3f} (N={m['n']})  class-FLD {m['fld_per_class_mean']:.3f}  P {m['precision']:.3f}"
            f"  R {m['recall']:.3f}  [{r['generate_s']:.0f} s]")


def sweep_table(sweep: dict, floor: dict, num_timesteps: int | None = None) -> str:
    """Every run of a sweep as a text table, cost and floor ratios included, the real floor last."""
    def pct(v: float) -> str:
        return f"{v:.2%}"

    header = ("setting", "rows", "acc", "worst", "FLD", "FLD x", "class-FLD", "precision", "recall", "R x", "gen s")
    table = [(setting_name(r, num_timesteps), str(r["unet_rows"]), pct(m["accuracy"]), pct(m["worst_class_accuracy"]),
              f"{m['fld']:.3f}", f"{r['ratios']['fld']:.2f}", f"{m['fld_per_class_mean']:.3f}", f"{m['precision']:.3f}",
              f"{m['recall']:.3f}", f"{r['ratios']['recall']:.2f}", f"{r['generate_s']:.0f}")
             for part in ("guidance", "sampler", "settings") for r in sweep.get(part, []) for m in [r["metrics"]]]
    table.append(("real floor", "", pct(floor["accuracy"]), pct(floor["worst_class_accuracy"]), f"{floor['fld']:.3f}",
                  "1.00", f"{floor['fld_per_class_mean']:.3f}", f"{floor['precision']:.3f}", f"{floor['recall']:.3f}", "1.00", ""))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, tuple("-" * w for w in widths), *table])
