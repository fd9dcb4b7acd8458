"""Exact resume after SIGKILL, safe checkpoints, non-finite loss, refusing to clobber runs (issue 4)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

TINY_VAE = ["model.channels=[8,16,16]", "model.groups=4", "model.num_res_blocks=1"]
TINY_UNET = ["model.channels=[16,32]", "model.groups=4", "model.num_heads=2", "model.num_res_blocks=1"]
COMMON = ["train.batch_size=8", "train.grad_accum=2", "train.warmup_steps=2", "train.log_every=2",
          "train.checkpoint_every=3", "train.preview_every=0", "train.keep_checkpoints=2"]


def _write_idx(folder: Path, n: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):  # a bar whose position encodes the class, plus noise
        images[i, 4 + 2 * c: 6 + 2 * c, 4:24] = 255
        images[i] |= (rng.random((28, 28)) < 0.05).astype(np.uint8) * 128
    for prefix in ("train", "t10k"):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("idx")
    _write_idx(d)
    return d


def _run(script: str, args: list[str], env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimizer tensors of the newest checkpoint, plus its step."""
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    last = ckpts[-1]
    out = {f"model/{k}": v for k, v in load_file(str(last / "model.safetensors")).items()}
    if (last / "ema.safetensors").is_file():
        out.update({f"ema/{k}": v for k, v in load_file(str(last / "ema.safetensors")).items()})
    out.update({f"opt/{k}": v for k, v in load_file(str(last / "optimizer.safetensors")).items()})
    out["step"] = torch.tensor(json.loads((last / "state.json").read_text())["step"])
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (max diff {(a[k].float() - b[k].float()).abs().max()})"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_sigkill_then_resume_is_exact(stage, data_dir, tmp_path):
    """A run SIGKILLed after a checkpoint and resumed ends bit-identical to an uninterrupted run."""
    steps = ["train.steps=7", "train.checkpoint_every=3"]  # final checkpoint is the one written at step 6
    if stage == "vae":
        script, base = "train_vae.py", TINY_VAE
        extra: list[str] = []
    else:
        vae = tmp_path / "vae"
        _run("train_vae.py", ["--data-dir", str(data_dir), "--out", str(vae), *_sets(TINY_VAE + COMMON + ["train.steps=2"])])
        script, base, extra = "train_ldm.py", TINY_UNET, ["--vae", str(vae)]
    args = ["--data-dir", str(data_dir), *extra, *_sets(base + COMMON + steps)]
    _run(script, [*args, "--out", str(tmp_path / "straight")])

    killed = _run(script, [*args, "--out", str(tmp_path / "killed")], {"LATENTDIFF_TEST_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "config.json").exists()  # no final model from a killed run
    resumed = _run(script, [*args, "--out", str(tmp_path / "killed"), "--resume", "latest"])
    assert "resuming from" in resumed.stdout + resumed.stderr
    _assert_same(_final_state(tmp_path / "straight"), _final_state(tmp_path / "killed"))
    # The final saved models match too, and the metrics log has no duplicated steps.
    sub = "unet/" if stage == "ldm" else ""
    a = load_file(str(tmp_path / "straight" / sub / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / sub / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))


@pytest.mark.slow
def test_checkpoints_rotate_and_partial_checkpoint_is_ignored(data_dir, tmp_path):
    run = tmp_path / "run"
    _run("train_vae.py", ["--data-dir", str(data_dir), "--out", str(run), *_sets(TINY_VAE + COMMON + ["train.steps=10", "train.checkpoint_every=2"])])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000006", "step_00000008"]  # keep_checkpoints=2; none at the final step (the model is saved)
    # A checkpoint whose write was interrupted (temporary folder, or no state.json) is never picked up.
    (run / "checkpoints" / ".tmp-step_00000009").mkdir()
    (run / "checkpoints" / "step_00000009").mkdir()
    from latentdiff.checkpoint import resolve_resume
    assert resolve_resume(run, "latest").name == "step_00000008"


@pytest.mark.slow
def test_refuses_to_overwrite_another_run(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--out", str(run), *_sets(TINY_VAE + COMMON + ["train.steps=2"])]
    _run("train_vae.py", args)
    before = (run / "model.safetensors").read_bytes()
    again = _run("train_vae.py", args, check=False)
    assert again.returncode == 2 and "already holds another run" in again.stderr and "Traceback" not in again.stderr
    assert (run / "model.safetensors").read_bytes() == before
    # A resume with a setting that matters changed is refused; the saved run is untouched.
    changed = _run("train_vae.py", [*args, "--resume", "latest", "--set", "train.lr=0.5"], check=False)
    assert changed.returncode == 2 and "train.lr" in changed.stderr
    assert (run / "model.safetensors").read_bytes() == before
    # A folder with unrelated files is never deleted, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = _run("train_vae.py", ["--data-dir", str(data_dir), "--out", str(other), "--overwrite", *_sets(TINY_VAE + COMMON)], check=False)
    assert refused.returncode == 2 and (other / "notes.txt").read_text() == "mine"
    # --overwrite replaces a previous run.
    _run("train_vae.py", [*args, "--overwrite"])


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_saves_nothing(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run("train_vae.py", ["--data-dir", str(data_dir), "--out", str(run),
                                 *_sets(TINY_VAE + COMMON + ["train.steps=12", "train.lr=1e30", "train.grad_clip=0",
                                                             "train.warmup_steps=0", "train.checkpoint_every=1"])], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN/inf at step" in proc.stderr and "Last good checkpoint" in proc.stderr
    assert not (run / "model.safetensors").exists()
    for ckpt in (run / "checkpoints").glob("step_*"):
        for t in load_file(str(ckpt / "model.safetensors")).values():
            assert torch.isfinite(t).all(), f"{ckpt} holds non-finite weights"


def test_no_code_runs_from_files():
    """Weights load through safetensors only; no pickle, torch.load or eval anywhere in the package."""
    for path in (ROOT / "latentdiff").glob("*.py"):
        src = path.read_text()
        for bad in ("torch.load(", "pickle", "eval(", "exec(", "yaml.load(", "importlib"):
            assert bad not in src, f"{path.name} uses {bad}"
