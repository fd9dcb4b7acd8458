"""Guidance interval and timestep spacing through the evaluation: generate, settings, sweep grid, choice, CLI."""

import json

import pytest
import torch
from conftest import tiny_pipeline

from latentdiff.cli import run_main
from latentdiff.evaluate import (Classifier, ClassifierConfig, Reference, choose_default, evaluate_ldm, generate_balanced,
                                 main, parse_interval, run_sweep)

TINY = ClassifierConfig(channels=(4, 8), convs_per_stage=(1, 2), feature_dim=8)


@pytest.fixture
def judge() -> tuple[Classifier, Reference]:
    """An untrained tiny classifier and a random reference set: scoring plumbing, not quality."""
    torch.manual_seed(0)
    labels = torch.arange(40) % 10
    return Classifier(TINY).eval(), Reference(torch.randn(40, 8), labels, torch.randn(40, 10))


def test_interval_and_spacing_reach_generate(pipe, judge):
    kw = dict(guidance_interval=[10, 80], spacing="karras")
    images, labels = generate_balanced(pipe, 2, 3.0, "ddim", 3, seed=5, batch_size=7, progress=False, **kw)
    direct = pipe.generate(labels, guidance_scale=3.0, steps=3, sampler="ddim", seed=5, **kw)
    assert torch.allclose(images, direct, atol=1e-5)
    plain, _ = generate_balanced(pipe, 2, 3.0, "ddim", 3, seed=5, progress=False)
    assert not torch.allclose(images, plain, atol=1e-3)  # the options changed what was generated

    r = evaluate_ldm(pipe, *judge, 2, 3.0, "ddim", 3, seed=5, progress=False, **kw)
    assert torch.allclose(r["images"], direct, atol=1e-5)
    assert (r["guidance_interval"], r["spacing"], r["guidance_scale"], r["steps"]) == ([10, 80], "karras", 3.0, 3)
    # the model's defaults are resolved into the record: None ("every step") becomes [0, T-1]
    d = evaluate_ldm(pipe, *judge, 2, progress=False)
    assert (d["guidance_interval"], d["spacing"], d["sampler"], d["steps"]) == ([0, 99], "uniform", "dpm++", 4)
    assert torch.allclose(d["images"], pipe.generate(labels, seed=0), atol=1e-5)


def test_sweep_grid_is_scales_times_intervals(pipe, judge):
    sweep = run_sweep(pipe, *judge, [1.0, 2.0], [("ddim", 2)], n_per_class=2, progress=False,
                      intervals=[[0, 99], [10, 80], None], guidance_interval=[20, 70], spacing="logsnr")
    grid = [(r["guidance_scale"], r["guidance_interval"]) for r in sweep["guidance"]]
    assert grid == [(g, iv) for iv in ([0, 99], [10, 80], [20, 70]) for g in (1.0, 2.0)]  # None: the default interval
    assert all((r["sampler"], r["steps"], r["spacing"]) == ("dpm++", 4, "logsnr") for r in sweep["guidance"])
    (s,) = sweep["sampler"]
    assert (s["sampler"], s["steps"], s["guidance_interval"], s["guidance_scale"]) == ("ddim", 2, [20, 70], 3.0)
    assert (sweep["sampler_interval"], sweep["spacing"], sweep["num_timesteps"]) == ([20, 70], "logsnr", 100)
    assert json.loads(json.dumps(sweep)) == sweep  # what --out writes is what was run


def _run(g, interval, acc, fld):
    return {"guidance_scale": g, "guidance_interval": interval, "sampler": "dpm++", "steps": 10,
            "metrics": {"accuracy": acc, "fld": fld}}


def test_choose_default_returns_the_interval():
    runs = [_run(1.5, [0, 999], 0.99, 1.7), _run(2.0, [0, 999], 0.999, 3.2), _run(2.0, [100, 800], 0.996, 1.5),
            _run(3.0, [100, 600], 0.97, 1.2)]  # lowest FLD of all, but below the accuracy bar
    choice = choose_default({"guidance": runs}, min_accuracy=0.98)
    assert (choice["guidance_scale"], choice["guidance_interval"]) == (2.0, [100, 800])
    old = choose_default({"guidance": [{k: v for k, v in r.items() if k != "guidance_interval"} for r in runs]})
    assert old["guidance_scale"] == 2.0 and "guidance_interval" not in old  # sweeps from before intervals


def test_parse_interval():
    assert parse_interval("all", 1000) == (0, 999)
    assert parse_interval("100:800", 1000) == (100, 800) == parse_interval("100 800", 1000)
    for bad in ("800:100", "100:1000", "100", "-5:800", "a:b", "1:2:3", "every"):
        with pytest.raises(ValueError, match="guidance interval"):
            parse_interval(bad, 1000)


@pytest.mark.parametrize("args", [["sweep", "--intervals", "all", "80:10"], ["sweep", "--intervals", "10-80"],
                                  ["sweep", "--intervals", "0:100"], ["ldm", "--guidance-interval", "10"],
                                  ["ldm", "--guidance-interval", "10", "80", "90"]])
def test_cli_bad_interval_is_one_line_and_exit_2(tmp_path, capsys, args):
    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    with pytest.raises(SystemExit) as e:  # fails before the classifier is loaded or trained
        run_main(lambda: main([*args, "--model", str(tmp_path / "ldm"), "--classifier", str(tmp_path / "none")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: guidance interval") and "0 <= LO <= HI <= 99" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


def test_cli_sweep_and_ldm_with_intervals(tmp_path, monkeypatch, judge):
    """The commands pass --intervals / --guidance-interval / --spacing through and write them to the JSON."""
    import latentdiff.evaluate.commands as commands

    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    floor = {"accuracy": 0.99, "worst_class_accuracy": 0.98, "worst_class": 0, "fld": 1.0, "fld_per_class_mean": 1.0,
             "precision": 0.9, "recall": 0.9, "n": 20, "n_ref": 40, "k": 3}
    monkeypatch.setattr(commands, "_setup", lambda args: (*judge, {"path": "tiny"}))
    monkeypatch.setattr(commands, "real_floor", lambda *a, **k: floor)
    common = ["--model", str(tmp_path / "ldm"), "--n-per-class", "2", "--spacing", "trailing"]
    main(["sweep", *common, "--guidance", "1", "3", "--intervals", "all", "10:80", "--guidance-interval", "20", "70",
          "--samplers", "ddim:2", "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    res = json.loads((tmp_path / "s.json").read_text())
    assert [(r["guidance_scale"], r["guidance_interval"]) for r in res["guidance"]] == [
        (1.0, [0, 99]), (3.0, [0, 99]), (1.0, [10, 80]), (3.0, [10, 80])]
    assert res["sampler"][0]["guidance_interval"] == [20, 70] and {r["spacing"] for r in res["guidance"]} == {"trailing"}
    assert res["choice"]["guidance_interval"] in ([0, 99], [10, 80]) and (tmp_path / "s.png").is_file()

    main(["ldm", *common, "--guidance-interval", "all", "--out", str(tmp_path / "l.json")])
    res = json.loads((tmp_path / "l.json").read_text())
    assert (res["guidance_interval"], res["spacing"]) == ([0, 99], "trailing")
