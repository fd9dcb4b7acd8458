"""Evaluation metrics and the classifier's training code, on synthetic tensors (no MNIST needed)."""

import json
import math
import re

import numpy as np
import pytest
import torch

from latentdiff.evaluate import (Classifier, ClassifierConfig, Reference, balanced_subset, choose_default,
                                 class_accuracy, format_table, frechet_distance, frechet_distance_features,
                                 gaussian_stats, knn_radii, load_or_train_classifier, main, parse_sampler,
                                 precision_recall, psnr, random_affine, sample_metrics, sweep_plot, train_classifier)
from latentdiff.serialization import load_model

TINY = ClassifierConfig(channels=(4, 8), convs_per_stage=(1, 2), feature_dim=8)


def write_idx(folder, stem, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (folder / stem).write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """32 train / 20 test random 'digits' as IDX files."""
    rng = np.random.default_rng(0)
    for split, n, (img, lbl) in [("train", 32, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                 ("test", 20, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))]:
        write_idx(tmp_path, img, rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(tmp_path, lbl, np.arange(n) % 10, 2049)
    return tmp_path


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_identical_gaussians_is_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma, mu = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    f = torch.randn(500, 5, generator=g)
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_1d_closed_form():
    m1, m2, s1, s2 = 0.3, -1.2, 2.0, 0.5
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * math.sqrt(s1 * s2)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    got = frechet_distance(t([m1]), t([[s1]]), t([m2]), t([[s2]]))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_diagonal_closed_form():
    """Diagonal covariances: sum over dims of (m1-m2)^2 + (sqrt(s1) - sqrt(s2))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2 + (s1.sqrt() - s2.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_non_commuting_covariances_match_eig_formula():
    """tr sqrt(S1 S2) computed from the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T, b @ b.T
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    mu = torch.zeros(4, dtype=torch.float64)
    expected = (s1.trace() + s2.trace() - 2 * tr_sqrt).item()
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(frechet_distance(mu, s2, mu, s1), rel=1e-8)


def test_frechet_of_samples_approaches_population_value():
    g = torch.Generator().manual_seed(2)
    f1 = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    f2 = torch.randn(20000, 2, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert frechet_distance_features(f1, f2) == pytest.approx(1.0 + 2 * (2 - 1) ** 2, abs=0.1)  # = 3
    mu, sigma = gaussian_stats(f2)
    assert mu.dtype == torch.float64 and sigma.shape == (2, 2)


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_identical_sets_are_one():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_are_zero():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=g)
    fake = 0.1 * torch.randn(1000, 2, generator=g)  # all samples near the centre of the real data
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95 and r < 0.2


def test_knn_radii_excludes_self():
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(pts, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(pts, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ValueError):
        knn_radii(pts, k=4)


# ----------------------------------------------------------------------------- accuracy, PSNR
def test_class_accuracy_and_worst_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 0, 2])
    acc = class_accuracy(pred, labels, num_classes=4)
    assert acc["accuracy"] == pytest.approx(6 / 8)
    assert acc["per_class_accuracy"][:3] == pytest.approx([0.75, 1.0, 0.5])
    assert math.isnan(acc["per_class_accuracy"][3])  # absent class: NaN, not a fake 0 or 1
    assert (acc["worst_class"], acc["worst_class_accuracy"]) == (2, 0.5)


def test_psnr_formula():
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(1e-4) == pytest.approx(40.0)
    assert psnr(0.25, max_value=2.0) == pytest.approx(10 * math.log10(4 / 0.25))
    assert psnr(0.0) == math.inf
    x, y = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    assert psnr((x - y).square().mean()) == pytest.approx(-10 * math.log10((x - y).square().mean().item()), rel=1e-6)


def test_balanced_subset():
    labels = torch.arange(100) % 10
    idx = balanced_subset(labels, 3, seed=0)
    assert len(idx) == 30 and torch.bincount(labels[idx]).tolist() == [3] * 10
    assert torch.equal(idx, balanced_subset(labels, 3, seed=0))


def test_sample_metrics_of_reference_itself():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    feats = torch.randn(300, 4, generator=g) + 5 * torch.nn.functional.one_hot(labels, 4).float()
    logits = torch.nn.functional.one_hot(labels, 3).float()
    m = sample_metrics(feats, logits, labels, Reference(feats, labels, logits), num_classes=3)
    assert m["accuracy"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["fld"] == pytest.approx(0, abs=1e-5) and m["fld_per_class_mean"] == pytest.approx(0, abs=1e-5)
    assert m["n"] == m["n_ref"] == 300
    assert "FLD (N=300 vs 300 test)" in format_table([("FLD (N=300 vs 300 test)", "0", "0")])


# ----------------------------------------------------------------------------- sweep helpers
def _run(g, sampler, steps, acc, fld):
    return {"guidance_scale": g, "sampler": sampler, "steps": steps, "generate_s": 1.0,
            "metrics": {"accuracy": acc, "fld": fld, "fld_per_class_mean": fld, "precision": 0.5, "recall": 0.5,
                        "worst_class_accuracy": acc}}


def test_choose_default_prefers_low_fld_over_accuracy():
    sweep = {"guidance": [_run(1, "dpm++", 20, 0.90, 3.0), _run(2, "dpm++", 20, 0.985, 1.0),
                          _run(3, "dpm++", 20, 0.99, 1.5), _run(6, "dpm++", 20, 0.999, 4.0)],
             "sampler": [_run(3, "dpm++", 5, 0.99, 2.0), _run(3, "dpm++", 10, 0.99, 1.05),
                         _run(3, "dpm++", 20, 0.99, 1.0), _run(3, "ddim", 50, 0.99, 0.98),
                         _run(3, "ddpm", 1000, 0.99, 0.5)]}
    choice = choose_default(sweep, min_accuracy=0.98, fld_tolerance=0.10)
    assert choice["guidance_scale"] == 2  # not 6, the most accurate; not 1, below the accuracy bar
    # ddpm:1000 is over max_steps; dpm++:10 is within 10% of the best remaining FLD with the fewest steps
    assert (choice["sampler"], choice["steps"]) == ("dpm++", 10)
    assert choose_default(sweep, fld_tolerance=0.01)["steps"] == 50
    assert choose_default(sweep, max_steps=1000)["steps"] == 1000
    fallback = choose_default({"guidance": sweep["guidance"][:1]}, min_accuracy=0.98)
    assert fallback["guidance_scale"] == 1 and "most accurate" in fallback["guidance_reason"]


def test_parse_sampler():
    assert parse_sampler("dpm++:20") == ("dpm++", 20)
    assert parse_sampler("ddpm:1000") == ("ddpm", 1000)
    for bad in ("dpm++", "euler:10", "ddim:0", "ddim:x"):
        with pytest.raises(ValueError):
            parse_sampler(bad)


def test_sweep_plot_writes_png(tmp_path):
    sweep = {"default_sampler": "dpm++:20", "sampler_guidance": 3.0,
             "guidance": [_run(g, "dpm++", 20, 0.9 + g / 100, 5 - g) for g in (1, 2, 3)],
             "sampler": [_run(3, s, n, 0.95, 10 / n) for s in ("dpm++", "ddim") for n in (5, 10, 20)]}
    fig = sweep_plot(sweep, {"fld": 0.5, "fld_per_class_mean": 0.7, "accuracy": 0.99}, tmp_path / "sweep.png")
    from PIL import Image

    assert Image.open(tmp_path / "sweep.png").size == (1650, 1045)  # 15 x 9.5 inches at 110 dpi
    assert [ax.get_title() for ax in fig.axes][-2:] == ["FLD vs steps", "accuracy vs steps"]  # axis details: test_plot.py


# ----------------------------------------------------------------------------- classifier
def test_classifier_shapes_and_range_check():
    clf = Classifier(TINY).eval()
    feats, logits = clf.features(torch.rand(5, 1, 28, 28))
    assert feats.shape == (5, 8) and logits.shape == (5, 10)
    assert torch.allclose(clf.head[1](feats), logits)  # features really are the last layer's input
    with pytest.raises(ValueError):
        clf.features(torch.rand(5, 28, 28))


def test_random_affine_keeps_shape_and_is_seeded():
    x = torch.rand(4, 1, 28, 28)
    a = random_affine(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, random_affine(x, torch.Generator().manual_seed(0)))
    assert torch.allclose(random_affine(x, torch.Generator(), degrees=0, scale=0, shift_px=0), x, atol=1e-5)


def test_train_classifier_steps_and_roundtrip(tiny_mnist, tmp_path):
    out = tmp_path / "clf"
    clf, info = train_classifier(tiny_mnist, out, max_steps=2, batch_size=8, config=TINY, progress=False)
    assert info["steps"] == 2 and 0.0 <= info["test_accuracy"] <= 1.0 and info["n_test"] == 20
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "train_info.json"}
    loaded = load_model(Classifier, ClassifierConfig, out)
    x = torch.rand(3, 1, 28, 28)
    assert loaded.config == TINY
    assert torch.allclose(loaded.features(x)[0], clf.eval().features(x)[0])
    # load_or_train loads the existing folder instead of training again
    again = load_or_train_classifier(out, tiny_mnist)
    assert torch.equal(again.state_dict()["head.1.weight"], loaded.state_dict()["head.1.weight"])


def test_cli_classifier_command(tiny_mnist, tmp_path, monkeypatch):
    """End to end on tiny data: trains a (default-size, 1 step) classifier, prints floors, writes JSON."""
    import latentdiff.evaluate.classifier as ev

    real_train = ev.train_classifier
    monkeypatch.setattr(ev, "train_classifier", lambda root, out, device: real_train(
        root, out, device, max_steps=1, batch_size=8, config=TINY, progress=False))
    out = tmp_path / "res.json"
    main(["classifier", "--data-dir", str(tiny_mnist), "--classifier", str(tmp_path / "c"), "--n-per-class", "2",
          "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["floor"]["n"] == 20 and res["classifier"]["steps"] == 1


def test_cli_ldm_vae_sweep_end_to_end(tiny_mnist, tmp_path, monkeypatch):
    """The three model commands on a tiny untrained pipeline: plumbing, JSON and plot, not quality."""
    import latentdiff.evaluate.classifier as ev
    from latentdiff import LatentDiffusion, UNet, UNetConfig, VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(8, 8, 8), latent_channels=4))
    unet = UNet(UNetConfig(channels=(8, 16), num_res_blocks=1, num_heads=2))
    LatentDiffusion(unet, vae).save_pretrained(tmp_path / "ldm")
    real_train = ev.train_classifier
    monkeypatch.setattr(ev, "train_classifier", lambda root, out, device: real_train(
        root, out, device, max_steps=1, batch_size=8, config=TINY, progress=False))
    common = ["--data-dir", str(tiny_mnist), "--classifier", str(tmp_path / "c"), "--n-per-class", "2"]

    main(["ldm", "--model", str(tmp_path / "ldm"), "--steps", "2", "--out", str(tmp_path / "ldm.json"), *common])
    res = json.loads((tmp_path / "ldm.json").read_text())
    assert res["metrics"]["n"] == 20 and res["floor"]["n"] == 20 and res["steps"] == 2 and "images" not in res

    main(["vae", "--model", str(tmp_path / "ldm"), "--out", str(tmp_path / "vae.json"), *common])  # uses ldm/vae
    res = json.loads((tmp_path / "vae.json").read_text())
    assert res["n"] == 20 and len(res["latent_mean"]) == 4 and res["psnr"] == pytest.approx(psnr(res["mse"]))
    assert res["train_n"] == 20 and res["train_recon_fld_ratio"] == pytest.approx(res["train_recon_fld"] / res["train_real_fld"])
    # A VAE that reconstructed perfectly would sit exactly on the real digits' floor.
    import latentdiff.evaluate.score as score
    monkeypatch.setattr(score, "reconstruct", lambda vae, x, batch_size=500: (x, torch.zeros(len(x), 4, 7, 7)))
    main(["vae", "--model", str(tmp_path / "ldm"), "--out", str(tmp_path / "vae_id.json"), *common])
    assert json.loads((tmp_path / "vae_id.json").read_text())["train_recon_fld_ratio"] == pytest.approx(1.0)

    main(["sweep", "--model", str(tmp_path / "ldm"), "--guidance", "1", "2", "--samplers", "ddim:2", "dpm++:3",
          "--out", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png"), *common])
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["guidance_scale"] for r in res["guidance"]] == [1.0, 2.0]
    assert [(r["sampler"], r["steps"]) for r in res["sampler"]] == [("ddim", 2), ("dpm++", 3)]
    assert "guidance_scale" in res["choice"] and (tmp_path / "sweep.png").is_file()


@pytest.mark.parametrize("args, word", [
    (["--out", "."], "is a folder"),
    (["--out", "afile/r.json"], "is a file, not a folder"),
    (["--samples", "s.xyz"], "PIL writes no image format"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
])
def test_cli_bad_outputs_and_counts_fail_before_the_work(tmp_path, monkeypatch, args, word):
    """These used to fail after the whole evaluation (a traceback, PIL's 'unknown file extension', range()'s message)."""
    import latentdiff.evaluate.commands as commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(commands, "load_pipe", lambda args: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=re.escape(word)):
        main(["ldm", "--model", "m", "--n-per-class", "2", *args])


def test_cli_sweep_bad_plot_name_fails_before_the_sweep(tmp_path, monkeypatch):
    import latentdiff.evaluate.commands as commands

    monkeypatch.setattr(commands, "load_pipe", lambda args: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="matplotlib writes no figure format"):
        main(["sweep", "--model", "m", "--guidance", "1", "--plot", str(tmp_path / "s.xyz"), "--out", str(tmp_path / "s.json")])


@pytest.mark.parametrize("args, word", [
    (["--guidance", "1", "--min-accuracy", "99.5"], "--min-accuracy is a fraction in [0, 1] (0.995 = 99.5%), got 99.5"),
    (["--guidance", "1", "--min-worst-class", "nan"], "--min-worst-class is a fraction"),
    (["--guidance", "1", "--min-recall-ratio", "-1"], "--min-recall-ratio is a multiple"),
    (["--guidance", "--samplers"], "nothing to sweep"),  # was a sweep of nothing, exit 0
])
def test_cli_sweep_bad_bars_and_empty_sweeps_fail_before_the_work(monkeypatch, args, word):
    import latentdiff.evaluate.commands as commands

    monkeypatch.setattr(commands, "load_pipe", lambda args: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=re.escape(word)):
        main(["sweep", "--model", "m", *args])


def test_cli_plot_of_an_ldm_result_is_one_line(tmp_path):
    (tmp_path / "ldm.json").write_text(json.dumps({"guidance_scale": 2.0, "guidance": 2.0, "floor": {}}))
    with pytest.raises(ValueError, match="is not a sweep result"):  # was a TypeError inside the plot
        main(["plot", str(tmp_path / "ldm.json"), "--out", str(tmp_path / "x.png")])


def test_classifier_is_never_trained_over_another_models_folder(tmp_path, monkeypatch):
    """--classifier runs/vae --retrain (the old error's hint) used to overwrite the VAE's weights with a classifier."""
    import latentdiff.evaluate.classifier as ev
    from latentdiff.errors import ModelLoadError
    from conftest import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    before = (tmp_path / "vae" / "model.safetensors").read_bytes()
    monkeypatch.setattr(ev, "train_classifier", lambda *a, **k: pytest.fail("trained into the VAE folder"))
    with pytest.raises(ModelLoadError, match="another model's weights"):
        load_or_train_classifier(tmp_path / "vae", retrain=True)
    with pytest.raises(ModelLoadError, match="not an evaluation classifier") as e:
        load_or_train_classifier(tmp_path / "vae")
    assert "--retrain" not in str(e.value)
    assert (tmp_path / "vae" / "model.safetensors").read_bytes() == before


def test_a_taught_model_is_refused_by_the_judge(tmp_path):
    """A taught model's 11th class has no class in the judge: its digits all counted as wrong, silently."""
    from conftest import tiny_pipeline
    from latentdiff.evaluate import evaluate_ldm

    pipe = tiny_pipeline()
    taught = pipe.with_taught(pipe.unet.with_classes(pipe.unet.class_embed.weight[:1].detach()), ["star"], False)
    clf = Classifier(TINY)
    with pytest.raises(ValueError, match=r"11 classes \(taught: \['star'\]\) and the judge reads 10"):
        evaluate_ldm(taught, clf, None, 2, steps=2, progress=False)


def test_generate_balanced_does_not_depend_on_batch_size():
    from latentdiff import LatentDiffusion, UNet, UNetConfig, VAE, VAEConfig
    from latentdiff.evaluate import generate_balanced

    torch.manual_seed(0)
    pipe = LatentDiffusion(UNet(UNetConfig(channels=(8, 16), num_res_blocks=1, num_heads=2)),
                           VAE(VAEConfig(channels=(8, 8, 8))))
    a, la = generate_balanced(pipe, 2, 2.0, "ddim", 2, seed=5, batch_size=3, progress=False)
    b, lb = generate_balanced(pipe, 2, 2.0, "ddim", 2, seed=5, batch_size=20, progress=False)
    assert la.tolist() == [c for c in range(10) for _ in range(2)] and torch.equal(la, lb)
    assert torch.allclose(a, b, atol=1e-5)


def test_second_judge_script_trains_a_differently_shaped_classifier(mnist_dir, tmp_path):
    """bench/second_judge.py writes a classifier folder that `evaluate --classifier` loads, with its own shape."""
    import sys

    from conftest import REPO, run_cmd

    from latentdiff.evaluate.classifier import load_or_train_classifier

    out = tmp_path / "judge2"
    proc = run_cmd([sys.executable, REPO / "bench" / "second_judge.py", "--data-dir", str(mnist_dir), "--out", str(out),
                    "--max-steps", "2"])
    assert "second judge in" in proc.stdout
    clf = load_or_train_classifier(out)
    assert clf.config.feature_dim == 64 and tuple(clf.config.channels) == (24, 48, 96)
