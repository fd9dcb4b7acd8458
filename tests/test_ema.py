"""Weight averages (latentdiff/ema.py): EDM2's power-function EMA and the classic warmed-up EMA."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, as_set_args, run_cmd
from latentdiff import ConfigError
from latentdiff.config import TrainConfig
from latentdiff.ema import EMA, ema_decay_at, gamma_to_sigma_rel, power_decay, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])  # EDM2's table 1 pairs
def test_sigma_rel_matches_edm2(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_sigma_rel_out_of_range_names_the_range():
    with pytest.raises(ValueError, match="outside"):
        sigma_rel_to_gamma(0.3)


def test_power_ema_weights_step_tau_by_its_profile():
    """After T updates the average gives value tau the weight (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1)."""
    gamma, steps = 3.0, 40
    values = torch.randn(steps, 5, dtype=torch.float64)
    ema, model = torch.nn.Linear(5, 1, bias=False).double(), torch.nn.Linear(5, 1, bias=False).double()
    averager = EMA(ema, model)
    for t in range(steps):
        model.weight.data.copy_(values[t:t + 1])
        averager.update(ema_decay_at(t, 0.999, gamma_to_sigma_rel(gamma)))
    tau = torch.arange(1, steps + 1, dtype=torch.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    torch.testing.assert_close(ema.weight.data[0], (w[:, None] * values).sum(0))


def test_classic_schedule_is_a_warm_up_until_the_decay_binds():
    assert ema_decay_at(0, 0.999, None) == pytest.approx(0.1)
    assert ema_decay_at(1199, 0.999, None) == pytest.approx(1200 / 1209)  # the quick preset's last step
    assert ema_decay_at(20_000, 0.999, None) == 0.999
    assert power_decay(1, 5.0) == 0.0  # the first update copies the weights


def test_ema_std_config_errors():
    with pytest.raises(ConfigError, match="ema_std must be in"):
        TrainConfig(ema_std=0.5).validate()
    with pytest.raises(ConfigError, match="turns the EMA off"):
        TrainConfig(ema_std=0.1, ema_decay=0.0).validate()
    TrainConfig(ema_std=0.1).validate()


@pytest.mark.slow
@pytest.mark.parametrize("ema_std", [None, 0.1])
def test_train_ldm_uses_the_power_ema(ema_std, mnist_dir, tmp_path):
    """One step: the power EMA's first update copies the weights; the classic one moves 90% of the way."""
    common = ["train.mixed_precision=null", "train.batch_size=8", "train.warmup_steps=0", "train.preview_every=0",
              "train.checkpoint_every=1", "data.download=false", "train.steps=1"]
    unet = ["model.channels=[16,32]", "model.num_heads=2", "model.num_res_blocks=1", "diffusion.num_timesteps=100",
            "sample.steps=2"]
    vae, ldm = tmp_path / "vae", tmp_path / "ldm"
    run_cmd([sys.executable, REPO / "train_vae.py", "--data-dir", mnist_dir, "--out", vae,
             *as_set_args(["model.channels=[8,16,16]", "model.num_res_blocks=1", *common])])
    extra = [] if ema_std is None else [f"train.ema_std={ema_std}"]
    run_cmd([sys.executable, REPO / "train_ldm.py", "--data-dir", mnist_dir, "--vae", vae, "--out", ldm,
             *as_set_args(unet + common + extra)])
    saved = load_file(str(ldm / "unet" / "model.safetensors"))
    raw = load_file(str(ldm / "checkpoints" / "step_00000001" / "model.safetensors"))
    moved = [k for k in saved if not torch.equal(saved[k], raw[k])]
    if ema_std is None:
        assert moved  # 0.1 of the initial weights stay in the average
    else:
        assert not moved
