"""Config: YAML loading, type-checked --set overrides, unknown keys are errors, shipped presets load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import REPO

from latentdiff import ConfigError, LDMRunConfig, VAERunConfig, load_config
from latentdiff.cli import presets, resolve_config_path
from latentdiff.config import TrainConfig, UNetConfig, VAEConfig, apply_overrides, from_dict, to_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_load_and_validate():
    assert load_config(VAERunConfig) == VAERunConfig()
    assert load_config(LDMRunConfig) == LDMRunConfig()


def test_configs_are_frozen():
    cfg = VAERunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kl_weight = 1.0  # type: ignore[misc]


def test_yaml_load(tmp_path):
    path = tmp_path / "vae.yaml"
    path.write_text("kl_weight: 0.5\nmodel:\n  channels: [8, 16]\n  groups: 4\ntrain:\n  steps: 7\n  lr: 1\n")
    cfg = load_config(VAERunConfig, path)
    assert cfg.kl_weight == 0.5
    assert cfg.model.channels == (8, 16) and isinstance(cfg.model.channels, tuple)
    assert cfg.model.groups == 4 and cfg.train.steps == 7
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # ints are accepted for floats
    assert cfg.model.latent_size == 14
    # Untouched fields keep their defaults.
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(LDMRunConfig, path) == LDMRunConfig()


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(VAERunConfig, path)


@pytest.mark.parametrize("text, word", [
    ("train:\n  steps: '3'\n", "integer"),
    ("train:\n  steps: 2.5\n", "integer"),
    ("train:\n  steps: true\n", "integer"),
    ("train:\n  lr: fast\n", "number"),
    ("train: 3\n", "mapping"),
    ("model:\n  channels: 8\n", "list"),
    ("model:\n  channels: [8, x]\n", "integer"),
    ("data:\n  download: 1\n", "true/false"),
])
def test_yaml_wrong_types(tmp_path, text, word):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=word):
        load_config(VAERunConfig, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(VAERunConfig, tmp_path / "nope.yaml")


def test_overrides_are_type_checked():
    cfg = apply_overrides(LDMRunConfig(), ["train.steps=12", "train.lr=3e-4", "model.channels=[16,32]",
                                           "model.attention_levels=[false,true]", "train.mixed_precision=null",
                                           "diffusion.schedule=linear", "out_dir=somewhere"])
    assert cfg.train.steps == 12 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.channels == (16, 32) and cfg.model.attention_levels == (False, True)
    assert cfg.train.mixed_precision is None and cfg.diffusion.schedule == "linear" and cfg.out_dir == "somewhere"
    # Overrides never mutate the original.
    assert LDMRunConfig().train.steps == TrainConfig().steps


@pytest.mark.parametrize("override, word", [
    ("train.steps=abc", "integer"),
    ("train.steps=1.5", "integer"),
    ("train.lr=[1]", "number"),
    ("model.channels=16", "list"),
    ("train.bogus=1", "unknown key"),
    ("bogus=1", "unknown key"),
    ("model.bogus.deep=1", "not a config section"),
    ("train.steps", "key.sub=value"),
    ("train.steps=[1", r"override 'train.steps=\[1': the value '\[1' is not valid YAML"),
    ("model.groups=0", "vae.groups must be >= 1, got 0"),
    ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
    ("train.checkpoint_every=-1", r"train.checkpoint_every must be >= 0 \(0 = off\), got -1"),
    ("train.preview_every=-1", "train.preview_every must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.lr=.inf", "train.lr must be a finite number > 0, got inf"),
])
def test_bad_overrides(override, word):
    with pytest.raises(ConfigError, match=word):
        apply_overrides(VAERunConfig(), [override]).validate()


@pytest.mark.parametrize("key", ["groups", "num_heads"])
def test_zero_unet_groups_or_heads_are_a_config_error(key):
    """They used to be a ZeroDivisionError traceback from the divisibility checks."""
    with pytest.raises(ConfigError, match="unet.groups and unet.num_heads must be >= 1"):
        apply_overrides(LDMRunConfig(), [f"model.{key}=0"]).validate()


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml is not valid YAML \(.* at line \d+ column \d+\)"):
        load_config(VAERunConfig, p)


def test_load_config_applies_and_validates_overrides(tmp_path):
    cfg = load_config(VAERunConfig, CONFIG_DIR / "vae_quick.yaml", ["train.steps=3"])
    assert cfg.train.steps == 3
    with pytest.raises(ConfigError, match="divisible"):
        load_config(VAERunConfig, None, ["model.channels=[8,12]", "model.groups=8"])
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(LDMRunConfig, None, ["model.channels=[16,32]", "model.num_heads=3", "model.groups=8"])
    with pytest.raises(ConfigError, match="attention_levels"):
        load_config(LDMRunConfig, None, ["model.attention_levels=[true]"])
    with pytest.raises(ConfigError):
        load_config(LDMRunConfig, None, ["diffusion.schedule=quadratic"])
    with pytest.raises(ConfigError):
        load_config(LDMRunConfig, None, ["sample.sampler=euler"])
    with pytest.raises(ConfigError):
        load_config(LDMRunConfig, None, ["train.steps=0"])


def test_to_dict_from_dict_round_trip():
    cfg = apply_overrides(LDMRunConfig(), ["model.channels=[16,32]", "train.mixed_precision=bf16"])
    assert from_dict(LDMRunConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    from latentdiff.distill import DistillRunConfig

    cls = {"vae": VAERunConfig, "ldm": LDMRunConfig, "distill": DistillRunConfig}[path.name.split("_")[0]]
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # The YAML files are the dataclasses written out: every key in the file is a field.
    import yaml
    assert set(yaml.safe_load(path.read_text())) <= {f.name for f in dataclasses.fields(cls)}


def test_shipped_presets_cover_both_stages():
    names = {p.name.split("_")[0] for p in CONFIG_DIR.glob("*.yaml")}
    assert {"vae", "ldm"} <= names


def test_preset_names_resolve():
    assert resolve_config_path("quick", "vae") == CONFIG_DIR / "vae_quick.yaml"
    assert resolve_config_path("quick", "ldm") == CONFIG_DIR / "ldm_quick.yaml"
    assert resolve_config_path("my.yaml", "vae") == Path("my.yaml")


def test_latent_size():
    assert VAEConfig().latent_size == 7
    assert VAEConfig(channels=(8, 8, 8, 8)).latent_size == 4
    assert VAEConfig(channels=(8,)).latent_size == 28
    # A UNet config leaves its latent shape null (follow the VAE); built alone, a UNet takes the default VAE's.
    assert UNetConfig().sample_size is None and UNetConfig().in_channels is None
    from latentdiff import UNet
    built = UNet(UNetConfig(channels=(16, 32), num_heads=2)).config
    assert (built.in_channels, built.sample_size) == (VAEConfig().latent_channels, VAEConfig().latent_size)


@pytest.mark.parametrize("text", ["3e-4", "3E-4", "3.0e-4", "0.0003", ".0003"])
def test_exponent_floats_without_a_dot(tmp_path, text):
    """PyYAML follows YAML 1.1, where 3e-4 is a string; float fields still accept it (override and file)."""
    assert apply_overrides(TrainConfig(), [f"lr={text}"]).lr == pytest.approx(3e-4)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_config(VAERunConfig, path).train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError):  # ints stay strict
        apply_overrides(TrainConfig(), ["steps=1e3"])


def test_sample_interval_and_spacing_are_checked():
    cfg = apply_overrides(LDMRunConfig(), ["sample.guidance_interval=[100, 800]", "sample.spacing=logsnr"])
    cfg.validate()
    assert cfg.sample.guidance_interval == (100, 800) and cfg.sample.spacing == "logsnr"
    assert apply_overrides(cfg, ["sample.guidance_interval=null"]).sample.guidance_interval is None
    for bad, word in [("sample.guidance_interval=[800, 100]", "lo <= hi"), ("sample.guidance_interval=[0, 1000]", "<= 999"),
                      ("sample.guidance_interval=[5]", "two integer"), ("sample.spacing=log", "sample.spacing")]:
        with pytest.raises(ConfigError, match=word):
            apply_overrides(LDMRunConfig(), [bad]).validate()
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(LDMRunConfig(), ["sample.guidance_interval=[1.5, 9]"])
    # The bound follows the run's own schedule length.
    short = apply_overrides(LDMRunConfig(), ["diffusion.num_timesteps=100", "sample.guidance_interval=[10, 99]"])
    short.validate()
    with pytest.raises(ConfigError, match="<= 99"):
        apply_overrides(short, ["sample.guidance_interval=[10, 100]"]).validate()


def test_loss_weighting_is_checked():
    cfg = apply_overrides(LDMRunConfig(), ["diffusion.loss_weighting=min_snr", "diffusion.min_snr_gamma=3"])
    cfg.validate()
    assert cfg.diffusion.loss_weighting == "min_snr" and cfg.diffusion.min_snr_gamma == 3.0
    assert LDMRunConfig().diffusion.loss_weighting == "none"
    for bad in ("diffusion.loss_weighting=snr", "diffusion.min_snr_gamma=0"):
        with pytest.raises(ConfigError, match="diffusion"):
            apply_overrides(LDMRunConfig(), [bad]).validate()


def test_a_bare_yaml_boolean_for_a_string_key_says_how_to_quote_it():
    """`--set train.mixed_precision=no`: YAML reads `no` as False; the error says so and how to quote it."""
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: expected a string, got False .*quote"):
        apply_overrides(LDMRunConfig(), ["train.mixed_precision=no"])
    assert apply_overrides(LDMRunConfig(), ['train.mixed_precision="no"']).train.mixed_precision == "no"


@pytest.mark.parametrize("preset", presets("ldm"))
def test_make_demo_of_every_preset_names_configs_that_exist(preset):
    """`make demo PRESET=p DISTILL=1` (dry run): each stage's --config is a preset of that stage (hour has no
    distill config of its own and distils with quick's)."""
    import re
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "demo", f"PRESET={preset}", "DISTILL=1", "VENV=/nonexistent-venv"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    used = dict(re.findall(r"(train_vae|train_ldm|distill_ldm)\.py --config (\S+)", out))
    assert set(used) == {"train_vae", "train_ldm", "distill_ldm"}, out
    stage = {"train_vae": "vae", "train_ldm": "ldm", "distill_ldm": "distill"}
    for script, name in used.items():
        assert name in presets(stage[script]), (script, name)
    assert used["train_ldm"] == preset
