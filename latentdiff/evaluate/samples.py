"""Read another generator's labelled samples from an .npz, so they can be scored like ours.

Accepted: keys ``images`` and ``labels`` (or ``x`` and ``y``); images (N, 28, 28) or (N, 1, 28, 28),
uint8 in [0, 255] or float in [0, 1]; labels (N,) integer classes 0..9. ``sample.py --npz`` writes
exactly this. Anything else is refused with a one-line DataError that names the problem and the fix.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

KEY_PAIRS = (("images", "labels"), ("x", "y"))
MIN_SAMPLES = 20  # as `evaluate ldm --n-per-class 2`: covariances and k-NN radii (k=3) need several samples
MIN_PER_CLASS = 2  # a per-class covariance needs two samples of the class
SAVE_HINT = "write one with np.savez(path, images=images, labels=labels)"


def load_samples(path: str | Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """An .npz of samples -> (images float (N, 1, 28, 28) in [0, 1], labels int64 (N,)); DataError if unusable."""
    path = Path(path)
    images, labels, keys = _read(path)
    _check_shapes(path, images, labels, keys)
    labels = _check_labels(path, labels, keys[1], num_classes)
    x = _check_images(path, images, keys[0])
    n = len(labels)
    if n < MIN_SAMPLES:
        raise DataError(f"{path} holds {n} samples; the metrics need at least {MIN_SAMPLES} "
                        f"(covariances and k-NN radii need several samples): save more")
    counts = torch.bincount(labels, minlength=num_classes)
    thin = [c for c in range(num_classes) if 0 < counts[c] < MIN_PER_CLASS]
    if thin:
        raise DataError(f"{path}: class {thin[0]} has {int(counts[thin[0]])} sample; every class present needs at least "
                        f"{MIN_PER_CLASS} (per-class FLD fits a covariance): add samples of it or drop it")
    return x.reshape(n, 1, 28, 28), labels


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    if not path.exists():
        raise DataError(f"{path} not found; pass an .npz of samples ({SAVE_HINT})")
    if not path.is_file():
        raise DataError(f"{path} is a folder, not an .npz file; pass the .npz itself")
    if not zipfile.is_zipfile(path):
        kind = " (a single .npy array)" if path.read_bytes()[:6] == b"\x93NUMPY" else ""
        raise DataError(f"{path} is not an .npz archive{kind}; {SAVE_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            keys = next((pair for pair in KEY_PAIRS if set(pair) <= set(found)), None)
            if keys is None:
                raise DataError(f"{path} has keys {found}; it needs 'images' and 'labels' (or 'x' and 'y'): "
                                f"rename them, e.g. np.savez(path, images=..., labels=...)")
            return npz[keys[0]], npz[keys[1]], keys
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # object arrays, corrupt members
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0]}); it must hold plain numeric arrays: {SAVE_HINT}") from e


def _check_shapes(path: Path, images: np.ndarray, labels: np.ndarray, keys: tuple[str, str]) -> None:
    shape = tuple(images.shape)
    if not (len(shape) == 3 and shape[1:] == (28, 28) or len(shape) == 4 and shape[1:] == (1, 28, 28)):
        hint = {(28, 28, 1): "; drop the channel axis with images[..., 0]", (784,): "; reshape to (N, 28, 28)",
                (3, 28, 28): "; convert to grayscale"}.get(shape[1:], "")
        raise DataError(f"{path}: {keys[0]!r} has shape {shape}; expected (N, 28, 28) or (N, 1, 28, 28){hint}")
    if labels.ndim != 1:
        hint = "; one-hot labels? store labels.argmax(1)" if labels.ndim == 2 else ""
        raise DataError(f"{path}: {keys[1]!r} has shape {tuple(labels.shape)}; expected (N,) class indices{hint}")
    if len(labels) != shape[0]:
        raise DataError(f"{path}: {shape[0]} images but {len(labels)} labels; save one label per image")


def _check_labels(path: Path, labels: np.ndarray, key: str, num_classes: int) -> torch.Tensor:
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.round(labels))]
        if bad.size:
            raise DataError(f"{path}: {key!r} must be integer class indices; found {float(bad.flat[0]):g}: store labels.astype(int)")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} has dtype {labels.dtype}; expected integer class indices 0..{num_classes - 1}")
    out = [int(v) for v in labels[(labels < 0) | (labels >= num_classes)][:1]]
    if out:
        raise DataError(f"{path}: label {out[0]} in {key!r} is out of range; valid classes are 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


def _check_images(path: Path, images: np.ndarray, key: str) -> torch.Tensor:
    if images.dtype == np.uint8:
        return torch.from_numpy(images).float().div(255)
    if images.dtype.kind != "f":
        raise DataError(f"{path}: {key!r} has dtype {images.dtype}; save uint8 in [0, 255] (images.astype(np.uint8)) or float in [0, 1]")
    x = images.astype(np.float32)
    n_bad = int((~np.isfinite(x)).sum())
    if n_bad:
        raise DataError(f"{path}: {key!r} holds {n_bad} NaN or infinite values; the generator produced invalid pixels: regenerate those samples")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        fix = ("map [-1, 1] images with (x + 1) / 2" if lo >= -1 and hi <= 1 else
               "divide 0..255 images by 255 (or save them as uint8)" if lo >= 0 and hi <= 255 else "rescale them to [0, 1]")
        raise DataError(f"{path}: float {key!r} must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]: {fix}")
    return torch.from_numpy(x)
