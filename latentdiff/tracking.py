"""Experiment trackers through accelerate (TensorBoard, W&B, ...): which ones, start, images, finish.

Optional: ``--log-with tensorboard`` (or ``train.log_with``). metrics.jsonl stays the always-on record;
a tracker gets the same scalars at the same steps, the run config, and the preview grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from PIL import Image

from .checkpoint import flatten
from .config import to_dict
from .errors import ConfigError

PROJECT = "latentdiff"  # tracker project name; TensorBoard writes into <run>/latentdiff/
INSTALL = {"tensorboard": "pip install -e '.[tensorboard]'"}  # our extra; others: pip install <name>
IMAGE_LISTS = {"wandb", "swanlab"}  # trackers whose log_images takes a list of PIL images


def tracker_names(log_with: str | None) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "all" -> every installed tracker; None -> [].

    Raises ConfigError for an unknown name or a tracker whose package is not installed (accelerate
    itself would silently skip it)."""
    names = [n.strip() for n in (log_with or "").split(",") if n.strip()]
    available = [str(t) for t in get_available_trackers()]
    if "all" in names:
        if not available:
            raise ConfigError("--log-with all: no experiment tracker is installed; pip install -e '.[tensorboard]'")
        return available
    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"--log-with {n}: unknown tracker; choose from {sorted(LOGGER_TYPE_TO_CLASS)} or all")
        if n not in available:
            raise ConfigError(f"--log-with {n}: the {n} package is not installed; {INSTALL.get(n, f'pip install {n}')}")
    return list(dict.fromkeys(names))


def start_trackers(accel: Accelerator, cfg, run_dir: Path, start_step: int) -> None:
    """init_trackers with the flattened run config; a resumed TensorBoard log drops events after the checkpoint."""
    if not accel.log_with:
        return
    # Trackers take numbers, text and bools: lists and None go as text.
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
    tb = {"purge_step": start_step + 1} if start_step else {}  # as metrics.jsonl is cut back on resume
    accel.init_trackers(PROJECT, config=config,
                        init_kwargs={"tensorboard": tb, "wandb": {"name": Path(run_dir).name}})


def log_image(accel: Accelerator, tag: str, path: Path, step: int) -> None:
    """Send a saved grayscale PNG (a preview grid) to every tracker that takes images."""
    if not accel.trackers:
        return
    image = Image.open(path).convert("L")
    for tracker in accel.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)[None, None]}, step)  # (1, 1, H, W) uint8, NCHW
        elif tracker.name in IMAGE_LISTS:
            tracker.log_images({tag: [image]}, step)


def finish_trackers(accel: Accelerator) -> None:
    """Close the trackers (flushes TensorBoard). Not accel.end_training(): that also destroys the process
    group, which would break a caller that trains both stages in one distributed process."""
    for tracker in accel.trackers:
        tracker.finish()
    accel.trackers = []
