"""Checkpoints on a full disk and --resume latest past a corrupt newest checkpoint (issue 19)."""

from __future__ import annotations

import errno

import pytest
import torch

import latentdiff.serialization as serialization
from latentdiff.checkpoint import DiskFullError, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from latentdiff.errors import ModelLoadError, RunDirError


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _full_disk_after(monkeypatch, n_ok: int, exc: Exception) -> None:
    """save_file writes ``n_ok`` files, then writes half a file and raises ``exc`` as a full disk does."""
    real, calls = serialization.save_file, []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > n_ok:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise exc
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(serialization, "save_file", flaky)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              'message: "No space left on device" })')])
def test_full_disk_is_one_line_naming_the_folder_and_leaves_no_partial_files(tmp_path, monkeypatch, exc):
    model, opt = _model_and_opt()
    first = save_checkpoint(tmp_path, 1, model, None, opt, keep=3)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    _full_disk_after(monkeypatch, 1, exc)  # the second file of step 2 hits the full disk
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(tmp_path, 2, model, None, opt, keep=3)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "checkpoints") in msg and "MiB" in msg and "free" in msg, msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no tmp folder left
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the earlier checkpoint is intact


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    _full_disk_after(monkeypatch, 0, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path, 1, model, None, opt, keep=3)


def test_resume_latest_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, model, opt, keep=5)
    newest = list_checkpoints(tmp_path)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # a copy or a disk cut short
    (list_checkpoints(tmp_path)[1] / "state.json").write_text('{"step": ')  # and the one before: corrupt JSON
    assert resolve_resume(tmp_path, "latest").name == "step_00000001"
    err = capsys.readouterr().err
    assert f"skipping {newest}" in err and "truncated or corrupt" in err and "skipping" in err.splitlines()[1], err
    assert load_checkpoint(list_checkpoints(tmp_path)[0], model, model, opt)["step"] == 1
    # An explicit path to the bad checkpoint still fails, naming the file.
    explicit = resolve_resume(tmp_path, str(newest))
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        load_checkpoint(explicit, model, model, opt)


def test_resume_latest_with_no_valid_checkpoint_says_so(tmp_path):
    model, opt = _model_and_opt()
    ckpt = save_checkpoint(tmp_path, 1, model, None, opt, keep=5)
    (ckpt / "optimizer.safetensors").write_bytes(b"junk")
    with pytest.raises(RunDirError, match="none of the 1 checkpoint"):
        resolve_resume(tmp_path, "latest")


@pytest.mark.slow
def test_rerun_with_resume_latest_gets_past_a_truncated_newest_checkpoint(mnist_dir, tmp_path):
    """What a scheduler does: rerun the same command; the run continues from the checkpoint before the bad one."""
    import sys

    from conftest import REPO, as_killed_after, as_set_args, run_cmd
    from test_resume import COMMON, TINY_VAE

    run = tmp_path / "run"
    args = [sys.executable, REPO / "train_vae.py", "--data-dir", mnist_dir, "--out", run,
            *as_set_args(TINY_VAE + COMMON + ["train.steps=7", "train.checkpoint_every=3", "train.keep_checkpoints=3"])]
    run_cmd(args)
    as_killed_after(run, 6)  # what a kill after the checkpoint of step 6 leaves
    newest = run / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    again = run_cmd([*args, "--resume", "latest"])
    out = again.stdout + again.stderr
    assert "skipping" in out and "step_00000006" in out and "resuming from" in out and "step_00000003" in out, out
    assert (run / "model.safetensors").is_file()
