"""Few-step students (distill.py, issue 16): the student starts as its teacher, the LCD loss, the lcm sampler,
the student's pipeline and its run folder (resume, lock, bad teachers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import (REPO, accelerate_launch, as_set_args, kill_when, run_cmd, single_point_oracle, tiny_pipeline,
                      tiny_unet)
from safetensors.torch import load_file

from latentdiff import LatentDiffusion, UNet
from latentdiff.checkpoint import checkpoint_dir
from latentdiff.diffusion import make_schedule, q_sample
from latentdiff.distill import DistillConfig, lcd_loss, make_student, solver_grid
from latentdiff.errors import ModelLoadError
from latentdiff.sampling import Denoiser, consistency_x0, lcm
from latentdiff.serialization import CONFIG_NAME
from latentdiff.timesteps import make_timesteps

T = 100
# A tiny distillation run of the conftest's tiny LDM (T = 100): checkpoints at steps 2, 4 and the final 5.
DISTILL_SET = ["train.steps=5", "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1",
               "train.preview_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=3", "distill.solver_steps=10",
               "sample.steps=2", "data.download=false"]


def _student_pipe(seed: int = 0) -> LatentDiffusion:
    """A tiny pipeline whose UNet is a student with a non-zero guidance embedding."""
    pipe = tiny_pipeline(seed)
    student = make_student(pipe.unet)
    torch.manual_seed(seed)
    for p in student.guidance_embed.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sample = replace(pipe.config.sample, sampler="lcm", spacing="trailing", steps=2)
    return LatentDiffusion(student, pipe.vae, replace(pipe.config, sample=sample))


# ------------------------------------------------------------------------------------------ the method
def test_fresh_student_equals_its_teacher_at_every_guidance_scale():
    teacher = tiny_unet(3)
    student = make_student(teacher).eval()
    x, t, y = torch.randn(4, 4, 7, 7), torch.tensor([0, 10, 50, 99]), torch.tensor([0, 3, 9, 10])
    want = teacher(x, t, y)
    for w in (0.0, 1.0, 2.5, 7.0):
        assert torch.equal(student(x, t, y, torch.full((4,), w)), want)
    assert student.config.guidance_input and not teacher.config.guidance_input


def test_guidance_input_is_required_by_a_student_only():
    teacher = tiny_unet(0)
    x, t, y = torch.randn(2, 4, 7, 7), torch.tensor([5, 6]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="distilled student: pass its guidance scale"):
        make_student(teacher)(x, t, y)
    with pytest.raises(ValueError, match="does not take a guidance scale"):
        teacher(x, t, y, torch.ones(2))


def test_unet_config_without_guidance_input_loads(tmp_path):
    """Folders saved before the option existed load as plain UNets."""
    tiny_unet(0).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    del data["guidance_input"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    assert UNet.from_pretrained(tmp_path).config.guidance_input is False


def test_guidance_embed_scale_is_saved_and_older_students_load_with_1000(tmp_path):
    student = make_student(tiny_unet(0), guidance_embed_scale=10.0).eval()
    torch.nn.init.normal_(student.guidance_embed[-1].weight, std=0.1)
    student.save_pretrained(tmp_path)
    x, t, y, w = torch.randn(2, 4, 7, 7), torch.tensor([5, 60]), torch.tensor([1, 2]), torch.tensor([1.5, 1.6])
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config.guidance_embed_scale == 10.0 and torch.equal(loaded(x, t, y, w), student(x, t, y, w))
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    del data["guidance_embed_scale"]  # a student saved before the option: sinusoids of 1000 w
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    old = UNet.from_pretrained(tmp_path)
    assert old.config.guidance_embed_scale == 1000.0 and not torch.equal(old(x, t, y, w), student(x, t, y, w))


def test_consistency_boundary_and_lcm_sampler_with_ansingle_point_oracle():
    abar = make_schedule("cosine", T).float()
    x0, noise = torch.randn(3, 4, 7, 7), torch.randn(3, 4, 7, 7)
    zero = torch.zeros(3, dtype=torch.long)
    assert torch.equal(consistency_x0(torch.randn(3, 4, 7, 7), x0, zero), x0)  # f(x, 0) = x
    for steps in (1, 2, 4):  # trailing: a last step at t = 0 would return its noisy input (the boundary condition)
        out = lcm(Denoiser(single_point_oracle(x0, abar), abar, "v"), q_sample(x0, torch.full((3,), T - 1), noise, abar),
                  make_timesteps(abar, steps, "trailing"), lambda i: torch.randn(3, 4, 7, 7))
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_lcd_loss_vanishes_for_an_exact_student_of_an_exact_teacher():
    abar = make_schedule("cosine", T).float()
    x0, y, seeds = torch.randn(8, 4, 7, 7), torch.randint(0, 10, (8,)), torch.arange(8)
    grid = solver_grid(abar, 10)
    assert grid[0][0] == T - 1 and grid[1][-1] == 0 and torch.equal(grid[1][:-1], grid[0][1:])
    oracle = single_point_oracle(x0, abar)
    dc = DistillConfig(solver_steps=10)
    exact, _ = lcd_loss(oracle, oracle, oracle, x0, y, seeds, abar, grid, dc, "v", 10)
    assert exact < 1e-3  # not 0: a pair ending at s = 0 keeps the sqrt(1 - abar_0) noise there (f(x, 0) = x)
    wrong, _ = lcd_loss(lambda *a: torch.zeros_like(a[0]), oracle, oracle, x0, y, seeds, abar, grid, dc, "v", 10)
    assert wrong > 0.1


def test_pseudo_huber_loss_is_per_example_and_tends_to_half_mse_over_c():
    """huber_c > 0: mean over examples of sqrt(mse_i + c^2) - c (the preset's c = 0.001, LCM's); large c -> mse / 2c."""
    abar = make_schedule("cosine", T).float()
    x0, y, seeds = torch.randn(8, 4, 7, 7), torch.randint(0, 10, (8,)), torch.arange(8)
    grid, oracle = solver_grid(abar, 10), single_point_oracle(x0, abar)
    zero = lambda *a: torch.zeros_like(a[0])  # noqa: E731
    mse, _ = lcd_loss(zero, oracle, oracle, x0, y, seeds, abar, grid, DistillConfig(solver_steps=10), "v", 10)
    big = 30.0
    huge, _ = lcd_loss(zero, oracle, oracle, x0, y, seeds, abar, grid, DistillConfig(solver_steps=10, huber_c=big), "v", 10)
    torch.testing.assert_close(huge * 2 * big, mse, rtol=1e-2, atol=0)
    small, _ = lcd_loss(zero, oracle, oracle, x0, y, seeds, abar, grid, DistillConfig(solver_steps=10, huber_c=1e-3), "v", 10)
    assert small > mse.sqrt() * 0.5  # about the mean per-example RMS: far larger than the MSE of O(0.1) errors


def test_lcd_loss_has_gradients_only_through_the_student():
    abar = make_schedule("cosine", T).float()
    teacher = tiny_unet(1)
    student, target_net = make_student(teacher), make_student(teacher).requires_grad_(False)
    x0, y = torch.randn(4, 4, 7, 7), torch.randint(0, 10, (4,))
    loss, _ = lcd_loss(student, target_net, teacher.requires_grad_(False), x0, y, torch.arange(4), abar,
                       solver_grid(abar, 10), DistillConfig(), "v", 10)
    loss.backward()
    assert student.guidance_embed[-1].weight.grad.abs().sum() > 0  # the zero-initialised w path learns
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ the student's pipeline
def test_student_pipeline_samples_with_its_guidance_knob(tmp_path):
    pipe = _student_pipe()
    pipe.save_pretrained(tmp_path / "student")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "student")
    a = loaded.generate([1, 2, 3, 4], seed=5)
    assert a.shape == (4, 1, 28, 28) and torch.isfinite(a).all()
    assert torch.equal(a[2:], loaded.generate([3, 4], seed=7, batch_size=1))  # sample i uses seed + i, whatever the batch
    assert not torch.equal(a, loaded.generate([1, 2, 3, 4], seed=5, guidance_scale=1.0))  # w is an input (default 3)
    calls = []
    loaded.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loaded.tile_size = 3  # one tile holds the batch: a doubled (CFG) batch would be two calls a step
    loaded.generate([1, 2, 3], seed=0)
    assert calls == [3, 3]  # 2 steps, one undoubled batch each


@pytest.mark.parametrize("kwargs, word", [({"sampler": "dpm++"}, "needs the teacher"),
                                          ({"sampler": "ddim", "eta": 0.5}, "eta > 0 needs the teacher"),
                                          ({"guidance_interval": [10, 50]}, "guidance_interval needs the teacher")])
def test_student_refuses_teacher_only_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        _student_pipe().generate([1], seed=0, **kwargs)


def test_student_samples_with_deterministic_ddim():
    """A progressive student (distill.method: progressive) samples with DDIM, eta 0: one undoubled batch per step."""
    pipe = _student_pipe()
    pipe.tile_size = 2  # one tile holds the batch: a doubled (CFG) batch would be two calls a step
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    a = pipe.generate([1, 7], seed=0, sampler="ddim", steps=4)
    assert calls == [2] * 4 and torch.isfinite(a).all()
    assert torch.equal(a[1:], pipe.generate([7], seed=1, sampler="ddim", steps=4))  # sample i: seed + i
    assert not torch.equal(a, pipe.generate([1, 7], seed=0, sampler="lcm", steps=4))


def test_evaluate_counts_one_unet_row_per_student_step():
    from latentdiff.evaluate.score import rows_per_digit

    student, teacher = _student_pipe(), tiny_pipeline(0)
    settings = {"steps": 4, "spacing": "trailing", "guidance_scale": 1.5, "guidance_interval": None,
                "autoguidance_scale": 1.0}
    assert rows_per_digit(student, settings) == 4 and rows_per_digit(teacher, settings) == 8


def test_student_accepts_the_every_step_interval():
    """[0, T-1] is "every step" (what evaluate records for the default), which is how a student is guided."""
    pipe = _student_pipe()
    assert torch.equal(pipe.generate([1, 7], seed=0), pipe.generate([1, 7], seed=0, guidance_interval=[0, T - 1]))


# ------------------------------------------------------------------------------------------ the run folder
def test_a_taught_adapter_is_refused_as_a_teacher(tmp_path):
    """teach.py's folder loads as an 11-class pipeline whose UNet the student cannot copy: it used to fail with an
    AssertionError traceback in make_student after claiming --out."""
    from latentdiff.distill import load_teacher
    from latentdiff.teach import save_adapter

    base = tiny_pipeline()
    base.save_pretrained(tmp_path / "ldm")
    save_adapter(tmp_path / "ldm_star", tmp_path / "ldm", ["star"], base.unet.class_embed.weight[:1].detach())
    with pytest.raises(ModelLoadError, match=r"taught-classes adapter .* distil its base LDM \(.*ldm\)"):
        load_teacher(tmp_path / "ldm_star")


def _distill(teacher: Path, out: Path, *extra, env: dict | None = None, check: bool = True):
    return run_cmd([sys.executable, REPO / "distill_ldm.py", "--teacher", teacher, "--out", out,
                    *as_set_args(DISTILL_SET), *extra], env=env, check=check)


@pytest.mark.slow
def test_distill_script_writes_a_student_folder(trained_runs, mnist_dir, tmp_path):
    out = tmp_path / "fast"
    run_cmd(accelerate_launch("distill_ldm.py", "--teacher", trained_runs["ldm"], "--out", out, "--data-dir", mnist_dir,
                              *as_set_args(DISTILL_SET)))
    pipe = LatentDiffusion.from_pretrained(out)
    assert pipe.unet.config.guidance_input and pipe.config.sample.sampler == "lcm" and pipe.config.sample.steps == 2
    assert pipe.generate([0, 5], seed=0).shape == (2, 1, 28, 28)
    assert (out / "previews" / "final.png").is_file() and (out / "loss.png").is_file()
    proc = run_cmd([sys.executable, REPO / "sample.py", "--model", out, "--labels", "1", "2", "--per-label", "2",
                    "--out", tmp_path / "s.png"])
    assert "wrote 4 samples" in proc.stdout
    bad = run_cmd([sys.executable, REPO / "sample.py", "--model", out, "--sampler", "dpm++", "--out", tmp_path / "x.png"],
                  check=False)
    assert bad.returncode == 2 and "needs the teacher" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_distill_sigkill_then_resume_is_exact(trained_runs, mnist_dir, tmp_path):
    args = ["--data-dir", str(mnist_dir)]
    _distill(trained_runs["ldm"], tmp_path / "straight", *args)
    # SIGKILL from outside once the checkpoint of step 2 is on disk: the kill lands wherever the run has got to.
    killed = kill_when([sys.executable, REPO / "distill_ldm.py", "--teacher", trained_runs["ldm"], "--out",
                        tmp_path / "killed", *as_set_args(DISTILL_SET), *args], checkpoint_dir(tmp_path / "killed", 2))
    assert killed.returncode in (-9, 0), killed.stderr[-2000:]  # 0: it finished before the kill landed
    if killed.returncode == -9:
        assert not (tmp_path / "killed" / CONFIG_NAME).exists()
    resumed = _distill(trained_runs["ldm"], tmp_path / "killed", *args, "--resume", "latest")
    assert "resuming from" in resumed.stdout + resumed.stderr
    for sub in ("checkpoints/step_00000005/model.safetensors", "checkpoints/step_00000005/ema.safetensors",
                "checkpoints/step_00000005/optimizer.safetensors", "unet/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / sub)), load_file(str(tmp_path / "killed" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


@pytest.mark.slow
def test_bad_teachers_and_a_held_folder_get_one_line_errors(trained_runs, mnist_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(trained_runs["ldm"] / "run.yaml", unfinished / "run.yaml")
    cases = [(trained_runs["vae"], "not an LDM run folder"), (tmp_path / "nope", "does not exist"),
             (unfinished, "unfinished training run"), (tmp_path / "out", "is the teacher's folder")]
    for teacher, word in cases:
        proc = _distill(teacher, tmp_path / "out", "--data-dir", mnist_dir, check=False)
        assert proc.returncode == 2 and word in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len([ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("CPU threads:")]) == 1, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was written for a refused teacher
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from latentdiff.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(tmp_path / "held")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _distill(trained_runs["ldm"], tmp_path / "held", "--data-dir", mnist_dir, check=False)
        assert proc.returncode == 2 and "in use by another training run" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
