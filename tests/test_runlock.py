"""One run per folder (a lock that dies with its holder), and --resume latest before any checkpoint (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import REPO, as_set_args, run_cmd

from latentdiff import RunDirError
from latentdiff.checkpoint import RUN_CONFIG
from latentdiff.config import VAERunConfig, apply_overrides
from latentdiff.runlock import LOCK_NAME, RunLock
from latentdiff.train import train_vae

TINY = ["train.mixed_precision=null", "model.channels=[8,16,16]", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=2",
        "train.preview_every=0", "train.checkpoint_every=2", "data.download=false"]
# Another run holding the folder, as RunLock does it (plain fcntl: no torch import, so it starts at once).
HOLD = ("import fcntl, json, os, socket, sys, time; os.makedirs(sys.argv[1]); "
        "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'}).encode()); "
        "print('held', flush=True); time.sleep(120)")


def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run).acquire()
    note = json.loads((run / LOCK_NAME).read_text())
    assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
    with pytest.raises(RunDirError, match=rf"{run} is in use by another training run \(pid {os.getpid()} on host"):
        RunLock(run).acquire()  # a second open file description conflicts, even in the same process
    first.release()
    RunLock(run).acquire().release()


def test_train_refused_while_folder_is_held_and_nothing_is_written(tmp_path, mnist_dir):
    """In-process: the lock is checked by train_vae before the folder is touched (no run.yaml, no logs)."""
    run = tmp_path / "run"
    cfg = apply_overrides(VAERunConfig(), [f"out_dir={run}", f"data.root={mnist_dir}", "train.steps=2", *TINY])
    with RunLock(run):
        with pytest.raises(RunDirError, match="in use by another training run"):
            train_vae(cfg)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    train_vae(cfg)  # released: the same run now trains
    assert (run / "model.safetensors").is_file()
    with pytest.raises(RunDirError, match="already holds another run"):  # and its lock was released at the end
        train_vae(cfg)


def test_refused_run_leaves_no_lock_behind(tmp_path, mnist_dir):
    cfg = apply_overrides(VAERunConfig(), [f"data.root={mnist_dir}", "train.steps=2", *TINY])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a latentdiff run"):
        train_vae(apply_overrides(cfg, [f"out_dir={foreign}"]), overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(RunDirError, match="cannot resume"):
        train_vae(apply_overrides(cfg, [f"out_dir={tmp_path / 'new'}"]), resume=str(tmp_path / "nope"))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_live_holder_refuses_a_run_and_a_sigkilled_one_does_not(tmp_path, mnist_dir):
    run = tmp_path / "run"
    args = [sys.executable, REPO / "train_vae.py", "--data-dir", mnist_dir, "--out", run,
            *as_set_args(TINY + ["train.steps=2"])]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cmd(args, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"in use by another training run (pid {holder.pid} on host {socket.gethostname()}" in refused.stderr
        assert not (run / RUN_CONFIG).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the same command with --resume latest starts (fresh: no checkpoint).
    resumed = run_cmd([*args, "--resume", "latest"])
    assert f"--resume latest: no checkpoint in {run} yet; starting a fresh run" in resumed.stdout
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_simultaneous_launches_exactly_one_trains(tmp_path, mnist_dir):
    run = tmp_path / "run"
    args = [sys.executable, REPO / "train_vae.py", "--data-dir", str(mnist_dir), "--out", str(run),
            *as_set_args(TINY + ["train.steps=20", "train.log_every=5", "train.checkpoint_every=10"])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    # Normally refused by the lock; a launch so late that the winner had finished meets the finished run instead.
    assert "in use by another training run" in loser or "already holds another run" in loser, loser
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]  # one run's log, not two interleaved


@pytest.mark.parametrize("under", ["", "sub"])
def test_out_a_file_is_a_run_dir_error(tmp_path, under):
    """--out naming a file (or a folder under one) was a FileExistsError / NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(RunDirError, match="is a file or lies under one, not a folder; choose another --out"):
        RunLock(tmp_path / "afile" / under if under else tmp_path / "afile").acquire()
    assert (tmp_path / "afile").read_text() == "mine"
