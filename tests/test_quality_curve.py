"""bench/quality_curve.py's bookkeeping: sweep files merged per point, the default rule, minutes from the probe."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import quality_curve as qc  # noqa: E402


def run(g: float, acc: float, worst: float, fld: float, recall: float = 0.95) -> dict:
    return {"guidance_scale": g, "setting": {"guidance_scale": g}, "unet_rows": 20 if g != 1 else 10,
            "metrics": {"accuracy": acc, "worst_class_accuracy": worst, "fld": fld, "fld_per_class_mean": 2 * fld},
            "ratios": {"fld": fld / 0.2, "fld_per_class": fld / 0.5, "recall": recall}}


def test_refinements_merge_and_the_rule_picks_the_lowest_fld_over_the_bars(tmp_path, capsys):
    first = [run(1.0, 0.96, 0.93, 0.8), run(1.3, 0.991, 0.98, 0.24), run(1.45, 0.996, 0.991, 0.36)]
    (tmp_path / "sweep_10-quick.json").write_text(json.dumps({"guidance": first}))
    runs = qc.merged_runs(tmp_path, "10-quick")
    assert [r["guidance_scale"] for r in runs] == [1.0, 1.3, 1.45] and qc.chosen(runs)["guidance_scale"] == 1.45
    refined = [run(1.4, 0.9955, 0.990, 0.30), run(1.35, 0.995, 0.989, 0.27),  # 1.35 misses the worst-class bar
               run(1.3, 0.5, 0.5, 9.9)]  # a scale already scored keeps its first result
    (tmp_path / "sweep_10-quick_refined.json").write_text(json.dumps({"guidance": refined}))
    runs = qc.merged_runs(tmp_path, "10-quick")
    assert [r["guidance_scale"] for r in runs] == [1.0, 1.3, 1.35, 1.4, 1.45]
    assert runs[1]["metrics"]["accuracy"] == 0.991 and qc.chosen(runs)["guidance_scale"] == 1.4
    low_recall = [run(1.4, 0.999, 0.995, 0.1, recall=0.85)]  # under recall 0.9x the floor: not a default
    assert qc.chosen(low_recall) is None

    (tmp_path / "probe.json").write_text(json.dumps({"10-quick": {"steps_per_s": 12.0}}))
    # trained alone: 2,400 steps in 240 s of steps (10/s: 0.833 of the probe's 12/s), 100 s of VAE, 20 s of start-up
    (tmp_path / "train_10-quick.json").write_text(json.dumps({"wall_s": 260.0, "vae_wall_s": 100.0, "train_s": 240.0,
                                                             "steps": 2400, "alone": True}))
    qc.report(type("A", (), {"out": str(tmp_path), "png": None, "overhead_s": None})())
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 10-quick")][0]
    assert line.startswith("| 10-quick | 6.0 | 6.0 |")  # 240 s + 120 s; the wall: 260 s + 100 s
    assert "| 1.4 | 99.55% / 99.0% / 1.50x / 0.60x / 0.95x" in line


def test_every_point_names_a_valid_override():
    for point in qc.POINTS:
        qc.point_config(point)  # raises on a bad key
    assert qc.point_config("10-quick").train.steps == 2400 and qc.point_config("40-width").model.channels == (64, 128)
