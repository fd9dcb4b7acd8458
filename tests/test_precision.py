"""train.mixed_precision=auto: bf16 where the hardware has native bf16, fp32 otherwise, and a line saying which."""

import pytest
import torch

from latentdiff.config import TrainConfig
from latentdiff.errors import ConfigError
from latentdiff.precision import cpu_flags, native_bf16, resolve_mixed_precision


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\nbugs\t: none\n")
    assert {"avx512f", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == set()  # no /proc/cpuinfo (macOS): no flags, so fp32


@pytest.mark.parametrize("flags, want", [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                                         ({"avx512f", "avx2"}, "no"), (set(), "no")])
def test_auto_picks_bf16_only_with_native_support(flags, want, capsys):
    assert resolve_mixed_precision("auto", torch.device("cpu"), flags) == want
    line = capsys.readouterr().err
    assert "mixed precision:" in line and ("bf16 autocast" if want == "bf16" else "fp32") in line


def test_auto_is_quiet_off_the_main_process(capsys):
    assert resolve_mixed_precision("auto", torch.device("cpu"), set(), announce=False) == "no"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("setting", [None, "no", "bf16", "fp16"])
def test_explicit_settings_pass_through(setting, capsys):
    assert resolve_mixed_precision(setting, torch.device("cpu"), set()) == setting
    assert capsys.readouterr().err == ""


def test_other_devices_fall_back_to_fp32():
    ok, why = native_bf16(torch.device("meta"))
    assert not ok and "meta" in why


def test_config_accepts_auto_and_rejects_typos():
    TrainConfig(mixed_precision="auto").validate()
    with pytest.raises(ConfigError, match="auto"):
        TrainConfig(mixed_precision="bf32").validate()


@pytest.mark.slow
def test_a_training_run_with_auto_says_which_precision_it_uses(mnist_dir, tmp_path):
    import sys

    from conftest import REPO, as_set_args, run_cmd

    proc = run_cmd([sys.executable, REPO / "train_vae.py", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "vae"),
                    *as_set_args(["model.channels=[8,16,16]", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
                                  "train.preview_every=0", "train.mixed_precision=auto", "data.download=false"])])
    assert proc.stderr.count("mixed precision:") == 1 and (tmp_path / "vae" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ldm_run_under_bf16_encodes_and_trains_with_lognormal_noise_levels(mnist_dir, tmp_path):
    """train_ldm under bf16 autocast (the dataset's latents are encoded under it too) with EDM-style noise
    levels set from the command line: it trains, and the saved pipeline carries the setting."""
    import json
    import sys

    from conftest import REPO, as_set_args, run_cmd

    common = ["train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.preview_every=0",
              "train.mixed_precision=bf16", "data.download=false"]
    run_cmd([sys.executable, REPO / "train_vae.py", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "vae"),
             *as_set_args(["model.channels=[8,16,16]", *common])])
    run_cmd([sys.executable, REPO / "train_ldm.py", "--data-dir", str(mnist_dir), "--vae", str(tmp_path / "vae"),
             "--out", str(tmp_path / "ldm"),
             *as_set_args(["model.channels=[16,32]", "model.num_heads=2", "guide.fraction=0", "sample.steps=2",
                           "diffusion.loss_weighting=min_snr", "diffusion.min_snr_gamma=3.0", *common])])
    saved = json.loads((tmp_path / "ldm" / "config.json").read_text())
    assert saved["diffusion"]["loss_weighting"] == "min_snr" and saved["diffusion"]["min_snr_gamma"] == 3.0
    assert (tmp_path / "ldm" / "unet" / "model.safetensors").is_file()
