"""Training helpers as pure functions: LR schedule, per-step seeds, batch splitting, run folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_vae

from latentdiff import ConfigError, RunDirError
from latentdiff.checkpoint import RUN_CONFIG, prepare_run_dir, starts_fresh
from latentdiff.config import TrainConfig, VAERunConfig, apply_overrides
from latentdiff.train import lr_at, micro_batches, step_seed
from latentdiff.vae import latent_stats


def test_lr_warmup_then_cosine_to_ten_percent():
    tc = TrainConfig(lr=1.0, warmup_steps=4, steps=104, lr_decay="cosine")
    assert [lr_at(s, tc) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, tc) == pytest.approx(1.0)
    assert lr_at(54, tc) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 * 0.5
    assert lr_at(103, tc) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(10_000, tc) == pytest.approx(0.1)  # never below 10%
    lrs = [lr_at(s, tc) for s in range(4, 104)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_lr_constant():
    tc = TrainConfig(lr=0.3, warmup_steps=2, steps=10, lr_decay="constant")
    assert [lr_at(s, tc) for s in range(5)] == [0.15, 0.3, 0.3, 0.3, 0.3]


def test_lr_without_warmup():
    tc = TrainConfig(lr=0.3, warmup_steps=0, steps=10)
    assert lr_at(0, tc) == pytest.approx(0.3)


def test_step_seeds_are_distinct():
    seeds = {step_seed(s, st, m, r) for s in range(3) for st in range(200) for m in range(4) for r in range(8)}
    assert len(seeds) == 3 * 200 * 4 * 8


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_micro_batches_partition_the_global_batch(world, accum):
    idx = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    parts = []
    for rank in range(world):
        micro = micro_batches(idx, SimpleNamespace(num_processes=world, process_index=rank), accum)
        assert len(micro) == accum and all(m.numel() == 32 // (world * accum) for m in micro)
        parts += micro
    assert sorted(torch.cat(parts).tolist()) == sorted(idx.tolist())


def test_micro_batches_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        micro_batches(torch.arange(10), SimpleNamespace(num_processes=3, process_index=0), 1)


def test_latent_stats_normalise_the_latents():
    vae = tiny_vae()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shift, scale = latent_stats(vae, x, batch_size=16)
    vae.with_latent_stats(shift, scale)
    with torch.no_grad():
        z = vae.scale_latents(vae.encode(x).mean)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------- run folders
def _cfg(tmp_path):
    return apply_overrides(VAERunConfig(), [f"out_dir={tmp_path / 'run'}"])


def test_prepare_run_dir_writes_run_yaml(tmp_path):
    cfg = _cfg(tmp_path)
    run = prepare_run_dir(cfg, None, False, is_main=True)
    assert (run / RUN_CONFIG).is_file()
    # A folder holding only run.yaml never started training: it may be reused.
    prepare_run_dir(cfg, None, False, is_main=True)


def test_prepare_run_dir_refuses_other_files(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a latentdiff run"):
        prepare_run_dir(cfg, None, False, is_main=True)
    with pytest.raises(RunDirError, match="not a latentdiff run"):
        prepare_run_dir(cfg, None, True, is_main=True)  # --overwrite never deletes foreign files
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_prepare_run_dir_non_main_process_only_reads_the_path(tmp_path):
    """Only the main process checks and writes the folder (others would race with its writes)."""
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / f".{RUN_CONFIG}.x.tmp").write_text("half-written by the main process")
    assert prepare_run_dir(cfg, None, False, is_main=False) == tmp_path / "run"
    assert not (tmp_path / "run" / RUN_CONFIG).exists()


def _fake_checkpoint(run: Path, step: int = 3) -> None:
    (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run / "checkpoints" / f"step_{step:08d}" / "state.json").write_text(f'{{"step": {step}}}')


def test_resume_needs_matching_settings(tmp_path):
    cfg = _cfg(tmp_path)
    run = prepare_run_dir(cfg, None, False, is_main=True)
    _fake_checkpoint(run)
    prepare_run_dir(apply_overrides(cfg, ["train.steps=5000"]), "latest", False, is_main=True)  # may change
    with pytest.raises(RunDirError, match="train.lr"):
        prepare_run_dir(apply_overrides(cfg, ["train.lr=0.5"]), "latest", False, is_main=True)
    with pytest.raises(RunDirError, match="cannot resume"):  # an explicit checkpoint path must exist
        prepare_run_dir(apply_overrides(VAERunConfig(), [f"out_dir={tmp_path / 'other'}"]), str(run / "nope"), False, True)


def test_resume_latest_before_any_checkpoint_starts_fresh(tmp_path):
    """--resume latest with no checkpoint yet (or no folder) is a fresh run, so a scheduler can rerun one command."""
    cfg = _cfg(tmp_path)
    assert starts_fresh(tmp_path / "run", "latest") and not starts_fresh(tmp_path / "run", None)
    run = prepare_run_dir(cfg, "latest", False, is_main=True)  # no folder at all
    assert (run / RUN_CONFIG).is_file()
    # Killed before its first checkpoint: only logs and previews. Restarted, even with other settings.
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    (run / "previews").mkdir()
    changed = apply_overrides(cfg, ["train.lr=0.5"])
    prepare_run_dir(changed, "latest", False, is_main=True)
    assert sorted(p.name for p in run.iterdir()) == [RUN_CONFIG]  # the stale log is gone: steps restart at 1
    # A finished model with no checkpoint is never replaced by a fresh run.
    (run / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="finished model and no checkpoint"):
        prepare_run_dir(cfg, "latest", False, is_main=True)
    # Once a checkpoint exists, the settings must match again.
    (run / "config.json").unlink()
    _fake_checkpoint(run)
    assert not starts_fresh(run, "latest")
    with pytest.raises(RunDirError, match="train.lr"):
        prepare_run_dir(cfg, "latest", False, is_main=True)


def test_example_seeds_depend_on_step_and_position_only():
    from latentdiff.train import example_seeds

    pos = torch.arange(8)
    a, b = example_seeds(0, 3, pos), example_seeds(0, 4, pos)
    assert torch.equal(a, example_seeds(0, 3, pos)) and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(example_seeds(0, 3, pos[4:]), a[4:])  # a slice of the batch gets the same seeds
    assert example_seeds(2**40, 10**9, pos).dtype == torch.int64  # huge seeds stay inside int64


def test_unet_follows_the_vae_unless_set():
    from latentdiff.config import UNetConfig, VAEConfig
    from latentdiff.train import unet_config_for

    vae = VAEConfig(channels=(8, 16), latent_channels=8)  # latents (8, 14, 14)
    cfg = unet_config_for(UNetConfig(), vae, "runs/vae")
    assert (cfg.in_channels, cfg.sample_size) == (8, 14)
    assert unet_config_for(UNetConfig(in_channels=8, sample_size=14), vae, "v") == cfg  # agreeing settings are fine
    with pytest.raises(ConfigError, match=r"model.sample_size=7 conflicts with the VAE in runs/vae.*set it to 14"):
        unet_config_for(UNetConfig(sample_size=7), vae, "runs/vae")
