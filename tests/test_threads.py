"""CPU threads: every core under a plain `accelerate launch` or `torchrun`, the user's count where they set one."""

import os

import pytest
import torch
from conftest import REPO, VAE_SET, accelerate_launch, as_set_args, run_cmd

from latentdiff import threads
from latentdiff.threads import machine_cores, use_cpu_cores, user_thread_setting

LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}  # what accelerate hands its script


class Launcher:
    """A stand-in for psutil's view of the parent process."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env

    def cmdline(self) -> list[str]:
        return self.argv

    def environ(self) -> dict[str, str]:
        return self.env


class Unreadable:
    def cmdline(self):
        raise PermissionError("access denied")


@pytest.mark.parametrize("env, launcher, want", [
    ({}, None, None),  # plain python, nothing set: torch's default
    ({"OMP_NUM_THREADS": "3"}, None, "OMP_NUM_THREADS=3"),  # plain python: the variable is the user's
    (LAUNCHED, Launcher(["accelerate", "launch", "train_ldm.py"], {}), None),  # accelerate's default of 1
    (LAUNCHED, Launcher(["accelerate", "launch", "--num_cpu_threads_per_process", "1", "x.py"], {}),
     "--num_cpu_threads_per_process 1"),
    (LAUNCHED, Launcher(["accelerate", "launch", "--num_cpu_threads_per_process=1", "x.py"], {}),
     "--num_cpu_threads_per_process 1"),
    (LAUNCHED, Launcher(["accelerate", "launch", "x.py"], {"OMP_NUM_THREADS": "1"}), "OMP_NUM_THREADS=1"),
    ({"TORCHELASTIC_RUN_ID": "none", "OMP_NUM_THREADS": "1"}, Launcher(["torchrun", "x.py"], {}), None),
    (LAUNCHED, Unreadable(), "OMP_NUM_THREADS=1 (the launcher could not be read)"),
])
def test_user_setting_is_told_from_the_launchers_default(env, launcher, want):
    assert user_thread_setting(env, launcher) == want


def test_cores_are_divided_among_the_processes_and_announced(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(threads, "machine_cores", lambda: 8)
    env = {**LAUNCHED, "LOCAL_WORLD_SIZE": "2"}
    assert use_cpu_cores(env=env, launcher=Launcher(["accelerate", "launch", "x.py"], {})) == 4 and calls == [4]
    assert capsys.readouterr().err == ("CPU threads: 4 per process (8 cores / 2 processes on this machine; set "
                                       "OMP_NUM_THREADS or --num_cpu_threads_per_process to choose)\n")
    assert use_cpu_cores(announce=False, env={**env, "LOCAL_WORLD_SIZE": "16"}, launcher=Launcher([], {})) == 1


def test_a_user_count_is_kept(monkeypatch, capsys):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("the user's count was overridden"))
    n = use_cpu_cores(env=LAUNCHED, launcher=Launcher(["accelerate", "launch", "x.py"], {"OMP_NUM_THREADS": "1"}))
    assert n == torch.get_num_threads()
    assert capsys.readouterr().err == f"CPU threads: {n} per process (set by OMP_NUM_THREADS=1)\n"


def test_machine_cores_is_at_most_the_cpus():
    assert 1 <= machine_cores() <= (os.cpu_count() or 1)


@pytest.mark.slow
def test_plain_accelerate_launch_uses_every_core_and_says_so_first(mnist_dir, tmp_path):
    """The README's command as a user types it (no OMP_NUM_THREADS): the script's first line names every core."""
    proc = run_cmd(accelerate_launch("train_vae.py", "--out", tmp_path / "vae", "--data-dir", mnist_dir,
                                     *as_set_args([*VAE_SET, "train.steps=1", "train.preview_every=0"])),
                   env={"OMP_NUM_THREADS": None}, cwd=REPO)
    ours = [ln for ln in proc.stderr.splitlines() if ln and not ln.startswith(("\t", "The following", "To avoid"))]
    cores = machine_cores()
    assert ours[0].startswith(f"CPU threads: {cores} per process ({cores} cores"), proc.stderr
