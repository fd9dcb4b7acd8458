"""Sweeps over guidance scales x guidance intervals and sampler x steps, and the rule that picks the defaults."""

from __future__ import annotations

import sys
from typing import Sequence

from ..sampling import interval_label
from .classifier import Classifier
from .metrics import Reference
from .score import evaluate_ldm, run_settings


def parse_sampler(spec: str) -> tuple[str, int]:
    """'dpm++:20' -> ('dpm++', 20)."""
    from ..sampling import SAMPLERS

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
              guidance_interval: Sequence[int] | None = None, spacing: str | None = None) -> dict:
    """Guidance scales x intervals at the model's default sampler, then sampler x steps at one scale.

    ``intervals``: the guidance intervals swept (None: ``guidance_interval``). ``guidance_interval``: the
    interval of the sampler sweep (None: the model's). ``spacing``: for every run (None: the model's).
    """
    base = run_settings(pipe, sampler_guidance, guidance_interval=guidance_interval, spacing=spacing)
    intervals = [base["guidance_interval"] if iv is None else list(iv) for iv in intervals]
    T = pipe.config.diffusion.num_timesteps
    out: dict = {"default_sampler": f"{base['sampler']}:{base['steps']}", "sampler_guidance": base["guidance_scale"],
                 "sampler_interval": base["guidance_interval"], "intervals": intervals, "spacing": base["spacing"],
                 "num_timesteps": T, "guidance": [], "sampler": []}
    points = [("guidance", g, base["sampler"], base["steps"], iv) for iv in intervals for g in guidances]
    points += [("sampler", base["guidance_scale"], name, steps, base["guidance_interval"]) for name, steps in samplers]
    for part, g, name, steps, iv in points:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, g, name, steps, seed, batch_size, progress,
                         guidance_interval=iv, spacing=base["spacing"])
        r.pop("images")
        out[part].append(r)
        print(summary_line(r, T), file=sys.stderr)
    return out


def setting_name(r: dict, num_timesteps: int | None = None) -> str:
    """'g=2 dpm++:20 t in [100, 800]' (no interval for runs from sweeps before intervals)."""
    name = f"g={r['guidance_scale']:g} {r['sampler']}:{r['steps']}"
    name += f" {interval_label(r['guidance_interval'], num_timesteps)}" if "guidance_interval" in r else ""
    return name + (f" autoguidance w={r['autoguidance_scale']:g}" if r.get("autoguidance_scale", 1.0) != 1.0 else "")


def summary_line(r: dict, num_timesteps: int | None = None) -> str:
    """One line per sweep point, printed as the sweep goes."""
    m = r["metrics"]
    return (f"{setting_name(r, num_timesteps)}  acc {m['accuracy']:.2%} (worst {m['worst_class_accuracy']:.2%})"
            f"  FLD {m['fld']:.3f} (N={m['n']})  class-FLD {m['fld_per_class_mean']:.3f}  P {m['precision']:.3f}"
            f"  R {m['recall']:.3f}  [{r['generate_s']:.0f} s]")
