"""Experiment trackers through accelerate (TensorBoard event files) and plain log lines off a terminal (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, as_set_args

import latentdiff.tracking as tracking
from latentdiff import ConfigError
from latentdiff.config import VAERunConfig, apply_overrides
from latentdiff.train import train_vae

TINY = ["train.mixed_precision=null", "model.channels=[8,16,16]", "train.batch_size=8", "train.warmup_steps=1", "data.download=false"]


def test_tracker_names():
    assert tracking.tracker_names(None) == [] and tracking.tracker_names("") == []
    with pytest.raises(ConfigError, match="unknown tracker"):
        tracking.tracker_names("tensorbored")


def test_missing_tracker_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match=r"tensorboard package is not installed; pip install -e '\.\[tensorboard\]'"):
        tracking.tracker_names("tensorboard")
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.tracker_names("wandb")
    with pytest.raises(ConfigError, match="no experiment tracker is installed"):
        tracking.tracker_names("all")


def test_tensorboard_gets_the_scalars_config_and_previews(tmp_path, mnist_dir):
    pytest.importorskip("tensorboard", reason="tensorboard not installed: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = apply_overrides(VAERunConfig(), [f"out_dir={run}", f"data.root={mnist_dir}", "train.steps=6", "train.log_every=2",
                                           "train.preview_every=3", "train.checkpoint_every=0", "train.log_with=tensorboard",
                                           *TINY])
    train_vae(cfg)
    events = EventAccumulator(str(run / tracking.PROJECT))
    events.Reload()
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "images_per_s", "mse", "kl"):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [2, 4, 6], tag  # the log interval, as in metrics.jsonl
        assert [e.value for e in scalars] == pytest.approx([m[tag] for m in logged], rel=1e-6)
    assert [e.step for e in events.Images("preview")] == [3, 6]  # the step-3 preview and the final grid
    hparams = yaml.safe_load(next((run / tracking.PROJECT).rglob("hparams.yml")).read_text())
    assert hparams["train.steps"] == 6 and hparams["model.channels"] == "[8, 16, 16]"  # the flattened run config


def test_log_with_option_fails_before_the_folder_is_touched(tmp_path, mnist_dir):
    from latentdiff.cli import load_run_config, training_parser

    args = training_parser("vae", "").parse_args(["--out", str(tmp_path / "v"), "--data-dir", str(mnist_dir),
                                                  "--log-with", "nosuch", *as_set_args(TINY)])
    cfg = load_run_config(VAERunConfig, args, "vae")
    assert cfg.train.log_with == "nosuch"
    with pytest.raises(ConfigError, match="--log-with nosuch: unknown tracker"):
        train_vae(cfg)
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_plain_log_lines_when_stderr_is_not_a_terminal(tmp_path, mnist_dir):
    """stderr a pipe (CI, nohup, a scheduler): one line per log interval, no carriage-return bar updates."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, REPO / "train_vae.py", "--data-dir", mnist_dir, "--out", tmp_path / "v",
                           *as_set_args(TINY + ["train.steps=12", "train.log_every=3", "train.checkpoint_every=0",
                                                "train.preview_every=0"])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vae step ")]
    assert [ln.split()[2] for ln in lines] == ["3/12", "6/12", "9/12", "12/12"], proc.stderr
    assert all(" loss " in ln and " lr " in ln and " img/s " in ln for ln in lines)
