"""Training checkpoints and run folders: atomic writes, keep-last-K, exact resume, no pickles.

A checkpoint is a folder ``checkpoints/step_00001000/`` with model.safetensors, ema.safetensors,
optimizer.safetensors (+ optimizer.json for the non-tensor parts) and state.json. It is written
under a temporary name and renamed into place, so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from .config import to_dict
from .errors import LatentDiffError, ModelLoadError, RunDirError, TrainingDiverged
from .runlock import LOCK_NAME, RunLock
from .serialization import atomic_save_safetensors, atomic_write_bytes, nonfinite_keys, read_tensors

RUN_CONFIG = "run.yaml"
CKPT_DIR = "checkpoints"
# Settings that may differ between a run and its resume (bookkeeping, not the maths of training).
RESUME_MAY_CHANGE = {"train.steps", "train.log_every", "train.preview_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.mixed_precision", "train.compile", "data.root",
                     "data.download", "out_dir", "train.log_with", "sample.sampler", "sample.steps",
                     "sample.guidance_scale", "sample.eta", "sample.guidance_interval", "sample.spacing",
                     "sample.autoguidance_scale"}


class DiskFullError(LatentDiffError, OSError):
    """A write ran out of disk space; the partial files were removed."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when safetensors wraps the OS error in its own exception type."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or "code: 28," in text


@contextmanager
def disk_full_errors(folder: Path, need_bytes: int, what: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """Turn a full disk inside the block into a one-line DiskFullError naming ``folder`` and the space needed.

    ``cleanup`` removes the block's partial files first, so a failed write leaves only complete ones.
    """
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        cleanup()
        free = shutil.disk_usage(folder if Path(folder).exists() else Path(folder).parent).free
        raise DiskFullError(f"disk full while writing {what} to {folder}: it needs about {_mb(need_bytes)} and "
                            f"{_mb(free)} is free; free some space there (or write elsewhere) and rerun the same "
                            "command to continue") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _clear(run_dir: Path) -> None:
    """Delete a run folder's contents, keeping the lock file this run holds."""
    for p in run_dir.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def starts_fresh(run_dir: Path, resume: str | None) -> bool:
    """``--resume latest`` before the first checkpoint exists means a fresh run, as in diffusers' examples."""
    return resume == "latest" and not list_checkpoints(run_dir)


def prepare_run_dir(cfg: Any, resume: str | None, overwrite: bool, is_main: bool) -> Path:
    """Check the output folder may take this run; write run.yaml. Raises RunDirError otherwise.

    Call it holding the folder's RunLock (see claim_run_dir): the checks and writes here assume no other run.
    """
    run_dir = Path(cfg.out_dir)
    saved = run_dir / RUN_CONFIG
    if not is_main:  # only the main process checks and writes: others would race with its writes / rmtree
        return run_dir
    fresh = starts_fresh(run_dir, resume)
    if resume and not fresh:
        if not saved.is_file():
            raise RunDirError(f"cannot resume: {saved} not found; start a new run without --resume")
        old = flatten(yaml.safe_load(saved.read_text()) or {})
        new = flatten(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise RunDirError(f"cannot resume {run_dir}: {k} was {old.get(k)!r}, now {new.get(k)!r} "
                              f"({len(diff)} setting(s) differ: {diff}); resume with the saved settings or use a new --out")
    elif run_dir.exists() and {p.name for p in run_dir.iterdir()} - {RUN_CONFIG, LOCK_NAME}:  # only run.yaml: never started
        ours = saved.is_file() or (run_dir / "config.json").is_file()
        # A run killed before its first checkpoint left only logs and previews: --resume latest restarts it.
        restart = fresh and saved.is_file() and not (run_dir / "config.json").is_file()
        if not ours:
            raise RunDirError(f"{run_dir} holds files that are not a latentdiff run; refusing to use or delete them "
                              "(even with --overwrite): choose another --out")
        if not (overwrite or restart):
            if fresh:
                raise RunDirError(f"{run_dir} already holds a finished model and no checkpoint to resume from; "
                                  "pass --overwrite to replace it, or choose another --out")
            raise RunDirError(f"{run_dir} already holds another run; pass --resume latest to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        _clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return run_dir


@contextmanager
def claim_run_dir(cfg: Any, resume: str | None, overwrite: bool, accel) -> Iterator[tuple[Path, str | None]]:
    """Hold the run folder for this run: lock it (main process only: one lock per run, not one per process),
    check and prepare it, and yield (run_dir, resume), where resume is None for a fresh start.

    The lock is taken before anything in the folder is written and released when the block exits (the
    kernel releases it if the process dies). A refused run removes the lock file and folder it created.
    """
    lock = RunLock(cfg.out_dir).acquire() if accel.is_main_process else None
    try:
        run_dir = prepare_run_dir(cfg, resume, overwrite, accel.is_main_process)
    except BaseException:
        if lock is not None:
            lock.release(remove=True)
        raise
    try:
        accel.wait_for_everyone()  # the main process has checked and prepared the folder
        if starts_fresh(run_dir, resume):  # the same answer on every process: no checkpoint is written yet
            accel.print(f"--resume {resume}: no checkpoint in {run_dir} yet; starting a fresh run")
            resume = None
        yield run_dir, resume
    finally:
        if lock is not None:
            lock.release()


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` steps lives: checkpoints/step_00001000/ (complete once state.json is in it)."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, keep: int, extra: dict | None = None) -> Path:
    """Write checkpoints/step_N atomically (temporary folder + rename), then keep only the last ``keep``."""
    bad = nonfinite_keys(model.state_dict())
    if bad:
        raise TrainingDiverged(f"weights became NaN/inf by step {step} ({bad[0]}); not checkpointing them. "
                               f"Last good checkpoint: {(list_checkpoints(run_dir) or ['none'])[-1]}")
    final = checkpoint_dir(run_dir, step)
    root, tmp = final.parent, final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors, meta = _optimizer_to_flat(optimizer)
    parts = [model.state_dict(), tensors] + ([ema.state_dict()] if ema is not None else [])
    need = sum(t.numel() * t.element_size() for sd in parts for t in sd.values())
    with disk_full_errors(root, need, f"checkpoint {final.name}", lambda: shutil.rmtree(tmp, ignore_errors=True)):
        tmp.mkdir(parents=True)
        atomic_save_safetensors(model.state_dict(), tmp / "model.safetensors")
        if ema is not None:
            atomic_save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
        atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
        atomic_write_bytes(tmp / "optimizer.json", json.dumps(meta).encode())
        atomic_write_bytes(tmp / "state.json", json.dumps({"step": step, **(extra or {})}).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from (a missing, truncated or corrupt file), or None if it can."""
    try:
        for name in ("state.json", "optimizer.json"):
            json.loads((path / name).read_text())
        for f in sorted(path.glob("*.safetensors")):
            read_tensors(f, "an older checkpoint is tried")
    except (OSError, ValueError) as e:  # ModelLoadError and JSONDecodeError are ValueErrors
        return str(e) if isinstance(e, ModelLoadError) else f"{e.__class__.__name__}: {e}"
    if not (path / "model.safetensors").is_file():
        return f"{path / 'model.safetensors'} is missing"
    return None


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> newest valid checkpoint (skipping, with a message, newer ones that are corrupt);
    otherwise a checkpoint folder path, used as given."""
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise RunDirError(f"--resume latest: no complete checkpoint in {run_dir / CKPT_DIR}; start without --resume")
        # A scheduler reruns the same command: falling back to an older valid checkpoint beats stopping for good.
        for path in reversed(ckpts):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"--resume latest: skipping {path}: {problem}", file=sys.stderr, flush=True)
        raise RunDirError(f"--resume latest: none of the {len(ckpts)} checkpoint(s) in {run_dir / CKPT_DIR} is readable "
                          "(see above); start a new run with --overwrite")
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise RunDirError(f"--resume {resume}: not a checkpoint folder (no state.json); use --resume latest")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, EMA and optimizer in place; returns state.json (holds ``step``).

    Corrupt or NaN/inf tensors raise ModelLoadError before anything is restored."""
    fix = f"resume from an earlier checkpoint (--resume {Path(path).parent}/step_N) or start a new run"
    weights = read_tensors(path / "model.safetensors", fix)
    ema_weights = read_tensors(path / "ema.safetensors", fix) if ema is not None else None
    opt_tensors = read_tensors(path / "optimizer.safetensors", fix)
    model.load_state_dict(weights)
    if ema is not None:
        ema.load_state_dict(ema_weights)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_flat(opt_tensors, meta))
    return json.loads((path / "state.json").read_text())
