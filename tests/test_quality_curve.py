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
    qc.report(type("A", (), {"out": str(tmp_path), "png": None, "overhead_s": None, "json": str(tmp_path / "c.json")})())
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 10-quick")][0]
    assert line.startswith("| 10-quick | 6.0 | 6.0 |")  # 240 s + 120 s; the wall: 260 s + 100 s
    assert "| 1.4 | 99.55% / 99.0% / 1.50x / 0.60x / 0.95x" in line
    table = json.loads((tmp_path / "c.json").read_text())["points"]["10-quick"]
    assert table["chosen"]["guidance_scale"] == 1.4 and table["alone"]["guidance_scale"] == 1.0


def test_every_point_names_a_valid_override():
    for point in qc.POINTS:
        qc.point_config(point)  # raises on a bad key
    assert qc.point_config("10-quick").train.steps == 2400 and qc.point_config("40-width").model.channels == (64, 128)


def interval_run(g: float, lo_hi: list[int] | None, acc: float, worst: float, fld: float) -> dict:
    r = run(g, acc, worst, fld)
    r["guidance_interval"] = lo_hi or [0, 999]
    r["setting"] = {"guidance_scale": g, "guidance_interval": r["guidance_interval"]}
    r["unet_rows"] = 12 if lo_hi else r["unet_rows"]
    return r


def test_the_rule_ranges_over_intervals_and_the_report_names_the_interval(tmp_path, capsys):
    every = [interval_run(1.0, None, 0.98, 0.95, 0.25), interval_run(1.3, None, 0.996, 0.991, 0.36)]
    middle = [interval_run(1.5, [100, 800], 0.993, 0.99, 0.24), interval_run(2.0, [100, 800], 0.9965, 0.994, 0.27)]
    (tmp_path / "sweep_hour.json").write_text(json.dumps({"guidance": every}))
    (tmp_path / "sweep_hour_t100-800.json").write_text(json.dumps({"guidance": middle}))
    # another point whose name extends this one's is not this point's
    (tmp_path / "sweep_hourly.json").write_text(json.dumps({"guidance": [interval_run(3.0, None, 1, 1, 0.01)]}))
    runs = qc.merged_runs(tmp_path, "hour")
    assert [qc.run_key(r) for r in runs] == [(1.0, ()), (1.3, ()), (1.5, (100, 800)), (2.0, (100, 800))]
    assert qc.alone(runs)["metrics"]["fld"] == 0.25  # g = 1 on every step, not on the interval
    pick = qc.chosen(runs)
    assert qc.run_key(pick) == (2.0, (100, 800)) and qc.guidance_label(pick) == "2 on t in [100, 800]"
    assert qc.interval_tag("all") == "" and qc.interval_tag("100:800") == "_t100-800"
    (tmp_path / "probe.json").write_text(json.dumps({"10-quick": {"steps_per_s": 10.0}}))
    qc.report(type("A", (), {"out": str(tmp_path), "png": None, "overhead_s": 0.0, "json": None})())
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| hour")][0]
    steps = qc.point_config("hour").train.steps
    assert line.startswith(f"| hour | {steps / 10 / 60:.1f} |") and "| 2 on t in [100, 800] | 99.65%" in line


def test_the_hour_point_is_the_hour_preset_on_the_quick_vae():
    from latentdiff.cli import resolve_config_path
    from latentdiff.config import VAERunConfig, load_config

    hour, quick = qc.point_config("hour"), qc.point_config("10-quick")
    assert hour.model == quick.model and hour.diffusion == quick.diffusion  # the quick UNet, trained longer
    assert hour.train.steps > 5 * quick.train.steps
    vae = [load_config(VAERunConfig, resolve_config_path(p, "vae")) for p in ("hour", "quick")]
    assert vae[0] == vae[1]


def test_draws_of_one_setting_pool_and_the_rule_reads_the_settings_scored_in_every_draw(tmp_path):
    a = interval_run(1.8, [100, 800], 0.9963, 0.992, 0.22)
    b = {**interval_run(1.8, [100, 800], 0.9942, 0.988, 0.23), "seed": 10000}
    for r, acc in ((a, [0.99] + [0.997] * 9), (b, [0.996] * 9 + [0.988])):
        r["metrics"]["per_class_accuracy"] = acc
        r["metrics"].update(n=10000, precision=0.86, recall=0.86)
    single = interval_run(1.6, [100, 800], 0.999, 0.999, 0.1)  # one draw only: not compared with the pooled
    (tmp_path / "sweep_hour_t100-800.json").write_text(json.dumps({"guidance": [a, single]}))
    (tmp_path / "sweep_hour_t100-800_s10000.json").write_text(json.dumps({"guidance": [b]}))
    runs = qc.merged_runs(tmp_path, "hour")
    both = next(r for r in runs if r["guidance_scale"] == 1.8)
    assert both["draws"] == 2 and both["seed"] == [0, 10000] and both["metrics"]["n"] == 20000
    assert abs(both["metrics"]["accuracy"] - 0.99525) < 1e-9 and abs(both["ratios"]["fld"] - 1.125) < 1e-9
    assert abs(both["metrics"]["worst_class_accuracy"] - 0.9925) < 1e-9 and both["metrics"]["worst_class"] == 9
    assert qc.chosen(runs)["guidance_scale"] == 1.8


def test_the_hour_preset_samples_with_the_rules_pick_of_its_measured_sweeps():
    from latentdiff.cli import resolve_config_path
    from latentdiff.config import LDMRunConfig, load_config

    results = qc.ROOT / "bench" / "results" / "cpu" / "issue36"
    pick = qc.chosen(qc.merged_runs(results, "hour"))
    sample = load_config(LDMRunConfig, resolve_config_path("hour", "ldm")).sample
    assert pick["draws"] == 2
    assert (sample.guidance_scale, sample.guidance_interval) == (pick["guidance_scale"], tuple(pick["guidance_interval"]))
    assert (sample.sampler, sample.steps, sample.spacing) == (pick["sampler"], pick["steps"], pick["spacing"])


def test_refinement_runs_between_the_pick_and_the_scale_under_it_or_down_to_no_guidance():
    every = [run(1.0, 0.96, 0.93, 0.8), run(1.3, 0.991, 0.98, 0.24), run(1.45, 0.996, 0.991, 0.36)]
    assert qc.refine_scales(every, every[2], 0.05) == [1.35, 1.4]
    assert qc.refine_scales(every, every[2], 0) == []
    mid = [interval_run(1.5, [100, 800], 0.996, 0.991, 0.25), interval_run(1.8, [100, 800], 0.998, 0.995, 0.3)]
    # 1.5 is the interval's lowest scale: scale 1 (no guidance, the same on any interval) is the floor of the range
    assert qc.refine_scales(every + mid, mid[0], 0.1) == [1.1, 1.2, 1.3, 1.4]
    assert qc.refine_scales(mid, mid[0], 0.1) == []  # without the model alone's run: nothing to refine towards
    assert qc.refine_scales(every + mid, mid[1], 0.1) == [1.6, 1.7]
