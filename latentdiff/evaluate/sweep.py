"""Sweeps over guidance scales and sampler x steps, and the rule that picks the default settings."""

from __future__ import annotations

import sys
from typing import Sequence

from .classifier import Classifier
from .metrics import Reference
from .score import evaluate_ldm


def parse_sampler(spec: str) -> tuple[str, int]:
    """'dpm++:20' -> ('dpm++', 20)."""
    from ..sampling import SAMPLERS

    name, _, steps = spec.rpartition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler spec {spec!r} must look like NAME:STEPS with NAME in {sorted(SAMPLERS)}, e.g. dpm++:20")
    return name, int(steps)


def choose_default(sweep: dict, min_accuracy: float = 0.98, fld_tolerance: float = 0.05, max_steps: int = 50) -> dict:
    """Pick default sampling settings from a sweep's results.

    Guidance: lowest FLD among scales whose accuracy >= min_accuracy (accuracy alone would pick the
    largest scale, which trades diversity for legibility); if none qualifies, the most accurate one.
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
              progress: bool = True) -> dict:
    """Guidance sweep at the model's default sampler, then sampler x steps sweep at one guidance scale."""
    sc = pipe.config.sample
    g0 = sc.guidance_scale if sampler_guidance is None else sampler_guidance
    out: dict = {"default_sampler": f"{sc.sampler}:{sc.steps}", "sampler_guidance": g0, "guidance": [], "sampler": []}
    for g in guidances:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, g, sc.sampler, sc.steps, seed, batch_size, progress)
        r.pop("images")
        out["guidance"].append(r)
        print(summary_line(r), file=sys.stderr)
    for name, steps in samplers:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, g0, name, steps, seed, batch_size, progress)
        r.pop("images")
        out["sampler"].append(r)
        print(summary_line(r), file=sys.stderr)
    return out


def summary_line(r: dict) -> str:
    """One line per sweep point, printed as the sweep goes."""
    m = r["metrics"]
    return (f"g={r['guidance_scale']:g} {r['sampler']}:{r['steps']}  acc {m['accuracy']:.2%} (worst {m['worst_class_accuracy']:.2%})"
            f"  FLD {m['fld']:.3f} (N={m['n']})  class-FLD {m['fld_per_class_mean']:.3f}  P {m['precision']:.3f}"
            f"  R {m['recall']:.3f}  [{r['generate_s']:.0f} s]")

