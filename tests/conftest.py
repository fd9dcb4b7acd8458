"""Shared fixtures: tiny synthetic MNIST in IDX files, tiny model configs, and helpers.

No network and no real MNIST: every test that needs data uses ``mnist_dir``, a folder of gzipped
IDX files in torchvision's ``<root>/MNIST/raw/`` layout holding simple class-dependent patterns.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusion, PipelineConfig, UNet, VAE
from latentdiff.config import DiffusionConfig, SampleConfig, UNetConfig, VAEConfig
from latentdiff.diffusion import target

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/: accelerate, torchrun
N_TRAIN, N_TEST = 256, 64
# One thread: the tiny models gain nothing from more, and 2 shared cores oversubscribe easily.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    """Put this worker back on one thread after every test. A training run in-process sets the machine's count
    (threads.use_cpu_cores); left so, every later test of the worker ran on 2 threads beside the other worker and
    the subprocess tests, and the oversubscribed small ops ran 10-70x slower (a 0.35 s test took 26 s)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)

# Tiny architectures: channels divisible by groups (and by num_heads for the UNet).
TINY_VAE = VAEConfig(channels=(8, 16, 16), groups=8, num_res_blocks=1)
TINY_UNET = UNetConfig(channels=(16, 32), num_heads=2, groups=8, num_res_blocks=1, attention_levels=(False, True))

# The same architectures as --set overrides for the scripts (plus small, fast training settings).
TRAIN_SET = ["train.mixed_precision=null", "train.steps=6", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2",
             "train.preview_every=3", "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.seed=0",
             "data.download=false"]
VAE_SET = ["model.channels=[8,16,16]", "model.groups=8"] + TRAIN_SET
# Tiny models sample in tiles of 4 rows (the device default, 64, would make every test call 16x the work);
# tests/test_invariance.py and the multi-process shard test use the default.
TINY_TILE = 4
LDM_SET = ["model.channels=[16,32]", "model.num_heads=2", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
           "sample.steps=4", "diffusion.num_timesteps=100", f"sample.tile_size={TINY_TILE}",
           "sample.guidance_interval=[10,80]"] + TRAIN_SET


def as_set_args(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for o in overrides for a in ("--set", o)]


# ----------------------------------------------------------------------------------- synthetic data
def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n,28,28), labels uint8 (n,)): class c is a bright bar whose place and direction depend on c."""
    g = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    g.shuffle(labels)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        pos = 4 + 2 * int(c)  # 4 .. 22
        jitter = int(g.integers(-1, 2))
        if c % 2 == 0:
            images[i, 4:24, pos + jitter:pos + jitter + 3] = 255  # vertical bar
        else:
            images[i, pos + jitter:pos + jitter + 3, 4:24] = 255  # horizontal bar
        images[i] = np.clip(images[i].astype(int) + g.integers(0, 30, (28, 28)), 0, 255).astype(np.uint8)
    return images, labels


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array: big-endian magic, big-endian dims, payload."""
    assert array.dtype == np.uint8 and magic & 0xFF == array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool | None = None) -> Path:
    """Write an IDX file, gzipped when the name ends in .gz (or gz=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic)
    gz = path.suffix == ".gz" if gz is None else gz
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True, layout: str = "raw") -> Path:
    """Write train-* and t10k-* IDX files into root/MNIST/raw (layout="raw") or root itself ("flat")."""
    folder = root / "MNIST" / "raw" if layout == "raw" else root
    ext = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, 2049)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A data root with 256 train / 64 test synthetic digits, gzipped, in <root>/MNIST/raw/."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def fake_download(monkeypatch) -> list[Path]:
    """torchvision's MNIST download, without a network: it writes the tiny synthetic set into <root>/MNIST/raw.
    Returns the list of roots it was asked to download into."""
    import torchvision.datasets

    roots: list[Path] = []

    class FakeMNIST:
        mirrors = ["https://mirror.invalid/mnist/"]

        def __init__(self, root, train=True, download=False):
            assert download, "load_mnist asks torchvision only to download"
            roots.append(Path(root))
            write_mnist(Path(root))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    return roots


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests never see the developer's $LATENTDIFF_DATA unless they set it themselves."""
    monkeypatch.delenv("LATENTDIFF_DATA", raising=False)


# ----------------------------------------------------------------------------------- tiny models
def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every weight, so zero-initialised layers (UNet output) do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_vae(seed: int = 0, **overrides) -> VAE:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY_VAE, **overrides)
    return perturb_(VAE(cfg), seed + 100).eval()


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY_UNET, **overrides)
    return perturb_(UNet(cfg), seed + 200).eval()


def single_point_oracle(x0: torch.Tensor, abar: torch.Tensor):
    """The exact v-prediction when the data is the single point x0, as a UNet: fn(x, t, y[, w]) (per row; a doubled
    CFG batch repeats x0; labels and a student's w are ignored). DDIM with it is exact at any step count."""
    def fn(x, t, *_):
        rows = x0.repeat(len(x) // len(x0), 1, 1, 1)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        return target(rows, (x - a * rows) / s, abar[t], "v")
    return fn


def tiny_pipeline(seed: int = 0, prediction: str = "v", num_timesteps: int = 100, tile_size: int | None = TINY_TILE) -> LatentDiffusion:
    cfg = PipelineConfig(diffusion=DiffusionConfig(num_timesteps=num_timesteps, prediction=prediction),
                         sample=SampleConfig(steps=4, tile_size=tile_size))
    return LatentDiffusion(tiny_unet(seed), tiny_vae(seed), cfg)


@pytest.fixture
def pipe() -> LatentDiffusion:
    return tiny_pipeline()


# ----------------------------------------------------------------------------------- subprocesses
def run_script(script: str, args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run one of the repo's scripts (e.g. "edit.py") as __main__ in this process: (exit code, stdout, stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    code = 0
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cmd(args: list[str], cwd: Path = REPO, timeout: float = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (no network, 1 thread per process), capture output, fail with the output shown.
    ``env`` adds variables; a value None removes one."""
    full_env = _subprocess_env(env)
    # A session of its own, so a timeout kills the whole tree (torchrun's workers too), not just the launcher.
    with subprocess.Popen([str(a) for a in args], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, args))}\n"
                                 f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}") from None
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _subprocess_env(env: dict | None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k != "LATENTDIFF_DATA"}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                     "PYTHONUNBUFFERED": "1", **(env or {})})
    return {k: v for k, v in full_env.items() if v is not None}


def kill_when(args: list, path: Path, cwd: Path = REPO, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Start a command as run_cmd does, wait until ``path`` exists (e.g. a checkpoint folder, checkpoint.checkpoint_dir),
    then SIGKILL its whole process group from outside, as a pre-emption does: the kill lands wherever the run has got
    to by then. A command that ends first is returned as it ended (returncode 0: it finished before the kill)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen([str(a) for a in args], cwd=cwd, env=_subprocess_env(env), stdout=out, stderr=err,
                                 text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while popen.poll() is None and not Path(path).exists():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} did not appear within {timeout}s: {' '.join(map(str, args))}")
                time.sleep(0.01)
        finally:
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(popen.args, popen.returncode, out.read(), err.read())


def as_killed_after(run: Path, step: int) -> Path:
    """Turn a finished run folder into what a kill right after the checkpoint of ``step`` leaves behind: no final model,
    loss curve or final preview, no later checkpoint. Snapshots saved along the way (stages/, guide/) stay: remove
    those a kill at ``step`` would not have left. The metrics log keeps its later lines, as after a kill between log
    lines and checkpoints: a resume drops them."""
    from latentdiff.checkpoint import list_checkpoints

    assert (run / "checkpoints" / f"step_{step:08d}" / "state.json").is_file(), f"{run} has no checkpoint of step {step}"
    for ckpt in list_checkpoints(run):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("config.json", "model.safetensors", "loss.png", "previews/final.png"):
        (run / name).unlink(missing_ok=True)
    for name in ("unet", "vae"):
        shutil.rmtree(run / name, ignore_errors=True)
    return run


def accelerate_launch(script: str, *args) -> list[str]:
    """The Makefile's one-process launch line."""
    return [BIN / "accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", REPO / script, *args]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, mnist_dir) -> dict[str, Path]:
    """Train a tiny VAE then a tiny LDM on it through ``accelerate launch`` (shared by the slow tests)."""
    root = tmp_path_factory.mktemp("runs")
    vae_dir, ldm_dir = root / "vae", root / "ldm"
    run_cmd(accelerate_launch("train_vae.py", "--out", vae_dir, "--data-dir", mnist_dir, *as_set_args(VAE_SET)))
    run_cmd(accelerate_launch("train_ldm.py", "--vae", vae_dir, "--out", ldm_dir, "--data-dir", mnist_dir,
                              *as_set_args(LDM_SET)))
    return {"vae": vae_dir, "ldm": ldm_dir, "root": root}


def write_user_folder(root: Path, num_timesteps: int = 100) -> Path:
    """A folder like a user's after `make demo` (MNIST elsewhere, so no MNIST in data/): runs/vae, runs/ldm (a tiny model
    with a guide/, as the quick preset keeps), runs/ldm_fast (an untrained student: it samples all the same) and
    data/mnist_synth (20 digits: what docs/scale.md's `sample.py --out-dir data/mnist_synth` makes)."""
    from latentdiff import shards
    from latentdiff.distill import DistillRunConfig, make_student

    base = tiny_pipeline(num_timesteps=num_timesteps)
    pipe = LatentDiffusion(base.unet, base.vae, base.config, guide=tiny_unet(seed=3))
    pipe.save_pretrained(root / "runs" / "ldm")
    pipe.vae.save_pretrained(root / "runs" / "vae")
    job = shards.Job(model=str(root / "runs" / "ldm"), labels=list(range(10)), num_digits=20, seed=0, shard_size=10,
                     settings=pipe.settings(steps=2).to_kwargs(), tile_size=pipe.tile_size)
    out = root / "data" / "mnist_synth"
    shards.start_job(out, job)
    shards.run_shards(pipe, job, out, 0, 1, 10, lambda n: None)
    shards.write_index(out, job)
    student_cfg = PipelineConfig(diffusion=pipe.config.diffusion, sample=DistillRunConfig().sample)
    LatentDiffusion(make_student(pipe.unet), pipe.vae, student_cfg).save_pretrained(root / "runs" / "ldm_fast")
    return root
