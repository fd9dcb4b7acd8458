"""Guided progressive distillation (progressive.py, ``distill.method: progressive``): the grids and the one-step
target, the loss, and the run (stage folders, exact resume across a stage boundary, config errors)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, as_killed_after, as_set_args, run_cmd, single_point_oracle, tiny_unet
from safetensors.torch import load_file

from latentdiff import LatentDiffusion
from latentdiff.config import load_config
from latentdiff.diffusion import make_schedule, predict_x0_eps
from latentdiff.distill import DistillRunConfig, make_student
from latentdiff.errors import ConfigError
from latentdiff.progressive import ddim_to, one_step_target, progressive_loss, stage_grids
from latentdiff.serialization import CONFIG_NAME

T = 100
# The conftest's tiny LDM (T = 100) through 2 stages of 2 steps: 8 -> 4 -> 2 DDIM steps, a checkpoint every step.
PD_SET = ["distill.method=progressive", "distill.solver_steps=8", "distill.stages=2", "sample.sampler=ddim",
          "sample.spacing=trailing", "sample.steps=2", "train.steps=4", "train.batch_size=16", "train.warmup_steps=1",
          "train.log_every=1", "train.preview_every=0", "train.checkpoint_every=1", "train.keep_checkpoints=10",
          "train.ema_decay=0.9", "data.download=false"]


# ------------------------------------------------------------------------------------------ the method
def test_stage_grids_halve_and_nest():
    abar = make_schedule("cosine", T).float()
    for stage, (n_teacher, n_student) in enumerate([(32, 16), (16, 8), (8, 4), (4, 2)], start=1):
        teacher, student = stage_grids(abar, 32, stage)
        assert len(teacher) == n_teacher + 1 and len(student) == n_student + 1  # + the end, -1
        assert teacher[0] == T - 1 and teacher[-1] == -1 and torch.equal(teacher[::2], student)
        assert (teacher[:-2] > teacher[1:-1]).all()  # noisiest first, strictly decreasing


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_one_step_target_lands_exactly_where_asked(prediction):
    """A DDIM step from (x_t, t) with the target output lands on x_s, for s inside the grid and at the end."""
    abar = make_schedule("cosine", T).float()
    x_t, x_s = torch.randn(4, 4, 7, 7), torch.randn(4, 4, 7, 7)
    t, s = torch.tensor([99, 60, 30, 12]), torch.tensor([70, 30, -1, -1])
    out = one_step_target(abar, x_t, t, x_s, s, prediction)
    x0, eps = predict_x0_eps(out, x_t, abar[t], prediction)
    torch.testing.assert_close(ddim_to(abar, s, x0, eps), x_s, atol=1e-4, rtol=1e-4)


def test_progressive_loss_vanishes_for_an_exact_model_and_not_for_a_wrong_one():
    """With one data point, DDIM is exact: one step of the exact model lands where two of the (guided) teacher do."""
    abar = make_schedule("cosine", T).float()
    x0, y, seeds = torch.randn(8, 4, 7, 7), torch.randint(0, 10, (8,)), torch.arange(8)
    oracle = single_point_oracle(x0, abar)
    for stage in (1, 2):
        grids = stage_grids(abar, 8, stage)
        exact, _ = progressive_loss(oracle, oracle, stage == 1, x0, y, seeds, abar, grids, (1.0, 3.0), "v", 10)
        assert exact < 1e-6
        wrong, _ = progressive_loss(lambda *a: torch.zeros_like(a[0]), oracle, stage == 1, x0, y, seeds, abar, grids,
                                    (1.0, 3.0), "v", 10)
        assert wrong > 0.1


def test_progressive_loss_trains_the_student_only():
    abar = make_schedule("cosine", T).float()
    teacher = tiny_unet(1).requires_grad_(False)
    student = make_student(teacher).requires_grad_(True)
    x0, y = torch.randn(4, 4, 7, 7), torch.randint(0, 10, (4,))
    loss, _ = progressive_loss(student, teacher, True, x0, y, torch.arange(4), abar, stage_grids(abar, 8, 1),
                               (1.0, 3.0), "v", 10)
    loss.backward()
    assert student.guidance_embed[-1].weight.grad.abs().sum() > 0  # the w input learns (the teacher's w varies)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("overrides, word", [
    (["distill.method=progressive"], "set sample.sampler=ddim"),
    (["distill.method=progressive", "sample.sampler=ddim", "sample.steps=4"], "set sample.steps=2"),
    (["distill.method=progressive", "distill.solver_steps=20"], r"must be divisible by 2\^stages"),
    (["distill.method=progressive", "sample.sampler=ddim", "sample.steps=2", "train.steps=2401"],
     "divisible by distill.stages"),
    (["distill.method=consistency"], "distill.method must be lcd or progressive"),
    (["distill.method=progressive", "sample.sampler=ddim", "sample.steps=2", "distill.stage_steps=[100, 100]"],
     "one positive step count per stage"),
    (["distill.method=progressive", "sample.sampler=ddim", "sample.steps=2", "train.steps=2401",
      "distill.stage_steps=[1000, 600, 400, 400]"], "sums to 2400, not train.steps=2401"),
    (["distill.stage_steps=[1, 1, 1, 1]"], "for method=progressive only")])
def test_progressive_config_errors_name_the_fix(overrides, word):
    base = ["distill.solver_steps=32", "distill.stages=4"]
    with pytest.raises(ConfigError, match=word):
        load_config(DistillRunConfig, REPO / "configs" / "distill_quick.yaml", base + overrides)


def test_the_progressive_preset_loads():
    cfg = load_config(DistillRunConfig, REPO / "configs" / "distill_progressive.yaml", [])
    assert cfg.distill.method == "progressive" and cfg.distill.student_steps == cfg.sample.steps == 4
    assert cfg.train.steps // cfg.distill.stages % cfg.train.checkpoint_every == 0  # a checkpoint on every boundary


# ------------------------------------------------------------------------------------------ the run
def _pd(teacher: Path, out: Path, mnist_dir: Path, *extra, env: dict | None = None, check: bool = True):
    return run_cmd([sys.executable, REPO / "distill_ldm.py", "--teacher", teacher, "--out", out, "--data-dir", mnist_dir,
                    *as_set_args(PD_SET), *extra], env=env, check=check)


def _same(a: Path, b: Path, sub: str) -> None:
    x, y = load_file(str(a / sub)), load_file(str(b / sub))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub


@pytest.mark.slow
def test_stage_steps_move_the_stage_boundary(trained_runs, mnist_dir, tmp_path):
    """distill.stage_steps=[3, 1]: stage 1 runs 3 steps, then stage 2 saves nothing more and restarts its warm-up."""
    run = tmp_path / "uneven"
    _pd(trained_runs["ldm"], run, mnist_dir, "--set", "distill.stage_steps=[3,1]", "--set", "train.warmup_steps=2")
    assert (run / "stages" / "4_steps" / CONFIG_NAME).is_file()
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = load_config(DistillRunConfig, REPO / "configs" / "distill_quick.yaml", PD_SET).train.lr
    assert lrs[0] == lrs[3] == pytest.approx(lr / 2) and lrs[1] > lrs[0]  # steps 0 and 3 each start a warm-up
    # the stage-1 student is the EMA after step 3: the same weights as checkpoint 3's target network
    ckpt = load_file(str(run / "checkpoints" / "step_00000003" / "ema.safetensors"))
    stage1 = load_file(str(run / "stages" / "4_steps" / "unet" / "model.safetensors"))
    assert all(torch.equal(stage1[k], ckpt[k]) for k in stage1)


@pytest.mark.slow
def test_progressive_run_saves_every_stage_and_resumes_exactly(trained_runs, mnist_dir, tmp_path):
    straight = tmp_path / "straight"
    _pd(trained_runs["ldm"], straight, mnist_dir)
    final, stage1 = LatentDiffusion.from_pretrained(straight), LatentDiffusion.from_pretrained(straight / "stages" / "4_steps")
    assert (final.config.sample.sampler, final.config.sample.steps, stage1.config.sample.steps) == ("ddim", 2, 4)
    assert final.unet.config.guidance_input and final.generate([0, 5], seed=0).shape == (2, 1, 28, 28)
    assert not (straight / "stages" / "2_steps").exists()  # the last stage's student is the run folder itself
    proc = run_cmd([sys.executable, REPO / "sample.py", "--model", straight, "--labels", "1", "2", "--per-label", "1",
                    "--out", tmp_path / "s.png"])
    assert "wrote 2 samples" in proc.stdout
    # Killed inside stage 2 (its teacher comes back from stages/4_steps) and on the stage boundary itself: the
    # uninterrupted run cut back to what a kill right after those checkpoints leaves (stages/4_steps is saved at 2).
    for kill_at in (3, 2):
        run = tmp_path / f"killed{kill_at}"
        shutil.copytree(straight, run)
        as_killed_after(run, kill_at)
        resumed = _pd(trained_runs["ldm"], run, mnist_dir, "--resume", "latest")
        assert f"at step {kill_at}" in resumed.stdout + resumed.stderr
        for sub in ("unet/model.safetensors", "stages/4_steps/unet/model.safetensors",
                    "checkpoints/step_00000004/optimizer.safetensors", "checkpoints/step_00000004/model.safetensors"):
            _same(straight, run, sub)
    # A resume that would move the stage boundaries, and one inside stage 2 whose teacher is gone: one line each.
    run = tmp_path / "killed3"
    bad = _pd(trained_runs["ldm"], run, mnist_dir, "--resume", "latest", "--set", "train.steps=6", check=False)
    assert bad.returncode == 2 and "resume with train.steps=4" in bad.stderr and "Traceback" not in bad.stderr
    for p in sorted((run / "stages").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    bad = _pd(trained_runs["ldm"], run, mnist_dir, "--resume", str(run / "checkpoints" / "step_00000003"), check=False)
    assert bad.returncode == 2 and "stage 1's student) is missing" in bad.stderr and "Traceback" not in bad.stderr
    assert (run / CONFIG_NAME).is_file()  # the finished model from before is still there
