"""Exact resume after SIGKILL, safe checkpoints, non-finite loss, refusing to clobber runs (issue 4)."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, as_killed_after, as_set_args, kill_when, run_cmd
from latentdiff.checkpoint import checkpoint_dir

TINY_VAE = ["model.channels=[8,16,16]", "model.num_res_blocks=1"]
TINY_UNET = ["model.channels=[16,32]", "model.num_heads=2", "model.num_res_blocks=1", "diffusion.num_timesteps=100", "sample.guidance_interval=[10,80]",
             "sample.steps=4"]
COMMON = ["train.mixed_precision=null", "train.batch_size=8", "train.grad_accum=2", "train.warmup_steps=2", "train.log_every=2",
          "train.checkpoint_every=3", "train.preview_every=0", "train.keep_checkpoints=2", "data.download=false"]


def _run(script: str, args: list, env_extra: dict | None = None, check: bool = True):
    return run_cmd([sys.executable, REPO / script, *args], env=env_extra, check=check)


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
def test_sigkill_then_resume_is_exact(stage, mnist_dir, tmp_path):
    """A run SIGKILLed after a checkpoint and resumed ends bit-identical to an uninterrupted run."""
    steps = ["train.steps=7", "train.checkpoint_every=3", "train.keep_checkpoints=3"]  # checkpoints at 3, 6 and 7
    if stage == "vae":
        script, base = "train_vae.py", TINY_VAE
        extra: list[str] = []
    else:
        vae = tmp_path / "vae"
        _run("train_vae.py", ["--data-dir", str(mnist_dir), "--out", str(vae), *as_set_args(TINY_VAE + COMMON + ["train.steps=2"])])
        script, base, extra = "train_ldm.py", TINY_UNET, ["--vae", str(vae)]
    args = ["--data-dir", str(mnist_dir), *extra, *as_set_args(base + COMMON + steps)]
    _run(script, [*args, "--out", str(tmp_path / "straight")])

    # Killed from outside once the checkpoint of step 3 is on disk: the kill lands wherever the run has got to.
    killed = kill_when([sys.executable, REPO / script, *args, "--out", tmp_path / "killed"],
                       checkpoint_dir(tmp_path / "killed", 3))
    assert killed.returncode in (-9, 0), killed.stderr[-2000:]  # 0: it finished before the kill landed
    if killed.returncode == -9:
        assert not (tmp_path / "killed" / "config.json").exists()  # no final model from a killed run
    # And exactly after step 3 (a copy of the uninterrupted run, cut back to what such a kill leaves).
    shutil.copytree(tmp_path / "straight", tmp_path / "at3")
    as_killed_after(tmp_path / "at3", 3)
    for run in ("killed", "at3"):
        resumed = _run(script, [*args, "--out", str(tmp_path / run), "--resume", "latest"])
        assert "resuming from" in resumed.stdout + resumed.stderr
        _assert_same(_final_state(tmp_path / "straight"), _final_state(tmp_path / run))
        # The final saved models match too, and the metrics log has no duplicated steps.
        sub = "unet/" if stage == "ldm" else ""
        a = load_file(str(tmp_path / "straight" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / run / sub / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        steps_logged = [json.loads(ln)["step"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert steps_logged == sorted(set(steps_logged))
    assert "at step 3" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_checkpoints_rotate_and_partial_checkpoint_is_ignored(mnist_dir, tmp_path):
    run = tmp_path / "run"
    _run("train_vae.py", ["--data-dir", str(mnist_dir), "--out", str(run), *as_set_args(TINY_VAE + COMMON + ["train.steps=10", "train.checkpoint_every=2"])])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000010"]  # keep_checkpoints=2, and one at the final step
    # A checkpoint whose write was interrupted (temporary folder, or no state.json) is never picked up.
    (run / "checkpoints" / ".tmp-step_00000011").mkdir()
    (run / "checkpoints" / "step_00000012").mkdir()
    from latentdiff.checkpoint import resolve_resume
    assert resolve_resume(run, "latest").name == "step_00000010"


@pytest.mark.slow
def test_refuses_to_overwrite_another_run(mnist_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--out", str(run), *as_set_args(TINY_VAE + COMMON + ["train.steps=2"])]
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
    refused = _run("train_vae.py", ["--data-dir", str(mnist_dir), "--out", str(other), "--overwrite", *as_set_args(TINY_VAE + COMMON)], check=False)
    assert refused.returncode == 2 and (other / "notes.txt").read_text() == "mine"
    # --overwrite replaces a previous run.
    _run("train_vae.py", [*args, "--overwrite"])


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_saves_nothing(mnist_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run("train_vae.py", ["--data-dir", str(mnist_dir), "--out", str(run),
                                 *as_set_args(TINY_VAE + COMMON + ["train.steps=12", "train.lr=1e30", "train.grad_clip=0",
                                                             "train.warmup_steps=0", "train.checkpoint_every=1"])], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN/inf at step" in proc.stderr and "Last good checkpoint" in proc.stderr
    assert not (run / "model.safetensors").exists()
    for ckpt in (run / "checkpoints").glob("step_*"):
        for t in load_file(str(ckpt / "model.safetensors")).values():
            assert torch.isfinite(t).all(), f"{ckpt} holds non-finite weights"


def test_no_code_runs_from_files():
    """No pickle, torch.load, eval/exec, unsafe YAML or dynamic imports anywhere in the package."""
    banned_calls = {"torch.load", "eval", "exec", "yaml.load", "yaml.unsafe_load", "importlib.import_module",
                    "__import__", "getattr(globals"}
    banned_modules = {"pickle", "dill", "marshal", "cloudpickle", "importlib"}
    for path in sorted((REPO / "latentdiff").glob("*.py")) + [REPO / "train_vae.py", REPO / "train_ldm.py", REPO / "sample.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not {n.split(".")[0] for n in names} & banned_modules, f"{path.name} imports {names}"
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in banned_calls, f"{path.name}:{node.lineno} calls {name}"
