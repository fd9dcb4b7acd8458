"""MNIST as in-memory tensors from a folder of IDX files (gzipped or not), downloaded there by torchvision if missing."""

from __future__ import annotations

import functools
import gzip
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ENV_VAR = "LATENTDIFF_DATA"


def _find(root: Path, stem: str) -> Path | None:
    """Look for stem / stem.gz in root and root/MNIST/raw (torchvision's layout)."""
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (big-endian header, uint8 payload), checking magic, dims and size."""
    path = Path(path)
    hint = "re-download it or point --data-dir / $LATENTDIFF_DATA at a folder with intact MNIST IDX files"
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt: {hint}") from e
    if len(raw) < 8:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; {hint}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: bad magic number {magic} (expected {expected_magic}); "
                        f"not an MNIST {'image' if expected_magic == IMAGE_MAGIC else 'label'} file: {hint}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; {hint}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but the file has {len(raw)} bytes; "
                        f"it is truncated or corrupt: {hint}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_folder(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N,28,28), labels int64 (N,)) from IDX files in ``root`` or ``root/MNIST/raw``."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_stem, lbl_stem = FILES[split]
    paths = [_find(root, img_stem), _find(root, lbl_stem)]
    for stem, p in zip((img_stem, lbl_stem), paths):
        if p is None:
            raise DataError(f"{stem}[.gz] not found in {root} or {root / 'MNIST' / 'raw'}; put the MNIST IDX files "
                            f"there (or pass --data-dir / set ${ENV_VAR} to a folder holding them), or allow the "
                            f"download (data.download=true, the default) to fetch them there")
    images = read_idx(paths[0], IMAGE_MAGIC)
    labels = read_idx(paths[1], LABEL_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{paths[0]} / {paths[1]}: expected (N, H, W) images and (N,) labels, got {images.shape} "
                        f"and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} labels; "
                        "the two files come from different sets: replace them with a matching pair")
    if labels.size and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} out of range 0-9; the file is corrupt")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def download_mnist(root: str | Path) -> None:
    """Download the four MNIST IDX files into ``root/MNIST/raw`` with torchvision (one line on stderr)."""
    from torchvision.datasets import MNIST

    print(f"MNIST is not in {root}: downloading it into {Path(root) / 'MNIST' / 'raw'} (about 11 MB)",
          file=sys.stderr, flush=True)
    try:
        MNIST(str(root), train=True, download=True)
    except Exception as e:  # network failures come in many types
        reason = " ".join(str(e).split())  # torchvision's message spans several lines
        names = ", ".join(f"{stem}.gz" for pair in FILES.values() for stem in pair)
        raise DataError(f"downloading MNIST with torchvision failed ({reason}); download {names} by hand (e.g. from "
                        f"{getattr(MNIST, 'mirrors', ['a mirror'])[0]}) into {Path(root) / 'MNIST' / 'raw'}, or pass --data-dir / set "
                        f"${ENV_VAR} to a folder holding them") from e


def load_mnist(root: str | Path | None = None, split: str = "train", download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (images uint8 (N,28,28), labels int64 (N,)).

    From the IDX files in ``root`` (default: $LATENTDIFF_DATA, else ``./data``), directly there or in
    torchvision's ``root/MNIST/raw``. Where they are missing and ``download`` is true, torchvision
    downloads them into ``root/MNIST/raw`` first.
    """
    root = Path(root if root is not None else os.environ.get(ENV_VAR) or "data")
    if download and split in FILES and not all(_find(root, stem) for stem in FILES[split]):
        download_mnist(root)
    return load_idx_folder(root, split)


def training_set(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split a run's ``DataConfig`` asks for: ``load_mnist(root, "train")`` without the classes in
    ``exclude_classes``."""
    images, labels = load_mnist(data.root, "train", data.download)
    if data.exclude_classes:
        keep = ~torch.isin(labels, torch.tensor(data.exclude_classes, dtype=labels.dtype))
        images, labels = images[keep], labels[keep]
    return images, labels


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]."""
    return images.float().div(127.5).sub(1.0).unsqueeze(1)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: a pure function of (step, seed), so resuming is exact.

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch is dropped.
    """
    if batch_size > n:
        raise DataError(f"batch size {batch_size} exceeds the {n} examples in the dataset; lower train.batch_size")
    epoch, k = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``, seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
