"""Sharded sampling for large data sets: digits split into shards, shards split over processes, resumable.

Digit i of a job has label ``labels[i % len(labels)]`` and seed ``seed + i``, so each shard (digits
``k*S .. k*S+S-1``) is one fixed computation: any number of processes give byte-identical files. Process
r of W makes shards k with ``k % W == r``. A shard is ``shard-KKKKK.safetensors`` (images uint8
(n, 28, 28), labels int64 (n,), seeds int64 (n,)) written atomically, then a sidecar
``shard-KKKKK.json`` with its SHA-256: a rerun keeps shards whose checksum matches and makes the rest.
``index.json`` lists every shard once all are done. Format choice: docs/scale.md (bench/shard_formats.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import disk_full_errors
from .errors import DataError, RunDirError
from .serialization import atomic_save_safetensors, atomic_write_bytes, sha256

FORMAT = "latentdiff-shards/1"
JOB_NAME, INDEX_NAME = "job.json", "index.json"


@dataclass(frozen=True)
class Job:
    """What a sharded sampling job makes; saved as job.json, and a rerun must ask for the same."""

    model: str
    labels: list[int]
    num_digits: int
    seed: int
    shard_size: int
    settings: dict  # sampler settings with the model's defaults filled in (``pipe.settings(...).to_kwargs()``)
    tile_size: int  # rows per network call (pipe.tile_size): a digit's bits depend on it, so every process uses the job's

    def __post_init__(self) -> None:
        if self.num_digits < 1 or self.shard_size < 1:
            raise ValueError(f"--num-digits and --shard-size must be >= 1, got {self.num_digits} and {self.shard_size}")
        if not self.labels:
            raise ValueError("--labels is empty; pass at least one class")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(f"tile_size must be an integer >= 1, got {self.tile_size!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_digits // self.shard_size)

    def span(self, k: int) -> tuple[int, int]:
        """Digits [start, stop) of shard k."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_digits)

    def labels_of(self, start: int, stop: int) -> list[int]:
        return [self.labels[i % len(self.labels)] for i in range(start, stop)]


def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / f"shard-{k:05d}.safetensors"


def finished_shard(out_dir: Path, job: Job, k: int) -> dict | None:
    """The sidecar of shard k if the shard is complete and its checksum matches, else None (make it again)."""
    path, side = shard_path(out_dir, k), shard_path(out_dir, k).with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
        start, stop = job.span(k)
        if meta["start"] == start and meta["count"] == stop - start and meta["sha256"] == sha256(path):
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def saved_job(out_dir: Path) -> dict | None:
    """The job.json an earlier run of this folder wrote, or None."""
    saved = out_dir / JOB_NAME
    if not saved.is_file():
        return None
    try:
        job = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{saved} is unreadable or corrupt ({e}); its job's settings are lost: choose a new "
                          "--out-dir (the shards there cannot be checked against this run)") from None
    if not isinstance(job, dict):
        raise RunDirError(f"{saved} is not a sampling job (a JSON object); choose a new --out-dir")
    return job


def check_job(out_dir: Path, job: Job) -> None:
    """Refuse an output folder that holds another job (or other files); call on every process before writing."""
    old = saved_job(out_dir)
    if old is not None:
        diff = sorted(k for k in asdict(job) if old.get(k) != asdict(job)[k])
        if diff:
            k = diff[0]
            raise RunDirError(f"{out_dir} holds another sampling job ({k} was {old.get(k)!r}, now {asdict(job)[k]!r}); "
                              "rerun with the same settings to continue it, or choose a new --out-dir")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise RunDirError(f"{out_dir} is not empty and holds no {JOB_NAME}; choose a new or empty --out-dir")


def start_job(out_dir: Path, job: Job) -> None:
    """Main process, after check_job: write job.json and drop temporary files a killed run left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    if not (out_dir / JOB_NAME).is_file():
        atomic_write_bytes(out_dir / JOB_NAME, (json.dumps(asdict(job), indent=1) + "\n").encode())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) float in [0, 1] -> (N, 28, 28) uint8, rounded as sample.py --npz does."""
    return (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def make_shard(pipe, job: Job, k: int, out_dir: Path, batch_size: int, on_batch: Callable[[int], None]) -> dict:
    """Generate shard k batch by batch, write it and its sidecar; returns the sidecar."""
    start, stop = job.span(k)
    if pipe.tile_size != job.tile_size:
        raise RunDirError(f"this job's digits are made in tiles of {job.tile_size} rows and the pipeline's tile size is "
                          f"{pipe.tile_size}; load it with tile_size={job.tile_size} (sample.py --tile-size {job.tile_size})")
    parts = []
    for a in range(start, stop, batch_size):  # memory: one batch of floats, one shard of uint8
        b = min(a + batch_size, stop)
        parts.append(to_uint8(pipe.generate(job.labels_of(a, b), seed=job.seed + a, batch_size=batch_size, **job.settings)))
        on_batch(b - a)
    tensors = {"images": torch.cat(parts), "labels": torch.tensor(job.labels_of(start, stop), dtype=torch.int64),
               "seeds": torch.arange(start, stop, dtype=torch.int64) + job.seed}
    path = shard_path(out_dir, k)
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
    with disk_full_errors(out_dir, need, f"shard {path.name}", lambda: None):  # the atomic writers remove their temp files
        atomic_save_safetensors(tensors, path, metadata={"format": FORMAT})  # one key: safetensors writes a map in random order
        meta = {"file": path.name, "start": start, "count": stop - start, "sha256": sha256(path)}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
    return meta


def run_shards(pipe, job: Job, out_dir: Path, rank: int, world: int, batch_size: int,
               on_batch: Callable[[int], None] = lambda n: None) -> tuple[int, int]:
    """Make this process's shards (k % world == rank) that are not already finished; returns (made, kept) digits."""
    made = kept = 0
    for k in range(rank, job.num_shards, world):
        start, stop = job.span(k)
        if finished_shard(out_dir, job, k) is not None:
            kept += stop - start
            on_batch(stop - start)
            continue
        make_shard(pipe, job, k, out_dir, batch_size, on_batch)
        made += stop - start
    return made, kept


def write_index(out_dir: Path, job: Job) -> dict:
    """Main process, after every process finished: index.json listing each verified shard."""
    shards = []
    for k in range(job.num_shards):
        meta = finished_shard(out_dir, job, k)
        if meta is None:
            raise RunDirError(f"{shard_path(out_dir, k)} is missing or fails its checksum; rerun the same command")
        shards.append(meta)
    index = {"format": FORMAT, "num_digits": job.num_digits, "shard_size": job.shard_size, "job": asdict(job),
             "tensors": {"images": "uint8 (n, 28, 28), white digit on black", "labels": "int64 (n,)",
                         "seeds": "int64 (n,): digit i of the job has seed job.seed + i"},
             "shards": shards}  # no timestamp: 1 and N processes give byte-identical folders
    atomic_write_bytes(out_dir / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return index


def read_index(out_dir: Path) -> dict:
    """The index.json of a finished --out-dir; DataError naming what the folder is instead."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        what = "does not exist" if not out_dir.exists() else "is a file"
        raise DataError(f"{out_dir} {what}; pass a folder written by sample.py --out-dir")
    path = out_dir / INDEX_NAME
    if not path.is_file():
        if (out_dir / JOB_NAME).is_file():
            raise DataError(f"{out_dir} holds an unfinished sampling job (no {INDEX_NAME} yet); rerun the same "
                            "sample.py command to finish it")
        raise DataError(f"{out_dir} is not a shard folder (no {INDEX_NAME}); pass a folder written by sample.py --out-dir")
    try:
        index = json.loads(path.read_text())
        shards = index["shards"]
        if index.get("format") != FORMAT or not all({"start", "count", "file"} <= set(s) for s in shards):
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable shard index ({type(e).__name__}: {e}); rerun the sample.py command "
                        "that wrote the folder: it writes the index again") from None
    return index


class ShardDataset(torch.utils.data.Dataset):
    """Digits of a finished --out-dir as a torch Dataset: (image float (1, 28, 28) in [0, 1], label); shards are memory-mapped."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.shards = [(s["start"], s["count"], s["file"]) for s in read_index(self.dir)["shards"]]
        missing = [name for _, _, name in self.shards if not (self.dir / name).is_file()]
        if missing:
            raise DataError(f"{self.dir / missing[0]} is missing ({len(missing)} of {len(self.shards)} shards); "
                            "rerun the sample.py command that wrote the folder: it makes the missing shards again")
        self.size, self._open = sum(count for _, count, _ in self.shards), {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.size:
            raise IndexError(f"digit {i} is out of range 0..{self.size - 1}")
        start, count, name = self.shards[i // self.shards[0][1]]  # every shard but the last holds shard_size digits
        if name not in self._open:  # opened lazily, so each DataLoader worker has its own handles
            try:
                self._open[name] = safe_open(str(self.dir / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise DataError(f"{self.dir / name} is missing, truncated or corrupt ({e}); rerun the sample.py command "
                                "that wrote the folder: it makes shards that fail their checksum again") from None
        f, j = self._open[name], i - start
        image = f.get_slice("images")[j:j + 1].float() / 255  # (1, 28, 28): reads one image, not the shard
        return image, int(f.get_slice("labels")[j:j + 1][0])
