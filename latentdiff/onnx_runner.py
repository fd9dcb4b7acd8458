"""Sampling an exported model (``latentdiff.export``) with ONNX Runtime on the CPU.

``OnnxDiffusion("exported/").generate([3, 7], seed=0)`` gives the digits ``LatentDiffusion.generate`` gives for
the same model, settings and seeds, to within ``MATCH_TOLERANCE`` (the graphs' float rounding differs from
PyTorch's in the last bits; docs/onnx.md). Only the networks run in ONNX Runtime: the noise
(``noise.seeded_normal``), the timesteps and the samplers (``sampling.SAMPLERS``) are the package's own, so the
sampler arithmetic is PyTorch's, on the graphs' outputs.

Unlike the PyTorch pipeline it runs a whole batch per graph call (no fixed tiles), so a digit's last bits
may depend on its batch; its grey levels do not (tests/test_export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import SampleConfig
from .errors import ModelLoadError
from .export import FORMAT, MANIFEST, session
from .noise import seeded_normal
from .pipeline import check_count, check_labels, check_seed
from .sampling import SAMPLERS
from .timesteps import make_timesteps

OPTIMIZATIONS = ("basic", "extended", "all")  # ONNX Runtime's graph optimisation levels (export.session)
MATCH_TOLERANCE = 1e-3  # largest |ORT - PyTorch| pixel difference of a digit in [0, 1] (measured ~1e-5)


@dataclass(frozen=True)
class OnnxDenoiser:
    """The exported step as a guided denoiser of (x, t): what ``sampling``'s samplers call.

    Picks the graph per step as ``sampling.guided`` picks its batch: a student's step takes the scale; a
    teacher runs the guided (doubled) step inside its guidance interval, else the conditional step alone,
    with the null label at scale 0.
    """

    runner: "OnnxDiffusion"
    labels: np.ndarray  # (B,) int64
    scale: float
    interval: tuple[int, int] | None
    alphas_cumprod: torch.Tensor

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {"x": x.float().numpy(), "t": t.numpy().astype(np.int64), "labels": self.labels}
        use_cfg = self.interval is None or self.interval[0] <= int(t[0]) <= self.interval[1]
        if self.runner.student or (use_cfg and self.scale not in (0.0, 1.0)):
            name, feed["scale"] = "step", np.full(len(x), self.scale, dtype=np.float32)
        else:
            name = "step_cond"
            if use_cfg and self.scale == 0.0:
                feed["labels"] = np.full_like(self.labels, self.runner.manifest["null_label"])
        x0, eps = self.runner.session(name).run(None, feed)
        return torch.from_numpy(x0), torch.from_numpy(eps)


class OnnxDiffusion:
    """An exported model in ONNX Runtime: ``generate``, ``sample``, ``decode``, ``encode`` as ``LatentDiffusion``'s.

    threads: intra-op threads per graph (None: ONNX Runtime's default, one per core). optimization: ONNX Runtime's
    graph optimisations, "basic", "extended" or "all" (docs/onnx.md measures them).
    """

    def __init__(self, folder: str | Path, threads: int | None = None, optimization: str = "all"):
        if optimization not in OPTIMIZATIONS:
            raise ValueError(f"optimization must be one of {list(OPTIMIZATIONS)}, got {optimization!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None (one per core), got {threads!r}")
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no {MANIFEST}; pass a folder written by python -m latentdiff.export")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is format {self.manifest.get('format')!r}, this runner reads {FORMAT!r}: "
                                 "export the model again with this version")
        self.folder, self.threads, self.optimization = folder, threads, optimization
        self._sessions: dict[str, object] = {}
        self.student = self.manifest["kind"] == "student"
        self.alphas_cumprod = torch.tensor(self.manifest["alphas_cumprod"], dtype=torch.float64)
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = self.manifest["num_classes"]

    def session(self, name: str):
        """The ONNX Runtime session of graph ``name`` ("step", "step_cond", "decode", "encode"), made on first use:
        a session optimises its graph when made (~0.1-0.3 s each), and generating needs neither encode nor,
        for a teacher at its defaults, step_cond."""
        if name not in self._sessions:
            self._sessions[name] = session(self.folder / self.manifest["graphs"][name], self.threads, self.optimization)
        return self._sessions[name]

    def settings(self, **overrides) -> SampleConfig:
        """The manifest's default settings with ``overrides`` (None keeps the default), checked as the pipeline's."""
        unknown = sorted(set(overrides) - set(SampleConfig.CALL_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling setting {unknown[0]!r}; the settings are {list(SampleConfig.CALL_KEYS)}")
        given = {k: v for k, v in {**self.manifest["sample"], **overrides}.items() if v is not None}
        if given.get("guidance_interval") is not None:
            given["guidance_interval"] = tuple(given["guidance_interval"])
        s = replace(SampleConfig(), **given)
        s.validate(len(self.alphas_cumprod), student=self.student, prefix="")
        if s.autoguidance_scale != 1.0:
            raise ValueError("an exported model has no guide network: use autoguidance_scale=1")
        return replace(s, guidance_scale=float(s.guidance_scale), eta=float(s.eta))

    def sample(self, latents: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor, settings: SampleConfig) -> torch.Tensor:
        """The sampler of ``settings`` from ``latents`` to clean scaled latents, as ``LatentDiffusion.sample``."""
        denoiser = OnnxDenoiser(self, labels.numpy().astype(np.int64), settings.guidance_scale,
                                settings.guidance_interval, self.alphas_cumprod)
        timesteps = make_timesteps(self.alphas_cumprod, settings.steps, settings.spacing)
        options = {"eta": settings.eta} if settings.sampler == "ddim" else {}

        def noise(i: int) -> torch.Tensor:  # step i's fresh noise: stream i + 1 of each seed, as the pipeline's
            return seeded_normal(seeds, self.latent_shape, stream=i + 1)
        return SAMPLERS[settings.sampler](denoiser, latents, timesteps, noise, None, False, **options)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 1, 28, 28) in [0, 1]."""
        return torch.from_numpy(self.session("decode").run(None, {"latents": latents.float().numpy()})[0])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [0, 1] -> scaled latents (the posterior mean)."""
        return torch.from_numpy(self.session("encode").run(None, {"images": images.float().numpy()})[0])

    @torch.no_grad()
    def generate(self, labels: Sequence[int], seed: int = 0, batch_size: int = 256, **overrides) -> torch.Tensor:
        """Digits of ``labels``, (N, 1, 28, 28) in [0, 1]; digit i from seed + i. ``overrides``: the settings."""
        y = check_labels(labels, self.num_classes)  # the pipeline's checks: no float or bool label is truncated
        seed, batch_size = check_seed(seed, "seed", len(y)), check_count("batch_size", batch_size)
        settings = self.settings(**overrides)
        seeds = torch.arange(len(y), dtype=torch.int64) + seed
        out = []
        for a in range(0, len(y), batch_size):
            s = seeds[a:a + batch_size]
            out.append(self.decode(self.sample(seeded_normal(s, self.latent_shape), y[a:a + batch_size], s, settings)))
        return torch.cat(out)
