"""Saving and loading models as self-describing folders: config.json + model.safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, from_dict, to_dict
from .errors import ModelLoadError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors save through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_above(path: str | Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is a file (nothing can be made under it), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def model_dir(directory) -> Path:
    """A model folder argument as a Path; ValueError for anything that is not a path (None, a model object)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"a model folder is a path (str or pathlib.Path), got {type(directory).__name__}; "
                         "pass the folder a training script wrote, e.g. 'runs/ldm'")
    return Path(directory)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has; ValueError naming it otherwise (not torch's traceback later)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} needs a CUDA GPU, and this machine (or this torch build) has none; "
                         "use device 'cpu'")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered 0..{torch.cuda.device_count() - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} needs Apple's MPS, which this machine does not have; use device 'cpu'")
    return d


def nonfinite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_model(model: torch.nn.Module, config: Any, directory: str | Path, state_dict: dict | None = None) -> None:
    """Write ``directory/model.safetensors`` then ``directory/config.json``, each atomically.

    The config goes last: a folder with a config always has complete weights beside it.
    """
    directory = Path(directory)
    sd = state_dict if state_dict is not None else model.state_dict()
    bad = nonfinite_keys(sd)
    if bad:
        raise ModelLoadError(f"refusing to save non-finite weights ({bad[0]} and {len(bad) - 1} more) to {directory}")
    atomic_save_safetensors(sd, directory / WEIGHTS_NAME)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(to_dict(config), indent=2) + "\n").encode())


def read_config(cls: type, directory: str | Path) -> Any:
    """Read and type-check ``directory/config.json`` as dataclass ``cls``."""
    path = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():
        raise ModelLoadError(f"{directory} is a file; pass the model folder that holds it ({Path(directory).parent})")
    sub = _kind(cls).lower()
    if (Path(directory) / "unet").is_dir() and (Path(directory) / "vae").is_dir() and sub in ("vae", "unet"):
        raise ModelLoadError(f"{directory} is an LDM run folder, not a {_kind(cls)} folder; its {_kind(cls)} is in "
                             f"{Path(directory) / sub}: pass that")
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: {directory} is not a saved model folder "
                             f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}; train one or check the path)")
    try:
        data = json.loads(path.read_text())
        other = _other_kind(cls, data)
        if other:
            where = " (a VAE run folder, or an LDM run folder's vae/)" if cls.__name__ == "VAEConfig" else ""
            raise ModelLoadError(f"{directory} holds a {other}, not a {_kind(cls)}; pass a {_kind(cls)} folder{where}")
        cfg = from_dict(cls, data, where=CONFIG_NAME)
        cfg.validate()
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as e:
        raise ModelLoadError(f"{path} is invalid: {e}") from e
    return cfg


def _kind(cls: type) -> str:
    """'VAE' for VAEConfig, 'UNet' for UNetConfig: what a model folder of that config holds."""
    return cls.__name__.removesuffix("Config")


def _other_kind(cls: type, data: Any) -> str | None:
    """The kind of model a config.json describes when it is another model config's and not ``cls``'s (its keys
    are all another's fields and some are not ``cls``'s): a folder of the wrong kind, named as such."""
    from dataclasses import fields

    from .config import UNetConfig, VAEConfig

    if not isinstance(data, dict) or not data:
        return None
    names = lambda c: {f.name for f in fields(c)}  # noqa: E731
    if set(data) <= names(cls):
        return None
    return next((_kind(c) for c in (VAEConfig, UNetConfig) if c is not cls and set(data) <= names(c)), None)


def read_tensors(path: str | Path, fix: str = "re-save or re-train the model") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle); corrupt files and NaN/inf tensors raise ModelLoadError."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path} is truncated or corrupt ({e}); {fix}") from e
    bad = nonfinite_keys(tensors)
    if bad:  # disk or copy corruption: loading it would silently turn every output into NaN
        raise ModelLoadError(f"{path} holds NaN/inf values in {len(bad)} tensor(s): {', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}; the file is corrupt: {fix}")
    return tensors


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read ``directory/model.safetensors`` (never a pickle); refuses corrupt or non-finite weights."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: the model folder is incomplete; re-save or re-train it")
    return read_tensors(path)


def load_model(model_cls: type, config_cls: type, directory: str | Path, device: str | torch.device = "cpu"):
    """Build ``model_cls(config)`` from a folder and load its weights strictly."""
    device = check_device(device)
    cfg = read_config(config_cls, model_dir(directory))
    model = model_cls(cfg)
    sd = read_weights(directory)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{Path(directory) / WEIGHTS_NAME} does not match {CONFIG_NAME}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors "
            f"(first: {(missing + unexpected + wrong)[0]}); the two files come from different models")
    model.load_state_dict(sd)
    return model.to(device).eval()
