"""Latents for other experiments: encode a whole MNIST split with a saved VAE, store it, decode any latents.

The file is safetensors: ``latents`` (N, 4, 7, 7) float32, scaled as the diffusion model sees them,
``(z - shift) * scale``, and ``labels`` (N,) int64; the metadata holds ``scaling_factor`` and
``shift_factor`` (exact float reprs), the split and the VAE folder, so the file decodes on its own terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .data import load_mnist, to_model_range
from .errors import DataError
from .pipeline import check_count
from .serialization import atomic_save_safetensors
from .vae import VAE, encode_all


@dataclass(frozen=True)
class LatentSet:
    latents: torch.Tensor   # (N, 4, 7, 7) scaled: (z - shift_factor) * scaling_factor
    labels: torch.Tensor    # (N,) int64
    scaling_factor: float
    shift_factor: float
    metadata: dict


def encode_split(vae: VAE, data_root: str | Path | None, split: str = "test", batch_size: int = 256,
                 limit: int | None = None) -> LatentSet:
    """Encode an MNIST split (the first ``limit`` digits, or all) with the VAE's stored scale and shift."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    check_count("batch_size", batch_size)
    images_u8, labels = load_mnist(data_root, split)
    images_u8, labels = images_u8[:limit], labels[:limit]
    latents = vae.scale_latents(encode_all(vae, to_model_range(images_u8), batch_size)).cpu()  # (N, 4, 7, 7)
    c = vae.config
    return LatentSet(latents, labels, c.scaling_factor, c.shift_factor, {"split": split})


def save_latents(path: str | Path, data: LatentSet, **metadata: str) -> None:
    """Write a LatentSet to ``path`` (.safetensors), atomically."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; pass a file name, e.g. {Path(path) / 'latents.safetensors'}")
    meta = {**data.metadata, **metadata, "scaling_factor": repr(data.scaling_factor),
            "shift_factor": repr(data.shift_factor), "layout": "latents (N,C,H,W) = (z - shift_factor) * scaling_factor"}
    atomic_save_safetensors({"latents": data.latents.float(), "labels": data.labels.long()}, Path(path),
                            metadata={k: str(v) for k, v in meta.items()})


def load_latents(path: str | Path) -> LatentSet:
    """Read a file written by ``save_latents``; DataError naming what is wrong otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a latents .safetensors file (write one with `python edit.py encode`)")
    if not path.is_file():
        raise DataError(f"{path} not found; write one with `python edit.py encode`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            missing = {"latents", "labels"} - keys
            if missing or not {"scaling_factor", "shift_factor"} <= set(meta):
                raise DataError(f"{path} is not a latents file (missing {sorted(missing) or 'scaling_factor/shift_factor'}); "
                                "write one with `python edit.py encode`")
            latents, labels = f.get_tensor("latents"), f.get_tensor("labels")
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path} is truncated or not a safetensors file ({e})") from e
    return LatentSet(latents, labels, float(meta["scaling_factor"]), float(meta["shift_factor"]), meta)


@torch.no_grad()
def decode_latents(vae: VAE, data: LatentSet, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents -> images (N, 1, 28, 28) in [0, 1], unscaled with the file's own scale and shift."""
    check_count("batch_size", batch_size)
    want = (vae.config.latent_channels, vae.config.latent_size, vae.config.latent_size)
    if data.latents.ndim != 4 or tuple(data.latents.shape[1:]) != want:
        raise ValueError(f"latents have shape {tuple(data.latents.shape)} but this VAE decodes (N, {', '.join(map(str, want))})")
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(data.latents), batch_size):
        z = data.latents[i:i + batch_size].to(device) / data.scaling_factor + data.shift_factor
        out.append(((vae.decode(z) + 1) / 2).cpu())
    return torch.cat(out)
