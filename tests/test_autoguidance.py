"""Autoguidance (Karras et al. 2024): the guide term, the guide model in the pipeline folder, the trainer's snapshot."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, as_killed_after, as_set_args, kill_when, run_cmd, tiny_pipeline, tiny_unet
from latentdiff import ConfigError, LatentDiffusion
from latentdiff import edit
from latentdiff.checkpoint import checkpoint_dir
from latentdiff.config import GuideConfig, LDMRunConfig, apply_overrides
from latentdiff.diffusion import make_schedule
from latentdiff.sampling import Denoiser, dpm_solver_pp_2m, guided, unet_rows
from latentdiff.timesteps import sampling_timesteps


class Linear:
    """model(x, t, y) = x * a(y) + t/100 * b: distinct outputs for distinct models and labels; counts rows."""

    def __init__(self, gain: float):
        self.gain, self.rows = gain, 0

    def __call__(self, x, t, y):
        self.rows += x.shape[0]
        return x * (self.gain + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1).float() / 100


def cfg(model, y, s: float, null: int, interval=None, guide=None, autoguidance_scale: float = 1.0):
    """``guided`` over model(x, t, y) (and a guide of the same kind), as the network function (x, t) -> output."""
    wrap = lambda net: Denoiser(net, make_schedule("cosine", 1000), "v")  # noqa: E731
    return guided(wrap(model), y, s, null, interval, guide and wrap(guide), autoguidance_scale).net


def _xty():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 7, 7, generator=g), torch.full((3,), 500), torch.tensor([1, 4, 7])


@pytest.mark.parametrize("s", [1.0, 0.0, 3.0])
def test_guide_equal_to_the_model_leaves_cfg_unchanged(s):
    """cond - guide = 0 when the guide is the model: autoguidance with itself changes nothing (s = 1: the conditional model)."""
    m = Linear(1.0)
    x, t, y = _xty()
    assert torch.allclose(cfg(m, y, s, 10, guide=m, autoguidance_scale=2.5)(x, t), cfg(m, y, s, 10)(x, t))
    if s == 1.0:
        assert torch.equal(cfg(m, y, 1.0, 10, guide=m, autoguidance_scale=2.5)(x, t), m(x, t, y))


@pytest.mark.parametrize("s, w", [(1.0, 2.0), (1.0, 0.5), (2.0, 2.0), (0.0, 3.0)])
def test_autoguidance_formula(s, w):
    """out = cfg + (w - 1)(cond - guide); with s = 1 the paper's guide + w (cond - guide)."""
    m, g = Linear(1.0), Linear(0.3)
    x, t, y = _xty()
    cond, uncond, weak = m(x, t, y), m(x, t, torch.full_like(y, 10)), g(x, t, y)
    out = cfg(m, y, s, 10, guide=g, autoguidance_scale=w)(x, t)
    assert torch.allclose(out, uncond + s * (cond - uncond) + (w - 1) * (cond - weak), atol=1e-5)
    if s == 1.0:
        assert torch.allclose(out, weak + w * (cond - weak), atol=1e-5)


def test_autoguidance_needs_a_guide():
    with pytest.raises(ValueError, match="needs a guide"):
        cfg(Linear(1.0), torch.tensor([1]), 1.0, 10, autoguidance_scale=2.0)


@pytest.mark.parametrize("s, interval, w", [(1.0, None, 2.0), (3.0, None, 2.0), (3.0, (143, 714), 2.0), (3.0, (143, 714), 1.0)])
def test_unet_rows_counts_guide_rows(s, interval, w):
    m, g = Linear(1.0), Linear(0.5)
    x, _, y = _xty()
    abar = make_schedule("cosine", 1000)
    ts = sampling_timesteps(1000, 8)
    dpm_solver_pp_2m(Denoiser(cfg(m, y, s, 10, interval, guide=g, autoguidance_scale=w), abar, "v"), x, ts)
    assert unet_rows(ts, s, interval, w) == (m.rows + g.rows) // 3


# ---------------------------------------------------------------------------------------------- pipeline
def _guided_pipe(guide=None) -> LatentDiffusion:
    base = tiny_pipeline()
    return LatentDiffusion(base.unet, base.vae, base.config, guide=guide if guide is not None else copy.deepcopy(base.unet))


def test_pipeline_guide_equal_to_model_is_the_conditional_model():
    pipe = _guided_pipe()
    a = pipe.generate([1, 2, 3], seed=0, guidance_scale=1.0, autoguidance_scale=3.0)
    b = pipe.generate([1, 2, 3], seed=0, guidance_scale=1.0)
    assert torch.allclose(a, b, atol=1e-5)


def test_pipeline_autoguidance_changes_samples_with_a_weaker_guide():
    pipe = _guided_pipe(tiny_unet(seed=5))
    a = pipe.generate([1, 2, 3], seed=0, guidance_scale=1.0, autoguidance_scale=3.0)
    b = pipe.generate([1, 2, 3], seed=0, guidance_scale=1.0)
    assert (a - b).abs().max() > 1e-3


def test_no_guide_samples_as_before_and_refuses_autoguidance(pipe):
    assert pipe.guide is None
    pipe.generate([1], seed=0)  # default autoguidance_scale 1: works as always
    with pytest.raises(ValueError, match="needs a guide model.*guide.fraction"):
        pipe.generate([1], seed=0, autoguidance_scale=2.0)
    for bad in (-1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="autoguidance_scale must be"):
            _guided_pipe().generate([1], seed=0, autoguidance_scale=bad)


def test_guide_round_trips_through_the_folder(tmp_path):
    pipe = _guided_pipe(tiny_unet(seed=5))
    pipe.save_pretrained(tmp_path / "ldm")
    assert (tmp_path / "ldm" / "guide" / "model.safetensors").is_file()
    loaded = LatentDiffusion.from_pretrained(tmp_path / "ldm")
    for k, v in pipe.guide.state_dict().items():
        assert torch.equal(loaded.guide.state_dict()[k], v)
    assert torch.equal(loaded.generate([4], seed=1, autoguidance_scale=2.0), pipe.generate([4], seed=1, autoguidance_scale=2.0))
    tiny_pipeline().save_pretrained(tmp_path / "plain")
    assert LatentDiffusion.from_pretrained(tmp_path / "plain").guide is None  # folders without a guide load as before


def test_editing_takes_autoguidance():
    pipe = _guided_pipe()
    x = pipe.generate([3, 5], seed=0)
    a = edit.img2img(pipe, x, labels=8, strength=0.6, seed=0, guidance_scale=1.0, autoguidance_scale=2.0)
    b = edit.img2img(pipe, x, labels=8, strength=0.6, seed=0, guidance_scale=1.0)
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------- config
def test_config_checks():
    assert GuideConfig(0.25).step(1350) == 338 and GuideConfig(0.0).step(1350) == 0 and GuideConfig(0.001).step(10) == 1
    with pytest.raises(ConfigError, match="guide.fraction"):
        apply_overrides(LDMRunConfig(), ["guide.fraction=1.5"]).validate()
    with pytest.raises(ConfigError, match="needs a guide"):
        apply_overrides(LDMRunConfig(), ["sample.autoguidance_scale=2.0"]).validate()
    apply_overrides(LDMRunConfig(), ["sample.autoguidance_scale=2.0", "guide.fraction=0.25"]).validate()


# ---------------------------------------------------------------------------------------------- training
TINY = ["train.mixed_precision=null", "model.channels=[16,32]", "model.num_heads=2", "model.num_res_blocks=1", "diffusion.num_timesteps=100", "sample.guidance_interval=[10,80]",
        "sample.steps=4", "train.batch_size=8", "train.warmup_steps=2", "train.lr_decay=constant", "train.log_every=2",
        "train.checkpoint_every=3", "train.preview_every=0", "data.download=false"]


def _train(args: list, env: dict | None = None, check: bool = True):
    return run_cmd([sys.executable, REPO / "train_ldm.py", *args], env=env, check=check)


@pytest.mark.slow
def test_trainer_keeps_a_snapshot_guide_and_resumes_exactly(mnist_dir, tmp_path):
    vae = tmp_path / "vae"
    run_cmd([sys.executable, REPO / "train_vae.py", "--data-dir", str(mnist_dir), "--out", str(vae),
             *as_set_args(["model.channels=[8,16,16]", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
                           "train.preview_every=0", "data.download=false"])])
    common = ["--data-dir", str(mnist_dir), "--vae", str(vae)]
    guided = as_set_args(TINY + ["train.steps=6", "guide.fraction=0.34", "sample.autoguidance_scale=2.0"])  # snapshot at 2
    _train([*common, "--out", str(tmp_path / "two"), *as_set_args(TINY + ["train.steps=2"])])
    _train([*common, "--out", str(tmp_path / "six"), *guided])
    # The guide is the EMA after 2 steps: what a 2-step run saves (constant lr, so the runs agree up to step 2).
    a, b = load_file(str(tmp_path / "two" / "unet" / "model.safetensors")), load_file(str(tmp_path / "six" / "guide" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = LatentDiffusion.from_pretrained(tmp_path / "six")
    assert pipe.guide is not None and pipe.config.sample.autoguidance_scale == 2.0
    pipe.generate([1, 2], seed=0)  # the default now autoguides
    # SIGKILL from outside once the checkpoint of step 3 (past the snapshot) is on disk, resume: the same guide and
    # final weights, wherever the kill landed.
    killed = kill_when([sys.executable, REPO / "train_ldm.py", *common, "--out", tmp_path / "k", *guided],
                       checkpoint_dir(tmp_path / "k", 3))
    assert killed.returncode in (-9, 0), killed.stderr[-2000:]  # 0: it finished before the kill landed
    _train([*common, "--out", str(tmp_path / "k"), *guided, "--resume", "latest"])
    for sub in ("guide", "unet"):
        a, b = (load_file(str(tmp_path / r / sub / "model.safetensors")) for r in ("six", "k"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    # A resume past the snapshot whose guide/ went missing stops with a clear message.
    import shutil
    shutil.copytree(tmp_path / "six", tmp_path / "m")
    as_killed_after(tmp_path / "m", 3)
    shutil.rmtree(tmp_path / "m" / "guide")
    proc = _train([*common, "--out", str(tmp_path / "m"), *guided, "--resume", "latest"], check=False)
    assert proc.returncode == 2 and "guide" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluator_guide_option_loads_a_unet_folder_or_a_checkpoint(tmp_path):
    """evaluate ldm/sweep --guide: sweep guides from other snapshots of a run without retraining."""
    from safetensors.torch import save_file

    from latentdiff import ModelLoadError
    from latentdiff.evaluate.commands import load_guide

    pipe = tiny_pipeline()
    other = tiny_unet(seed=7)
    other.save_pretrained(tmp_path / "unet_folder")
    (tmp_path / "ckpt").mkdir()
    save_file(other.state_dict(), str(tmp_path / "ckpt" / "ema.safetensors"))
    for path in ("unet_folder", "ckpt"):
        guide = load_guide(tmp_path / path, pipe)
        assert all(torch.equal(guide.state_dict()[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ModelLoadError, match="not a UNet folder"):
        load_guide(tmp_path, pipe)
