"""Training checkpoints and run folders: atomic writes, keep-last-K, exact resume, no pickles.

A checkpoint is a folder ``checkpoints/step_00001000/`` with model.safetensors, ema.safetensors,
optimizer.safetensors (+ optimizer.json for the non-tensor parts) and state.json. It is written
under a temporary name and renamed into place, so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from .config import to_dict
from .errors import RunDirError, TrainingDiverged
from .serialization import atomic_save_safetensors, atomic_write_bytes, nonfinite_keys

RUN_CONFIG = "run.yaml"
CKPT_DIR = "checkpoints"
# Settings that may differ between a run and its resume (bookkeeping, not the maths of training).
RESUME_MAY_CHANGE = {"train.steps", "train.log_every", "train.preview_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.mixed_precision", "train.compile", "data.root",
                     "data.download", "out_dir", "sample.sampler", "sample.steps", "sample.guidance_scale", "sample.eta",
                     "sample.guidance_interval", "sample.spacing"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_run_dir(cfg: Any, resume: str | None, overwrite: bool, is_main: bool) -> Path:
    """Check the output folder may take this run; write run.yaml. Raises RunDirError otherwise."""
    run_dir = Path(cfg.out_dir)
    saved = run_dir / RUN_CONFIG
    if not is_main:  # only the main process checks and writes: others would race with its writes / rmtree
        return run_dir
    if resume:
        if not saved.is_file():
            raise RunDirError(f"cannot resume: {saved} not found; start a new run without --resume")
        old = _flatten(yaml.safe_load(saved.read_text()) or {})
        new = _flatten(to_dict(cfg))
        diff = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise RunDirError(f"cannot resume {run_dir}: {k} was {old.get(k)!r}, now {new.get(k)!r} "
                              f"({len(diff)} setting(s) differ: {diff}); resume with the saved settings or use a new --out")
    elif run_dir.exists() and {p.name for p in run_dir.iterdir()} - {RUN_CONFIG}:  # only run.yaml: never started
        if not overwrite:
            what = "another run" if saved.is_file() else "other files"
            raise RunDirError(f"{run_dir} already holds {what}; pass --resume latest to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        if is_main:
            if not saved.is_file() and not (run_dir / "config.json").is_file():
                raise RunDirError(f"{run_dir} holds files that are not a latentdiff run; refusing to delete them "
                                  "even with --overwrite: choose another --out")
            shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return run_dir


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, keep: int, extra: dict | None = None) -> Path:
    """Write checkpoints/step_N atomically (temporary folder + rename), then keep only the last ``keep``."""
    bad = nonfinite_keys(model.state_dict())
    if bad:
        raise TrainingDiverged(f"weights became NaN/inf by step {step} ({bad[0]}); not checkpointing them. "
                               f"Last good checkpoint: {(list_checkpoints(run_dir) or ['none'])[-1]}")
    root = run_dir / CKPT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_safetensors(model.state_dict(), tmp / "model.safetensors")
    if ema is not None:
        atomic_save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
    tensors, meta = _optimizer_to_flat(optimizer)
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


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> newest complete checkpoint; otherwise a checkpoint folder path."""
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise RunDirError(f"--resume latest: no complete checkpoint in {run_dir / CKPT_DIR}; start without --resume")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise RunDirError(f"--resume {resume}: not a checkpoint folder (no state.json); use --resume latest")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, EMA and optimizer in place; returns state.json (holds ``step``)."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), meta))
    return json.loads((path / "state.json").read_text())
