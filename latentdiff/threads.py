"""CPU threads for training: every core under a plain ``accelerate launch``, unless the user chose a count.

On a machine without a GPU, ``accelerate launch`` (without ``--cpu``) and ``torchrun`` start each process
with ``OMP_NUM_THREADS=1`` when nobody set it, which leaves all but one core idle. Inside the process that
default looks the same as a user's own ``OMP_NUM_THREADS=1``, so the launcher (the parent process) is asked
instead: its command line holds ``--num_cpu_threads_per_process`` and its environment ``OMP_NUM_THREADS``
exactly when the user set them. (accelerate 1.x copies its own environment to the script and writes
``OMP_NUM_THREADS`` only into the copy; torchrun does the same.)
"""

from __future__ import annotations

import os
import sys

import torch

# Variables a launcher writes into its scripts' environment: their presence means "started by a launcher".
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
THREAD_FLAG = "--num_cpu_threads_per_process"


def machine_cores() -> int:
    """Cores this process may use: its CPU affinity, at most the physical cores (torch's own default)."""
    import psutil  # a dependency of accelerate

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        usable = os.cpu_count() or 1
    return max(1, min(usable, psutil.cpu_count(logical=False) or usable))


def user_thread_setting(env: dict[str, str] | None = None, launcher=None) -> str | None:
    """How the user set the thread count (e.g. ``"OMP_NUM_THREADS=4"``), or None where nobody did.

    ``launcher`` is the parent process (a ``psutil.Process``; tests pass a stand-in). Where the launcher cannot
    be read, an ``OMP_NUM_THREADS`` in the environment counts as the user's: it is kept.
    """
    env = os.environ if env is None else env
    omp = env.get("OMP_NUM_THREADS")
    if omp is None:
        return None
    if not any(k in env for k in LAUNCHER_MARKERS):  # plain `python script.py`: the variable is the user's own
        return f"OMP_NUM_THREADS={omp}"
    try:
        if launcher is None:
            import psutil

            launcher = psutil.Process().parent()
        argv, launcher_env = launcher.cmdline(), launcher.environ()
    except Exception:  # psutil.AccessDenied, NoSuchProcess, no parent: keep what the launcher set
        return f"OMP_NUM_THREADS={omp} (the launcher could not be read)"
    if any(a == THREAD_FLAG or a.startswith(THREAD_FLAG + "=") for a in argv):
        return f"{THREAD_FLAG} {omp}"
    if "OMP_NUM_THREADS" in launcher_env:
        return f"OMP_NUM_THREADS={launcher_env['OMP_NUM_THREADS']}"
    return None


def use_cpu_cores(announce: bool = True, env: dict[str, str] | None = None, launcher=None) -> int:
    """Set torch's CPU threads: the user's count if they set one, else this machine's cores divided among the
    processes on it; say which on stderr (the run's first line) if ``announce``. Returns the count."""
    env = os.environ if env is None else env
    setting = user_thread_setting(env, launcher)
    if setting is None:
        processes = int(env.get("LOCAL_WORLD_SIZE", "1"))
        cores = machine_cores()
        threads = max(1, cores // processes)
        torch.set_num_threads(threads)
        why = f"{cores} cores" + (f" / {processes} processes on this machine" if processes > 1 else "")
        why += "; set OMP_NUM_THREADS or --num_cpu_threads_per_process to choose"
    else:
        threads = torch.get_num_threads()
        why = f"set by {setting}"
    if announce:
        print(f"CPU threads: {threads} per process ({why})", file=sys.stderr, flush=True)
    return threads
