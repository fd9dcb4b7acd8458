"""ONNX export (latentdiff.export) and its runner (latentdiff.onnx_runner) on tiny models: ONNX Runtime vs PyTorch."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch

from conftest import perturb_, run_cmd, tiny_pipeline, tiny_unet

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.distill import make_student  # noqa: E402
from latentdiff.errors import ModelLoadError  # noqa: E402
from latentdiff.export import (MANIFEST, TOLERANCE, ExportError, build_page, example_inputs, export,  # noqa: E402
                               graph_specs, session)
from latentdiff.onnx_runner import MATCH_TOLERANCE, OnnxDiffusion  # noqa: E402
from latentdiff.timesteps import make_timesteps  # noqa: E402


def tiny_student_pipeline() -> LatentDiffusion:
    """A tiny consistency student (lcm, 2 trailing steps) whose scale input does something."""
    pipe = tiny_pipeline()
    student = make_student(pipe.unet, 1000.0)
    perturb_(student.guidance_embed, 5)  # zero-initialised: a fresh student ignores its scale
    sample = dataclasses.replace(pipe.config.sample, sampler="lcm", steps=2, spacing="trailing", guidance_scale=2.0)
    return LatentDiffusion(student.eval(), pipe.vae, dataclasses.replace(pipe.config, sample=sample))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """name -> (run folder, export folder, pipeline), for a tiny teacher and a tiny student, exported once."""
    torch.set_grad_enabled(False)
    root, out = tmp_path_factory.mktemp("export"), {}
    for name, pipe in (("teacher", tiny_pipeline()), ("student", tiny_student_pipeline())):
        pipe.save_pretrained(root / name)
        export(root / name, root / f"{name}_onnx")
        out[name] = (root / name, root / f"{name}_onnx", LatentDiffusion.from_pretrained(root / name))
    yield out
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_export_round_trip_every_graph_matches_pytorch_at_any_batch(exported, kind):
    _, folder, pipe = exported[kind]
    info = json.loads((folder / MANIFEST).read_text())
    assert set(info["graphs"]) == ({"step", "decode", "encode"} | ({"step_cond"} if kind == "teacher" else set()))
    assert all(0 <= v <= TOLERANCE for v in info["check"]["max_rel_difference"].values())
    for name, (module, inputs, _) in graph_specs(pipe).items():
        sess = session(folder / info["graphs"][name])
        for batch in (2, 5):  # the export's check used batches 1 and 3: the batch axis is dynamic
            feed = example_inputs(pipe, inputs, batch, seed=10 + batch)
            want = module(*feed.values())
            got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
            for w, g in zip(want if isinstance(want, tuple) else (want,), got):
                assert g.shape == tuple(w.shape)
                assert (torch.from_numpy(g) - w).abs().max() / w.abs().max().clamp(min=1) <= TOLERANCE


def test_student_step_takes_the_scale(exported):
    _, folder, pipe = exported["student"]
    sess = session(folder / "step.onnx")
    feed = {k: v.numpy() for k, v in example_inputs(pipe, ["x", "t", "labels", "scale"], 3).items()}
    a = sess.run(None, feed)[0]
    feed["scale"] = feed["scale"] + 1
    assert abs(sess.run(None, feed)[0] - a).max() > 1e-3


def test_manifest_holds_what_a_runner_needs(exported):
    for kind in ("teacher", "student"):
        _, folder, pipe = exported[kind]
        info = json.loads((folder / MANIFEST).read_text())
        s = pipe.settings()
        assert info["format"] == "latentdiff-onnx/1" and info["kind"] == kind
        assert torch.equal(torch.tensor(info["alphas_cumprod"], dtype=torch.float64), pipe.alphas_cumprod)
        assert info["timesteps"] == make_timesteps(pipe.alphas_cumprod, s.steps, s.spacing).tolist()
        assert info["sample"] == s.to_kwargs()
        assert info["latent_shape"] == [4, 7, 7] and info["image_shape"] == [1, 28, 28]
        assert (info["latent_scale"], info["latent_shift"]) == (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
        assert info["num_classes"] == 10 and info["null_label"] == 10 and info["class_names"] == list("0123456789")
        assert info["prediction"] == "v" and info["num_timesteps"] == 100 and "stream i + 1" in info["noise"]
        assert (info["guidance_embed_scale"] == 1000.0) == (kind == "student")
        assert all((folder / f).is_file() for f in info["graphs"].values())
    assert json.loads((exported["student"][1] / MANIFEST).read_text())["sample"]["sampler"] == "lcm"


@pytest.mark.parametrize("kind,settings", [
    ("teacher", {}),  # dpm++ with guidance at every step
    ("teacher", {"sampler": "ddpm", "guidance_interval": [10, 80], "steps": 5}),  # stochastic; cond-only steps
    ("teacher", {"sampler": "ddim", "eta": 0.5, "guidance_scale": 0.0}),  # the unconditional step
    ("teacher", {"guidance_scale": 1.0}),
    ("student", {}),  # lcm, 2 steps, its scale input
    ("student", {"sampler": "ddim", "steps": 3, "guidance_scale": 4.0}),
])
def test_runner_gives_pytorchs_digits(exported, kind, settings):
    _, folder, pipe = exported[kind]
    labels = [c for c in range(10) for _ in range(2)]
    want = pipe.generate(labels, seed=7, **settings)
    got = OnnxDiffusion(folder, threads=1).generate(labels, seed=7, batch_size=7, **settings)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= MATCH_TOLERANCE
    assert ((got * 255).round() - (want * 255).round()).abs().max() <= 1  # grey levels


def test_runner_encodes_as_the_pipeline(exported):
    _, folder, pipe = exported["teacher"]
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert (OnnxDiffusion(folder).encode(images) - pipe.encode(images)).abs().max() <= 1e-4


def test_runner_refuses_bad_settings_and_folders(exported, tmp_path):
    runner = OnnxDiffusion(exported["student"][1])
    with pytest.raises(ValueError, match="needs the teacher"):
        runner.generate([1], sampler="dpm++")
    with pytest.raises(ValueError, match="out of range; valid classes are 0..9"):
        runner.generate([10])
    with pytest.raises(ModelLoadError, match="python -m latentdiff.export"):
        OnnxDiffusion(tmp_path)


@pytest.mark.parametrize("call, word", [
    (lambda r: r.generate([1.5]), "labels must be integers, got 1.5"),  # was truncated to label 1, silently
    (lambda r: r.generate([True]), "labels must be integers, got True"),
    (lambda r: r.generate(3), "for one digit pass"),
    (lambda r: r.generate([1], seed=1.5), "seed must be an integer"),  # was a float seed, silently
    (lambda r: r.generate([1, 2], seed=2**63 - 1), "64-bit seeds"),  # seed + 1 wrapped
    (lambda r: r.generate([1], batch_size=0), "batch_size must be an integer >= 1"),
])
def test_runner_checks_its_arguments_as_the_pipeline(exported, call, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        call(OnnxDiffusion(exported["student"][1]))


def test_runner_names_a_bad_optimization_level(exported):
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxDiffusion(exported["student"][1], optimization="max")  # was a KeyError at the first generate


def test_a_taught_class_keeps_its_name_in_the_manifest(exported, tmp_path):
    """The manifest's class_names (the web page's class menu) were "0".."10": a taught class lost its name."""
    from latentdiff.teach import save_adapter

    base, _, pipe = exported["teacher"]
    save_adapter(tmp_path / "star", base, ["star"], pipe.unet.class_embed.weight[:1])
    info = export(tmp_path / "star", tmp_path / "onnx")
    assert info["class_names"] == [*"0123456789", "star"] and info["num_classes"] == 11


def test_export_out_under_a_file_is_one_line(exported, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ExportError, match="lies under the file"):
        export(exported["student"][0], tmp_path / "afile" / "onnx")


# ------------------------------------------------------------------------------------------ refusals
def test_export_refuses_what_it_cannot_export(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out")
    pipe = tiny_pipeline()
    pipe.vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ModelLoadError, match="not an LDM run folder"):
        export(tmp_path / "vae", tmp_path / "out")
    (tmp_path / "file").write_text("")
    pipe.save_pretrained(tmp_path / "ldm")
    with pytest.raises(ExportError, match="is a file; pass a folder"):
        export(tmp_path / "ldm", tmp_path / "file")
    with pytest.raises(ValueError, match="steps"):
        export(tmp_path / "ldm", tmp_path / "out", steps=0)
    sample = dataclasses.replace(pipe.config.sample, autoguidance_scale=1.5)
    LatentDiffusion(pipe.unet, pipe.vae, dataclasses.replace(pipe.config, sample=sample),
                    guide=tiny_unet(1)).save_pretrained(tmp_path / "auto")
    with pytest.raises(ExportError, match="no guide network: pass --autoguidance-scale 1"):
        export(tmp_path / "auto", tmp_path / "out")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"onnxruntime is missing\): pip install -e '\.\[onnx\]'"):
        export(tmp_path / "ldm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_page_refuses_a_teacher(exported, tmp_path):
    with pytest.raises(ExportError, match="the page samples distilled students"):
        build_page(exported["teacher"][1], tmp_path / "page")


def test_cli_exports_and_refuses_in_one_line(exported, tmp_path):
    run, _, _ = exported["student"]
    ok = run_cmd([sys.executable, "-m", "latentdiff.export", "--model", run, "--out", tmp_path / "ex",
                  "--autoguidance-scale", "1"])
    assert "exported student" in ok.stdout and "max relative difference: step" in ok.stdout
    assert (tmp_path / "ex" / MANIFEST).is_file()
    bad = run_cmd([sys.executable, "-m", "latentdiff.export", "--model", tmp_path / "nope", "--out", tmp_path / "x"],
                  check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")


def test_export_names_the_graph_it_cannot_export_or_check(tmp_path, monkeypatch):
    import latentdiff.export as ex

    tiny_pipeline().save_pretrained(tmp_path / "ldm")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported.\nmore")
    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", unsupported)
        with pytest.raises(ExportError, match=r"could not export the step graph \(Exporting the operator 'aten::fancy'"):
            export(tmp_path / "ldm", tmp_path / "out")
    monkeypatch.setattr(ex, "check_graph", lambda module, path, pipe, names: 0.5 if path.stem == "decode" else 0.0)
    with pytest.raises(ExportError, match=r"decode graph differs from PyTorch by 0.5 \(> 0.0001\)"):
        export(tmp_path / "ldm", tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()  # no manifest: no runner takes the folder for a whole export


def test_any_latent_shape_and_eps_prediction(tmp_path):
    """A (2, 14, 14) latent (a VAE with one downsampling), an eps-predicting teacher: the export and runner follow."""
    from conftest import tiny_vae

    pipe = tiny_pipeline(prediction="eps")
    vae = tiny_vae(channels=(8, 16), latent_channels=2)
    unet = tiny_unet(in_channels=2, sample_size=vae.config.latent_size)
    LatentDiffusion(unet, vae, pipe.config).save_pretrained(tmp_path / "ldm")
    info = export(tmp_path / "ldm", tmp_path / "onnx")
    assert info["latent_shape"] == [2, 14, 14] and info["prediction"] == "eps"
    want = LatentDiffusion.from_pretrained(tmp_path / "ldm").generate([1, 2, 3], seed=3, sampler="ddim")
    got = OnnxDiffusion(tmp_path / "onnx").generate([1, 2, 3], seed=3, sampler="ddim")
    assert (got - want).abs().max() <= MATCH_TOLERANCE
