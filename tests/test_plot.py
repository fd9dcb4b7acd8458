"""Figures: PNGs written, axes in real units (accuracy in %, steps as counts), floors drawn, legends off the data."""

import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from PIL import Image

from latentdiff.evaluate import main
from latentdiff.plot import PercentTicks, guidance_axis, loss_plot, steps_axis, sweep_plot


def _run(g, sampler, steps, acc, fld, recall=0.8):
    return {"guidance_scale": g, "sampler": sampler, "steps": steps, "generate_s": 1.0,
            "metrics": {"accuracy": acc, "worst_class_accuracy": acc - 0.002, "fld": fld, "fld_per_class_mean": 2 * fld,
                        "precision": 0.9, "recall": recall, "n": 5000, "k": 3}}


# Accuracies within 0.2 points of each other: the old PIL plot labelled every such tick "1".
SWEEP = {"default_sampler": "dpm++:20", "sampler_guidance": 2.0,
         "guidance": [_run(g, "dpm++", 20, a, f, r) for g, a, f, r in
                      [(1, 0.9984, 0.24, 0.88), (1.5, 0.9996, 0.72, 0.81), (2, 0.9998, 1.35, 0.74), (6, 0.9998, 2.7, 0.39)]],
         "sampler": [_run(2, "dpm++", n, 0.9996, 6 / n) for n in (5, 10, 20)] + [_run(2, "ddim", 50, 0.9994, 0.14),
                                                                                 _run(2, "ddpm", 1000, 0.9996, 0.85)]}
FLOOR = {"accuracy": 0.9956, "worst_class_accuracy": 0.9888, "fld": 0.22, "fld_per_class_mean": 0.47,
         "precision": 0.87, "recall": 0.89}


def _drawn(fig: Figure) -> dict:
    fig.canvas.draw()  # tick labels are filled in at draw time
    return {ax.get_title(): ax for ax in fig.axes}


def _labels(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if lo <= v <= hi]


def test_sweep_figure_png_and_panels(tmp_path):
    fig = sweep_plot(SWEEP, FLOOR, tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == (1650, 1045)
    assert list(_drawn(fig)) == ["accuracy vs guidance", "FLD vs guidance (lower is better)",
                                 "mean per-class FLD vs guidance (lower is better)", "precision and recall vs guidance",
                                 "FLD vs steps", "accuracy vs steps"]


def test_accuracy_axis_reads_in_distinct_percentages():
    axes = _drawn(sweep_plot(SWEEP, FLOOR))
    for title in ("accuracy vs guidance", "accuracy vs steps"):
        ax = axes[title]
        labels = _labels(ax.yaxis)
        assert len(labels) >= 3 and len(set(labels)) == len(labels), labels  # never "1, 1, 1"
        assert all(re.fullmatch(r"\d{2,3}(\.\d{1,2})?%", t) for t in labels), labels
        for text, value in zip(labels, [v for v in ax.get_yticks() if ax.get_ylim()[0] <= v <= ax.get_ylim()[1]]):
            assert float(text[:-1]) == pytest.approx(value * 100, abs=1e-9)  # the label is the tick's exact value
        assert ax.get_ylim()[1] <= 1.001 and ax.get_ylabel() == "accuracy (%)"  # no room above 100%


def test_steps_axis_shows_step_counts_on_a_log_scale():
    ax = _drawn(sweep_plot(SWEEP, FLOOR))["FLD vs steps"]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "sampler steps (log scale)"
    assert list(ax.get_xticks()) == [5, 10, 20, 50, 1000]
    assert _labels(ax.xaxis) == ["5", "10", "20", "50", "1000"]  # counts, not log2 values like 2.322


def test_crowded_ticks_keep_the_rounder_label():
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    ax.plot([10, 15, 20, 1000], [1, 2, 3, 4])
    steps_axis(ax, [10, 15, 20, 1000])
    fig.canvas.draw()
    assert _labels(ax.xaxis) == ["10", "", "20", "1000"]  # 15 keeps its tick, loses its label to 20
    ax = fig.add_subplot(212)
    scales = [1, 1.1, 1.2, 1.3, 1.5, 2, 3, 4, 6]
    ax.plot(scales, scales)
    guidance_axis(ax, scales)
    fig.canvas.draw()
    assert _labels(ax.xaxis) == ["1", "", "", "", "1.5", "2", "3", "4", "6"]


def test_fld_axis_is_log_with_plain_numbers_and_floor_line():
    ax = _drawn(sweep_plot(SWEEP, FLOOR))["FLD vs guidance (lower is better)"]
    assert ax.get_yscale() == "log"  # 0.22 .. 2.7 spans more than 5x
    labels = [t for t in _labels(ax.yaxis) if t]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in labels), labels  # no 10^x mathtext
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in dashed] == [FLOOR["fld"]]


def test_legends_sit_outside_the_data_area():
    fig = sweep_plot(SWEEP, FLOOR)
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None and legend.get_window_extent().y1 <= ax.get_window_extent().y0


def test_percent_ticks_use_the_decimals_the_spacing_needs():
    fmt = PercentTicks()
    fmt.set_locs([0.99, 0.995, 1.0])
    assert [fmt(v) for v in (0.99, 0.995, 1.0)] == ["99.0%", "99.5%", "100.0%"]
    fmt.set_locs([0.9992, 0.9994, 0.9996])
    assert fmt(0.9994) == "99.94%"
    fmt.set_locs([0.9, 0.95, 1.0])
    assert fmt(0.95) == "95%"


def test_loss_plot(tmp_path):
    fig = loss_plot([1000, 2000, 3000, 4000], [0.66, 0.32, 0.28, 0.27], tmp_path / "loss.png", title="training loss (ldm)")
    assert Image.open(tmp_path / "loss.png").size == (770, 462)
    ax = _drawn(fig)["training loss (ldm)"]
    assert ax.get_xlabel() == "optimizer step" and ax.get_yscale() == "linear"
    assert {"1,000", "4,000"} <= set(_labels(ax.xaxis))  # step counts, thousands separated
    big = loss_plot([1, 2, 3], [1.0, 0.1, 0.01])
    assert big.axes[0].get_yscale() == "log" and "log scale" in big.axes[0].get_ylabel()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_plot_redraws_a_sweep_json_and_a_metrics_jsonl(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({**SWEEP, "floor": FLOOR}))
    main(["plot", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "s.png")])
    assert Image.open(tmp_path / "s.png").size == (1650, 1045)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (10, 20, 30)))
    main(["plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("content, name, words", [
    (None, "nope.json", "not found"),
    ("{not json", "bad.json", "is not valid JSON"),
    ('{"metrics": {}}', "ldm.json", "is not a sweep result"),
    ('{"x": 1}\n', "metrics.jsonl", "no records with 'step' and 'loss'"),
])
def test_cli_plot_bad_inputs(tmp_path, content, name, words):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(words)):
        main(["plot", str(tmp_path / name), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ guidance intervals
def _iv(g, interval, acc, fld):
    return {**_run(g, "dpm++", 20, acc, fld), "guidance_interval": interval, "spacing": "logsnr"}


INTERVAL_SWEEP = {**SWEEP, "num_timesteps": 1000, "spacing": "logsnr", "sampler_interval": [0, 999],
                  "guidance": [_iv(g, iv, 0.99 + g / 1000, f + g / 10) for iv, f in (([0, 999], 1.0), ([100, 800], 0.5),
                                                                                      ([200, 850], 0.3))
                               for g in (1, 2, 3)]}


def test_one_line_per_interval_on_each_guidance_panel():
    fig = sweep_plot(INTERVAL_SWEEP, FLOOR)
    axes = _drawn(fig)
    names = ["every step", "t in [100, 800]", "t in [200, 850]"]
    solid = lambda ax: [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    for title in ("FLD vs guidance (lower is better)", "mean per-class FLD vs guidance (lower is better)"):
        assert [ln.get_label() for ln in solid(axes[title])] == names
    assert [ln.get_label() for ln in solid(axes["accuracy vs guidance"])] == [f"accuracy, {n}" for n in names]
    assert [ln.get_label() for ln in solid(axes["precision and recall vs guidance"])] == [f"precision, {n}" for n in names]
    fld = solid(axes["FLD vs guidance (lower is better)"])
    assert [list(ln.get_ydata()) for ln in fld][1] == pytest.approx([0.6, 0.7, 0.8])  # each line holds its own runs
    assert len({ln.get_color() for ln in fld}) == 3
    for ax in fig.axes:  # legends stay below the panels
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    assert "logsnr spacing" in fig._suptitle.get_text() and "every step" in fig._suptitle.get_text()


def test_old_sweep_json_without_intervals_still_plots(tmp_path):
    """A sweep from before guidance intervals (the first H100 session's, kept as a fixture): same panels,
    one line per metric."""
    old = Path(__file__).parent / "data" / "sweep_before_intervals.json"
    assert "guidance_interval" not in json.loads(old.read_text())["guidance"][0]
    main(["plot", str(old), "--out", str(tmp_path / "old.png")])
    assert Image.open(tmp_path / "old.png").size == (1650, 1045)
    ax = _drawn(sweep_plot(json.loads(old.read_text()), FLOOR))["FLD vs guidance (lower is better)"]
    assert [ln.get_label() for ln in ax.get_lines() if ln.get_linestyle() == "-"] == ["FLD"]


# ------------------------------------------------------------------------------------------ --settings sweeps
def _setting(g, sampler="dpm++", interval=(0, 999)):
    setting = {"guidance_scale": g, "sampler": sampler, "steps": 10, "guidance_interval": list(interval)}
    return {**_iv(g, list(interval), 0.99 + g / 1000, g / 10), "setting": setting, "label": json.dumps(setting)}


def test_cli_plot_draws_settings_that_vary_only_the_guidance(tmp_path):
    """`sweep --settings` rows that differ in guidance scale (and interval) plot as one line per interval."""
    rows = [_setting(g) for g in (1, 1.5, 2)] + [_setting(g, interval=(100, 800)) for g in (1.5, 2)]
    (tmp_path / "s.json").write_text(json.dumps({"guidance": [], "sampler": [], "settings": rows, "floor": FLOOR,
                                                 "num_timesteps": 1000}))
    main(["plot", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.png")])
    fig = sweep_plot({"settings": rows, "num_timesteps": 1000}, FLOOR)
    lines = [ln for ln in _drawn(fig)["FLD vs guidance (lower is better)"].get_lines() if ln.get_linestyle() == "-"]
    assert [len(ln.get_xdata()) for ln in lines] == [3, 2]
    assert Image.open(tmp_path / "s.png").size == (1650, 1045)


def test_cli_plot_refuses_settings_that_vary_the_sampler(tmp_path):
    rows = [_setting(1.5), _setting(2, sampler="ddim")]  # two scales: refused for the sampler alone
    (tmp_path / "s.json").write_text(json.dumps({"guidance": [], "sampler": [], "settings": rows, "floor": FLOOR}))
    with pytest.raises(ValueError, match="vary only the guidance"):
        main(["plot", str(tmp_path / "s.json"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
