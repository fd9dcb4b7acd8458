"""End to end: train_vae.py -> train_ldm.py -> sample.py through `accelerate launch`, then the Python API.

The two training runs are shared (the session fixture ``trained_runs`` in conftest.py): tiny models,
6 steps on 256 synthetic digits, logging / previews / checkpoints every few steps.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, LDM_SET, REPO, VAE_SET, accelerate_launch, as_set_args, run_cmd, tiny_pipeline
from PIL import Image
from safetensors.torch import load_file

from latentdiff import LatentDiffusion, LDMRunConfig, VAE, VAERunConfig, load_config
from latentdiff.cli import presets

pytestmark = pytest.mark.slow
PY = BIN / "python"


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _check_common_run_files(run_dir):
    assert (run_dir / "run.yaml").is_file()
    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and 2 in steps
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert Image.open(run_dir / "loss.png").size[0] > 100
    previews = sorted(p.name for p in (run_dir / "previews").iterdir())
    assert "final.png" in previews and "step_00000003.png" in previews
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    # step 3 (checkpoint_every=3); the last step may get one too, for resuming with more steps later.
    assert "step_00000003" in ckpts and set(ckpts) <= {"step_00000003", "step_00000006"}
    ck = run_dir / "checkpoints" / "step_00000003"
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= {p.name for p in ck.iterdir()}
    assert json.loads((ck / "state.json").read_text())["step"] == 3


def test_vae_run_folder(trained_runs):
    vae_dir = trained_runs["vae"]
    _check_common_run_files(vae_dir)
    assert {"config.json", "model.safetensors"} <= {p.name for p in vae_dir.iterdir()}
    assert "kl" in _metrics(vae_dir)[-1] and "mse" in _metrics(vae_dir)[-1]
    run_cfg = load_config(VAERunConfig, vae_dir / "run.yaml")
    assert run_cfg.train.steps == 6 and run_cfg.model.channels == (8, 16, 16)
    vae = VAE.from_pretrained(vae_dir)
    # The latent normalisation was measured from data and stored in the config.
    assert vae.config.scaling_factor != 1.0 and vae.config.shift_factor != 0.0
    assert vae.config.channels == (8, 16, 16)


def test_ldm_run_folder(trained_runs):
    ldm_dir = trained_runs["ldm"]
    _check_common_run_files(ldm_dir)
    assert {"config.json", "unet", "vae"} <= {p.name for p in ldm_dir.iterdir()}
    assert (ldm_dir / "checkpoints" / "step_00000003" / "ema.safetensors").is_file()
    run_cfg = load_config(LDMRunConfig, ldm_dir / "run.yaml")
    assert run_cfg.vae_path == str(trained_runs["vae"])
    top = json.loads((ldm_dir / "config.json").read_text())
    assert top["diffusion"]["num_timesteps"] == 100 and top["sample"]["steps"] == 4
    # The LDM folder holds a full copy of the VAE it was trained with.
    a, b = load_file(str(trained_runs["vae"] / "model.safetensors")), load_file(str(ldm_dir / "vae" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ldm_dir / "vae" / "config.json").read_text()) == json.loads((trained_runs["vae"] / "config.json").read_text())


def test_sample_script(trained_runs, tmp_path):
    out, npz = tmp_path / "g.png", tmp_path / "f.npz"
    proc = run_cmd([PY, REPO / "sample.py", "--model", trained_runs["ldm"], "--labels", "0", "1", "--per-label", "2",
                    "--npz", npz, "--out", out, "--steps", "3", "--device", "cpu"])
    assert "wrote" in proc.stdout
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (4,) and labels.tolist() == [0, 0, 1, 1]
    assert Image.open(out).size == (2 * 30 + 2, 2 * 30 + 2)  # 2 per row, 2 rows, 2 px padding
    # The script's images are the Python API's images with the same settings.
    pipe = LatentDiffusion.from_pretrained(trained_runs["ldm"])
    api = (pipe.generate([0, 0, 1, 1], steps=3, seed=0)[:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.abs(api.astype(int) - images.astype(int)).max() <= 1
    # --guidance-interval and --spacing reach generate().
    run_cmd([PY, REPO / "sample.py", "--model", trained_runs["ldm"], "--labels", "0", "1", "--per-label", "2", "--npz", npz,
             "--out", out, "--steps", "3", "--device", "cpu", "--guidance", "3", "--guidance-interval", "20", "80",
             "--spacing", "logsnr"])
    with np.load(npz) as f:
        images = f["images"]
    api = pipe.generate([0, 0, 1, 1], steps=3, seed=0, guidance_scale=3.0, guidance_interval=[20, 80], spacing="logsnr")
    assert np.abs((api[:, 0] * 255).round().to(torch.uint8).numpy().astype(int) - images.astype(int)).max() <= 1


def test_python_api_on_trained_models(trained_runs):
    pipe = LatentDiffusion.from_pretrained(trained_runs["ldm"])
    images = pipe.generate([3, 7], guidance_scale=2.0, steps=3, seed=0)
    assert images.shape == (2, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, pipe.generate([3, 7], guidance_scale=2.0, steps=3, seed=0))
    vae = VAE.from_pretrained(trained_runs["vae"])
    post = vae.encode(images * 2 - 1)
    assert post.mean.shape == (2, 4, 7, 7)
    recon = vae.decode(post.mode())
    assert recon.shape == (2, 1, 28, 28) and recon.min() >= -1 and recon.max() <= 1


def test_copied_ldm_folder_stands_alone(trained_runs, tmp_path):
    """Copy the LDM folder elsewhere and hide the original VAE run: the copy still loads and samples."""
    copy = tmp_path / "elsewhere" / "ldm"
    shutil.copytree(trained_runs["ldm"], copy)
    vae_dir = trained_runs["vae"]
    hidden = vae_dir.with_name("vae-hidden")
    vae_dir.rename(hidden)
    try:
        pipe = LatentDiffusion.from_pretrained(copy)
        original = LatentDiffusion.from_pretrained(trained_runs["ldm"])
        assert torch.equal(pipe.generate([1, 2], steps=2, seed=0), original.generate([1, 2], steps=2, seed=0))
        proc = run_cmd([PY, REPO / "sample.py", "--model", copy, "--labels", "4", "--per-label", "1", "--steps", "2",
                        "--out", tmp_path / "s.png", "--device", "cpu"])
        assert (tmp_path / "s.png").is_file(), proc.stdout
    finally:
        hidden.rename(vae_dir)


def test_plain_python_training(trained_runs, mnist_dir, tmp_path):
    """Both training scripts also run without a launcher; the VAE finds its data through $LATENTDIFF_DATA."""
    fast = ["train.steps=2", "train.checkpoint_every=0", "train.preview_every=0"]
    vae_out, ldm_out = tmp_path / "vae", tmp_path / "ldm"
    run_cmd([PY, REPO / "train_vae.py", "--out", vae_out, *as_set_args(VAE_SET + fast)],
            env={"LATENTDIFF_DATA": str(mnist_dir)})
    assert VAE.from_pretrained(vae_out).config.channels == (8, 16, 16)
    assert [m["step"] for m in _metrics(vae_out)] == [2]
    assert not (vae_out / "checkpoints").exists() or not any((vae_out / "checkpoints").iterdir())
    run_cmd([PY, REPO / "train_ldm.py", "--vae", trained_runs["vae"], "--out", ldm_out, "--data-dir", mnist_dir,
             *as_set_args(LDM_SET + fast)])
    assert LatentDiffusion.from_pretrained(ldm_out).generate([0], steps=1, seed=0).shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------------------------------- bad input
def _assert_one_line_error(proc, *words, launcher: bool = False):
    """Exit code != 0 and exactly one `error: ...` line naming the problem, no traceback from the script.

    Under `accelerate launch` the launcher itself then raises CalledProcessError with a traceback of
    its own (accelerate's behaviour, not the script's), so only the script's part is checked there.
    """
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    if launcher:
        before = proc.stderr.split(errors[0])[0]
        assert "Traceback" not in before, proc.stderr[-3000:]
    else:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_sample_bad_label(trained_runs, tmp_path):
    proc = run_cmd([PY, REPO / "sample.py", "--model", trained_runs["ldm"], "--labels", "12", "--out", tmp_path / "x.png",
                    "--device", "cpu"], check=False)
    _assert_one_line_error(proc, "12")
    assert not (tmp_path / "x.png").exists()


def run_script_in_process(script: str, args: list, monkeypatch, capsys) -> tuple[int, str]:
    """Run a script's __main__ in this process (no interpreter start-up); returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    threads = torch.get_num_threads()  # a training script sets the CPU threads: keep this worker's (conftest)
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, word", [
    (["--per-label", "0"], "per-label"),
    (["--guidance", "-1"], "guidance"),
    (["--guidance", "nan"], "guidance"),
    (["--steps", "0"], "steps"),
    (["--steps", "101"], "steps"),
    (["--eta", "-1", "--sampler", "ddim"], "eta"),
    (["--guidance-interval", "50", "10"], "guidance_interval"),
    (["--guidance-interval", "0", "100"], "guidance_interval"),
])
def test_sample_bad_options(trained_runs, tmp_path, monkeypatch, capsys, args, word):
    code, err = run_script_in_process("sample.py", ["--model", trained_runs["ldm"], "--labels", "1", "--out",
                                                    tmp_path / "x.png", "--device", "cpu", *args], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    assert not (tmp_path / "x.png").exists()


def test_sample_missing_model(tmp_path):
    proc = run_cmd([PY, REPO / "sample.py", "--model", tmp_path / "nope", "--out", tmp_path / "x.png"], check=False)
    _assert_one_line_error(proc, "nope")


def test_train_vae_unknown_override(tmp_path, mnist_dir):
    proc = run_cmd([PY, REPO / "train_vae.py", "--out", tmp_path / "v", "--data-dir", mnist_dir, "--set", "model.bogus=1"],
                   check=False)
    _assert_one_line_error(proc, "bogus")
    assert proc.returncode == 2
    proc = run_cmd(accelerate_launch("train_vae.py", "--out", tmp_path / "v", "--data-dir", mnist_dir,
                                     "--set", "model.bogus=1"), check=False)
    _assert_one_line_error(proc, "bogus", launcher=True)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("args, word", [
    (["--set", "train.steps=many"], "train.steps"),
    (["--set", "train.steps"], "train.steps"),
    (["--set", "model.groups=3"], "divisible"),
    (["--config", "nonexistent"], f"unknown preset 'nonexistent'; choose one of {' | '.join(presets('vae'))}"),
])
def test_train_vae_bad_config(tmp_path, monkeypatch, capsys, args, word):
    code, err = run_script_in_process("train_vae.py", ["--out", tmp_path / "v", *args], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("script, stage", [("train_vae.py", "vae"), ("train_ldm.py", "ldm"), ("distill_ldm.py", "distill")])
def test_help_and_a_preset_typo_list_every_preset(script, stage, tmp_path, monkeypatch, capsys):
    """The presets are the files in configs/: --help and the error for an unknown name list them all."""
    names = " | ".join(sorted(p.stem.split("_", 1)[1] for p in (REPO / "configs").glob(f"{stage}_*.yaml")))
    assert len(names.split(" | ")) >= 2
    code, err = run_script_in_process(script, ["--config", "quik", "--out", tmp_path / "x"], monkeypatch, capsys)
    assert code == 2 and f"unknown preset 'quik'; choose one of {names}" in err
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps the help text at the terminal's width
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert f"preset name: {names} (default: quick)" in capsys.readouterr().out


def test_train_vae_missing_data(tmp_path):
    proc = run_cmd([PY, REPO / "train_vae.py", "--out", tmp_path / "v", "--data-dir", tmp_path / "nodata",
                    "--set", "data.download=false"], check=False)
    _assert_one_line_error(proc, "nodata", "data.download=true")


def test_train_ldm_missing_vae(tmp_path, mnist_dir):
    proc = run_cmd([PY, REPO / "train_ldm.py", "--vae", tmp_path / "novae", "--out", tmp_path / "l", "--data-dir",
                    mnist_dir], check=False)
    _assert_one_line_error(proc, "novae")
    assert not (tmp_path / "l").exists()


def test_train_ldm_latent_mismatch(trained_runs, tmp_path, mnist_dir):
    proc = run_cmd([PY, REPO / "train_ldm.py", "--vae", trained_runs["vae"], "--out", tmp_path / "l", "--data-dir",
                    mnist_dir, *as_set_args(LDM_SET + ["model.sample_size=5"])], check=False)
    _assert_one_line_error(proc, "model.sample_size=5 conflicts with the VAE", "latents are (4, 7, 7)",
                           "drop the model.sample_size setting")
    assert not (tmp_path / "l").exists()


def test_train_ldm_follows_a_non_default_vae(mnist_dir, tmp_path, monkeypatch, capsys):
    """A VAE with 8 latent channels and two levels (14x14 latents): train_ldm needs no extra flags, then samples."""
    vae_dir, ldm_dir = tmp_path / "vae", tmp_path / "ldm"
    fast = ["train.steps=2", "train.checkpoint_every=0", "train.preview_every=0"]
    run_cmd([PY, REPO / "train_vae.py", "--out", vae_dir, "--data-dir", mnist_dir,
             *as_set_args(VAE_SET + fast + ["model.channels=[8,16]", "model.latent_channels=8"])])
    assert VAE.from_pretrained(vae_dir).latent_shape == (8, 14, 14)
    run_cmd([PY, REPO / "train_ldm.py", "--vae", vae_dir, "--out", ldm_dir, "--data-dir", mnist_dir,
             *as_set_args(LDM_SET + fast)])
    pipe = LatentDiffusion.from_pretrained(ldm_dir)
    assert (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == (8, 14)  # the saved UNet holds the numbers
    assert load_config(LDMRunConfig, ldm_dir / "run.yaml").model.in_channels is None  # run.yaml keeps "follow the VAE"
    images = pipe.generate([0, 9], steps=2, seed=0)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    # An explicit setting that disagrees with the VAE is still an error, naming the fix.
    code, err = run_script_in_process("train_ldm.py", ["--vae", vae_dir, "--out", tmp_path / "l2", "--data-dir", mnist_dir,
                                                       *as_set_args(LDM_SET + fast + ["model.in_channels=4"])],
                                      monkeypatch, capsys)
    err = "".join(ln for ln in err.splitlines(keepends=True) if not ln.startswith("CPU threads:"))  # the run's log line
    assert code == 2 and err.count("\n") == 1, err
    assert "model.in_channels=4 conflicts" in err and "(8, 14, 14)" in err and "set it to 8" in err
    assert not (tmp_path / "l2").exists()


@pytest.mark.parametrize("args, word", [
    (["--out", "{tmp}"], "is a folder; pass a file name, e.g. --out {tmp}/out.png"),  # was 'unknown file extension: ', after sampling
    (["--out", "{tmp}/grid"], "PIL writes no image format with no extension"),
    (["--out", "{tmp}/grid.xyz"], "the extension .xyz"),
    (["--npz", "{tmp}"], "--npz {tmp} is a folder"),
    (["--device", "nosuch"], "device 'nosuch' is not a device"),  # was torch's RuntimeError traceback
    (["--seed", str(2**70)], "seed must be an integer in"),  # was OverflowError: int too big to convert
    (["--model", "{tmp}/ldm/config.json"], "is a file, not a folder"),
])
def test_sample_bad_outputs_and_devices_fail_before_sampling(tmp_path, monkeypatch, capsys, args, word):
    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = run_script_in_process("sample.py", ["--model", tmp_path / "ldm", "--labels", "1", "--per-label", "1",
                                                    "--steps", "1", *args], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert word.replace("{tmp}", str(tmp_path)) in err, err


def test_sample_npz_goes_where_it_says(tmp_path, monkeypatch, capsys):
    """--npz in a folder that does not exist yet is made like --out's (it failed after sampling); the name printed is
    the file numpy writes (it adds .npz)."""
    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--model", str(tmp_path / "ldm"), "--labels", "1", "--per-label", "1",
                                      "--steps", "1", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "new" / "s")])
    runpy.run_path(str(REPO / "sample.py"), run_name="__main__")
    assert f"wrote {tmp_path / 'new' / 's.npz'}" in capsys.readouterr().out
    assert np.load(tmp_path / "new" / "s.npz")["images"].shape == (1, 28, 28)


def test_train_vae_out_a_file_is_one_line(tmp_path, mnist_dir, monkeypatch, capsys):
    (tmp_path / "afile").write_text("mine")
    code, err = run_script_in_process("train_vae.py", ["--out", tmp_path / "afile", "--data-dir", mnist_dir,
                                                       *as_set_args(VAE_SET)], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "is a file or lies under one" in errors[0] and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "mine"


def test_train_ldm_overwrite_never_deletes_its_own_vae(tmp_path, mnist_dir, monkeypatch, capsys):
    """--vae runs/ldm/vae --out runs/ldm --overwrite cleared runs/ldm, the VAE with it, before training."""
    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    before = sorted(p.name for p in (tmp_path / "ldm").rglob("*"))
    code, err = run_script_in_process("train_ldm.py", ["--vae", tmp_path / "ldm" / "vae", "--out", tmp_path / "ldm",
                                                       "--overwrite", "--data-dir", mnist_dir, *as_set_args(LDM_SET)],
                                      monkeypatch, capsys)
    assert code == 2 and "which --overwrite clears before training" in err, err
    assert sorted(p.name for p in (tmp_path / "ldm").rglob("*")) == before
