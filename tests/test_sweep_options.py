"""The one sweep driver takes any generate() keyword: --set, --vary, --settings, the best-setting rule, the CLI."""

import json

import pytest
import torch
from conftest import tiny_pipeline

from latentdiff import LatentDiffusion
from latentdiff.cli import run_main
from latentdiff.evaluate import (Classifier, ClassifierConfig, Reference, main, parse_assignment, pick_best, run_sweep,
                                 score_images, sweep_options)
from latentdiff.plot import interval_groups

TINY = ClassifierConfig(channels=(4, 8), convs_per_stage=(1, 2), feature_dim=8)
FLOOR = {"accuracy": 0.99, "worst_class_accuracy": 0.98, "worst_class": 0, "fld": 1.0, "fld_per_class_mean": 1.0,
         "precision": 0.9, "recall": 0.9, "n": 20, "n_ref": 40, "k": 3}


@pytest.fixture
def judge() -> tuple[Classifier, Reference]:
    """An untrained tiny classifier and a random reference set: scoring plumbing, not quality."""
    torch.manual_seed(0)
    return Classifier(TINY).eval(), Reference(torch.randn(40, 8), torch.arange(40) % 10, torch.randn(40, 10))


def balanced(pipe, n=2, seed=0, **kw):
    """What the sweep should have generated: n per class, sample i with seed + i."""
    return pipe.generate(torch.arange(pipe.num_classes).repeat_interleave(n), seed=seed, **kw)


class GuidedPipeline(LatentDiffusion):
    """A pipeline whose generate() has a keyword the sweep code has never heard of (like a future guide=)."""

    calls: list = []

    def generate(self, labels, *args, guide: str = "none", **kwargs):
        GuidedPipeline.calls.append(guide)
        images = super().generate(labels, *args, **kwargs)
        return images.flip(-1) if guide == "mirror" else images


def test_parse_assignment():
    assert parse_assignment("eta=0.5") == ("eta", 0.5)
    assert parse_assignment("spacing=logsnr") == ("spacing", "logsnr")
    assert parse_assignment("guidance_interval=[100, 800]") == ("guidance_interval", [100, 800])
    for bad in ("eta", "=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_assignment(bad)


def test_fixed_and_vary_reach_generate(pipe, judge):
    sweep = run_sweep(pipe, *judge, [1.0, 3.0], [("ddim", 2)], n_per_class=2, progress=False,
                      fixed={"eta": 0.5, "sampler": "ddim", "steps": 3}, vary={"spacing": ["uniform", "karras"]})
    grid = [(r["guidance_scale"], r["spacing"], r["sampler"], r["steps"], r["eta"], r["label"]) for r in sweep["guidance"]]
    assert grid == [(g, sp, "ddim", 3, 0.5, f"spacing={sp}") for sp in ("uniform", "karras") for g in (1.0, 3.0)]
    (s,) = sweep["sampler"]
    assert (s["sampler"], s["steps"], s["eta"]) == ("ddim", 2, 0.5)  # the sampler part keeps --set's eta
    r = sweep["guidance"][3]  # g=3, karras
    assert r["setting"] == {"guidance_scale": 3.0, "sampler": "ddim", "steps": 3, "guidance_interval": [0, 99],
                            "spacing": "karras", "eta": 0.5, "autoguidance_scale": 1.0}
    assert r["unet_rows"] == 6  # 3 steps, each guided: a doubled batch
    # the record's setting reproduces the run: generate() with it scores the same
    again = score_images(*judge, balanced(pipe, **r["setting"]), torch.arange(10).repeat_interleave(2))["metrics"]
    assert again["fld"] == pytest.approx(r["metrics"]["fld"], rel=1e-4)
    # the plot draws one line per varied value
    assert [name for name, _ in interval_groups(sweep["guidance"])] == ["spacing=uniform", "spacing=karras"]


def test_settings_part_and_best(pipe, judge):
    settings = [{}, {"guidance_scale": 2.0, "guidance_interval": "10:80", "spacing": "logsnr"}]
    sweep = run_sweep(pipe, *judge, [], [], n_per_class=2, progress=False, settings=settings, floor=FLOOR)
    assert not sweep["guidance"] and not sweep["sampler"]
    default, limited = sweep["settings"]
    assert (default["guidance_scale"], default["steps"], default["guidance_interval"]) == (3.0, 4, [0, 99])
    assert (limited["guidance_interval"], limited["spacing"], limited["label"]) == ([10, 80], "logsnr", json.dumps(settings[1]))
    assert limited["ratios"]["fld"] == pytest.approx(limited["metrics"]["fld"] / FLOOR["fld"])
    assert limited["unet_rows"] < default["unet_rows"] == 8  # fewer guided steps
    # best: the lowest FLD that meets every bar; a bar nobody meets gives no setting
    best = pick_best(sweep, min_accuracy=0.0)
    assert best["setting"] == min(sweep["settings"], key=lambda r: r["metrics"]["fld"])["setting"]
    assert pick_best(sweep, 0.0, max_unet_rows=limited["unet_rows"])["setting"] == limited["setting"]
    assert pick_best(sweep, min_accuracy=1.01)["setting"] is None


def test_a_new_generate_keyword_sweeps_without_code_changes(judge):
    p = tiny_pipeline()
    pipe = GuidedPipeline(p.unet, p.vae, p.config)
    GuidedPipeline.calls.clear()
    sweep = run_sweep(pipe, *judge, [2.0], [], n_per_class=1, progress=False, vary={"guide": ["none", "mirror"]},
                      settings=[{"guide": "mirror", "steps": 2}])
    assert [r["guide"] for r in sweep["guidance"]] == ["none", "mirror"] and sweep["settings"][0]["guide"] == "mirror"
    assert GuidedPipeline.calls == ["none", "mirror", "mirror"]
    assert sweep["settings"][0]["setting"]["guide"] == "mirror"


@pytest.mark.parametrize("sets, varies, settings, message", [
    (["guidance_scale=2"], None, None, "use --guidance"),
    (["seed=3"], None, None, "the sweep sets it"),
    (["etaa=0.5"], None, None, "not a generate\\(\\) keyword"),
    (None, [["guidance_interval", "all"]], None, "use --intervals"),
    (None, [["spacing"]], None, "at least one value"),
    (None, [["spacing", "uniform", "logarithmic"]], None, "unknown spacing"),
    (["steps=0"], None, None, "steps must be"),
    (None, None, ['{"guidance_scale": -1}'], "guidance_scale must be"),
    (None, None, ['{"guidance_interval": "900:100"}'], "guidance interval"),
    (None, None, ["[1, 2]"], "JSON object"),
    (None, None, ["{steps: 2}"], "not JSON"),
    (None, None, ['{"batch_size": 8}'], "the sweep sets it"),
])
def test_bad_options_fail_before_any_work(pipe, sets, varies, settings, message):
    with pytest.raises(ValueError, match=message):
        sweep_options(pipe, sets, varies, settings)


def test_cli_sweep_with_set_vary_settings(tmp_path, monkeypatch, judge, capsys):
    import latentdiff.evaluate.commands as commands

    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    monkeypatch.setattr(commands, "_setup", lambda args: (*judge, {"path": "tiny"}))
    monkeypatch.setattr(commands, "real_floor", lambda *a, **k: FLOOR)
    common = ["--model", str(tmp_path / "ldm"), "--n-per-class", "2"]
    main(["sweep", *common, "--guidance", "1", "3", "--vary", "steps", "2", "3", "--set", "sampler=ddim", "--set", "eta=1",
          "--samplers", "--settings", '{"guidance_scale": 2, "guidance_interval": [10, 80]}',
          "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    res = json.loads((tmp_path / "s.json").read_text())
    assert [(r["guidance_scale"], r["steps"], r["sampler"], r["eta"]) for r in res["guidance"]] == [
        (1.0, 2, "ddim", 1.0), (3.0, 2, "ddim", 1.0), (1.0, 3, "ddim", 1.0), (3.0, 3, "ddim", 1.0)]
    assert res["sampler"] == [] and res["settings"][0]["guidance_interval"] == [10, 80]
    assert res["fixed"] == {"sampler": "ddim", "eta": 1} and res["vary"] == {"steps": [2, 3]}
    assert "setting" in res["best"] and (tmp_path / "s.png").is_file()
    out = capsys.readouterr().out
    assert "[steps=3]" in out and "real floor" in out and "best (" in out

    # --settings alone: no guidance or sampler part unless asked for
    main(["sweep", *common, "--settings", "{}", "--out", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")])
    res = json.loads((tmp_path / "t.json").read_text())
    assert (len(res["guidance"]), len(res["sampler"]), len(res["settings"])) == (0, 0, 1)
    assert not (tmp_path / "t.png").exists()

    # the written JSON re-plots
    main(["plot", str(tmp_path / "s.json"), "--out", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").is_file()


def test_cli_bad_set_is_one_line_before_the_classifier(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(["sweep", "--model", str(tmp_path / "ldm"), "--set", "stepz=3",
                               "--classifier", str(tmp_path / "none")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'stepz' is not a generate() keyword" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_committed_sweep_json_still_plots(tmp_path):
    """A sweep written before --set/--vary/--settings (no 'settings' part, no labels) re-draws unchanged."""
    from conftest import REPO

    old = REPO / "bench" / "results" / "cpu" / "sweep_quick_final.json"
    assert "settings" not in json.loads(old.read_text())
    main(["plot", str(old), "--out", str(tmp_path / "old.png")])
    assert (tmp_path / "old.png").stat().st_size > 10_000
