"""LatentDiffusion: VAE + UNet + schedule. ``generate()`` turns labels into digits.

``generate`` is ``decode(denoise(noise(seeds)))`` over batches; those three steps are public so that
``latentdiff.edit`` (class swap, inpainting, interpolation, trajectories) can be written on top of the
pipeline. Imports run one way: this module never imports its editors, the server, the evaluator or
the trainer (tests/test_imports.py checks it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange
from PIL import Image

from .config import DiffusionConfig, SampleConfig, to_dict
from .diffusion import make_schedule
from .errors import ModelLoadError
from .noise import seeded_normal
from .sampling import SAMPLERS, NoiseFn, StepCallback, cfg_model_fn, check_guidance_interval
from .serialization import CONFIG_NAME, atomic_write_bytes, read_config
from .timesteps import SPACINGS, make_timesteps
from .unet import UNet
from .vae import VAE


GUIDE_DIR = "guide"  # the autoguidance guide UNet inside an LDM folder (optional)
# Rows per network call by device type (run_in_tiles). CPU: the speed of batch 256 at a fraction of its
# padding cost for small requests (docs/scale.md); GPU: enough rows to fill an H100 with the quick UNet.
DEFAULT_TILE = {"cpu": 64, "cuda": 1024}


@dataclass(frozen=True)
class PipelineConfig:
    """What the LDM folder's top-level config.json holds: how the UNet was trained, default sampling."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        self.diffusion.validate()
        self.sample.validate(self.diffusion.num_timesteps)


def check_compatible(unet: UNet, vae: VAE, name: str = "UNet") -> None:
    """Raise ModelLoadError unless the UNet works on the VAE's latent grid."""
    vc, uc = vae.config, unet.config
    if (uc.in_channels, uc.sample_size) != (vc.latent_channels, vc.latent_size):
        raise ModelLoadError(
            f"{name} expects latents ({uc.in_channels}, {uc.sample_size}, {uc.sample_size}) but the VAE makes "
            f"({vc.latent_channels}, {vc.latent_size}, {vc.latent_size}); pair the UNet with the VAE it was trained on")


def check_student_options(sampler: str, guidance_interval, num_timesteps: int | None = None, eta: float = 0.0) -> None:
    """A distilled student samples with "lcm" (a consistency student, distill.py) or deterministic "ddim" (a
    progressive student, distill.method: progressive), guided at every step; ValueError naming why otherwise."""
    if sampler not in ("lcm", "ddim") or (sampler == "ddim" and eta != 0):
        raise ValueError(f"sampler {sampler!r}{' with eta > 0' if sampler == 'ddim' else ''} needs the teacher: this model "
                         "is a few-step student whose UNet predicts the end of the teacher's guided trajectory; sample it "
                         "with sampler='lcm' (consistency students) or 'ddim' with eta=0 (progressive students)")
    if guidance_interval is not None and (num_timesteps is None or tuple(guidance_interval) != (0, num_timesteps - 1)):
        raise ValueError("guidance_interval needs the teacher: this model is a distilled student that takes the "
                         "guidance scale as an input at every step; pass guidance_scale only")


class LatentDiffusion:
    """Class-conditioned latent diffusion. ``pipe.generate(labels=[3, 7])`` -> (2, 1, 28, 28) in [0, 1].

    ``guide``: an optional weaker UNet for autoguidance (saved in the folder's guide/; see ``generate``).
    """

    def __init__(self, unet: UNet, vae: VAE, config: PipelineConfig | None = None, guide: UNet | None = None,
                 tile_size: int | None = None):
        check_compatible(unet, vae)
        if guide is not None:
            check_compatible(guide, vae, "guide UNet")
            if guide.config.num_classes != unet.config.num_classes:
                raise ModelLoadError(f"the guide UNet has {guide.config.num_classes} classes but the UNet has "
                                     f"{unet.config.num_classes}; a guide must be a version of the same model")
        self.unet, self.vae = unet.eval(), vae.eval()
        self.guide = guide.eval() if guide is not None else None
        self.config = config or PipelineConfig()
        self.config.validate()
        self.alphas_cumprod = make_schedule(self.config.diffusion.schedule, self.config.diffusion.num_timesteps)
        self.tile_size = tile_size

    @property
    def tile_size(self) -> int:
        """Rows per network call: every UNet, encoder and decoder call runs on exactly this many (see ``run_in_tiles``).

        A digit's bits depend on it (the matrix kernels pick their algorithm by shape); the batch size does
        not. Default: the folder's ``sample.tile_size``, else ``DEFAULT_TILE`` for the device (64 on a CPU,
        1024 on a GPU; docs/scale.md).
        """
        return self._tile_size or self.config.sample.tile_size or DEFAULT_TILE.get(self.device.type, DEFAULT_TILE["cpu"])

    @tile_size.setter
    def tile_size(self, value: int | None) -> None:
        self._tile_size = None if value is None else _check_count("tile_size", value, " (or None for the device's default)")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_classes

    def to(self, device: str | torch.device) -> "LatentDiffusion":
        self.unet.to(device)
        self.vae.to(device)
        if self.guide is not None:
            self.guide.to(device)
        return self

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path, unet_state_dict: dict | None = None) -> None:
        """Folder with unet/, vae/ (a full copy, so the folder stands alone), guide/ (if any) and config.json."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet", unet_state_dict)
        self.vae.save_pretrained(directory / "vae")
        if self.guide is not None:
            self.guide.save_pretrained(directory / GUIDE_DIR)
        atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(to_dict(self.config), indent=2) + "\n").encode())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        tile_size: int | None = None) -> "LatentDiffusion":
        """Load an LDM run folder (config.json, unet/, vae/, and guide/ where training kept one)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(f"{directory} does not exist; pass the LDM run folder written by train_ldm.py")
        if not (directory / "unet").is_dir():
            raise ModelLoadError(f"{directory} is not an LDM run folder (no unet/ inside); pass the folder written by "
                                 "train_ldm.py (a VAE folder loads with VAE.from_pretrained)")
        config = read_config(PipelineConfig, directory)
        unet = UNet.from_pretrained(directory / "unet", device)
        vae = VAE.from_pretrained(directory / "vae", device)
        guide = UNet.from_pretrained(directory / GUIDE_DIR, device) if (directory / GUIDE_DIR).is_dir() else None
        return cls(unet, vae, config, guide, tile_size)

    # ------------------------------------------------------------------ inputs
    def check_labels(self, labels) -> torch.Tensor:
        """Class indices as a (N,) long tensor; ValueError naming the problem otherwise."""
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim != 1:
                raise ValueError(f"labels must be a 1-D integer tensor or a list of ints, got {labels.dtype} shape {tuple(labels.shape)}")
            values = labels.tolist()
        else:
            values = list(labels)
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
            if bad:
                raise ValueError(f"labels must be integers, got {bad[0]!r}; pass class indices like [3, 7]")
        if not values:
            raise ValueError("labels is empty; pass at least one class index")
        out = [v for v in values if not 0 <= v < self.num_classes]
        if out:
            raise ValueError(f"label {out[0]} is out of range; valid classes are 0..{self.num_classes - 1}")
        return torch.tensor(values, dtype=torch.long)

    def sampling_options(self, guidance_scale: float | None = None, steps: int | None = None,
                         sampler: str | None = None, eta: float | None = None,
                         guidance_interval: Sequence[int] | None = None, spacing: str | None = None,
                         autoguidance_scale: float | None = None) -> dict:
        """Sampler settings, the model's defaults filled in and each checked: the keyword arguments of ``denoise``."""
        sc = self.config.sample
        guidance_scale = sc.guidance_scale if guidance_scale is None else guidance_scale
        autoguidance_scale = sc.autoguidance_scale if autoguidance_scale is None else autoguidance_scale
        steps = sc.steps if steps is None else steps
        sampler = sc.sampler if sampler is None else sampler
        eta = sc.eta if eta is None else eta
        # Guidance interval and timestep spacing: docs/sampling-and-guidance.md.
        interval = check_guidance_interval(sc.guidance_interval if guidance_interval is None else guidance_interval,
                                           self.config.diffusion.num_timesteps)
        spacing = sc.spacing if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.diffusion.num_timesteps:
            raise ValueError(f"steps must be an integer in 1..{self.config.diffusion.num_timesteps}, got {steps!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if (isinstance(autoguidance_scale, bool) or not isinstance(autoguidance_scale, (int, float))
                or not math.isfinite(autoguidance_scale) or autoguidance_scale < 0):
            raise ValueError(f"autoguidance_scale must be a finite number >= 0 (1 = off), got {autoguidance_scale!r}")
        if autoguidance_scale != 1 and self.guide is None:
            raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide model, and this pipeline has none "
                             f"(no {GUIDE_DIR}/ in its folder): train with guide.fraction > 0, or use autoguidance_scale=1")
        if self.unet.config.guidance_input:  # a distilled student (distill.py): see check_student_options
            check_student_options(sampler, interval, self.config.diffusion.num_timesteps, eta)
        return {"guidance_scale": float(guidance_scale), "steps": steps, "sampler": sampler, "eta": float(eta),
                "guidance_interval": interval, "spacing": spacing, "autoguidance_scale": float(autoguidance_scale)}

    def check_batch_size(self, batch_size: int | None) -> int:
        """``batch_size``, or the measured default: 256 on CPU (throughput peaks there), 4096 on a GPU."""
        if batch_size is None:
            return 4096 if self.device.type == "cuda" else 256
        return _check_count("batch_size", batch_size)

    def seeds(self, n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample seeds seed, seed+1, ... (N,) int64; image i depends on its own seed only."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return torch.arange(n, dtype=torch.int64) + seed

    def compile(self, mode: str = "reduce-overhead") -> "LatentDiffusion":
        """torch.compile the UNet and VAE decoder for sampling; "reduce-overhead" adds CUDA graphs on a GPU.

        Each new batch shape compiles once (tens of seconds), so keep ``batch_size`` fixed. Returns self.
        """
        self._unet_fn = torch.compile(self.unet, mode=mode, dynamic=False)
        if self.guide is not None:
            self._guide_fn = torch.compile(self.guide, mode=mode, dynamic=False)
        self._decode_fn = torch.compile(self.vae._decode, mode=mode, dynamic=False)
        return self

    # ------------------------------------------------------------------ building blocks (latentdiff.edit uses these)
    def noise(self, seeds: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """(B, 4, 7, 7) standard normals on the device; row i from (seeds[i], stream) alone."""
        return seeded_normal(seeds.to(self.device), self.vae.latent_shape, stream=stream)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [0, 1] -> scaled latents (B, 4, 7, 7): the posterior mean, as in training."""
        x = images.to(self.device).float() * 2 - 1
        self.vae._check_images(x)
        z = run_in_tiles(lambda xx: self.vae._encode(xx).mean, self.tile_size, x)
        return self.vae.scale_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, 7, 7) -> images (B, 1, 28, 28) in [0, 1] (fp32 decode)."""
        latents = latents.to(self.device)
        if not torch.isfinite(latents).all():  # one sync per batch; NaN digits would hide where things broke
            raise ValueError(f"decode got latents with {int((~torch.isfinite(latents)).sum())} NaN/inf value(s): they "
                             "come from upstream (a diverged model, an extreme guidance_scale, corrupt input); pass finite latents")
        decoder = getattr(self, "_decode_fn", self.vae._decode)

        def decode(z: torch.Tensor) -> torch.Tensor:
            if z.device.type == "cpu":  # NHWC: oneDNN runs the decoder's convolutions ~1.4x faster (docs/scale.md)
                z = z.contiguous(memory_format=torch.channels_last)
            return decoder(z).contiguous()  # about [-1, 1]

        images = run_in_tiles(decode, self.tile_size, self.vae.unscale_latents(latents).float())
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None, *, guidance_scale: float,
                steps: int, sampler: str, eta: float = 0.0, guidance_interval: tuple[int, int] | None = None,
                spacing: str = "uniform", timesteps: torch.Tensor | None = None,
                callback: StepCallback | None = None, noise_fn: NoiseFn | None = None,
                progress: bool = False, autoguidance_scale: float = 1.0) -> torch.Tensor:
        """Run a sampler from ``latents`` (B, 4, 7, 7) to clean scaled latents, with CFG towards ``labels``.

        One batch, no checks (take the settings from ``sampling_options``). labels: (B,) class indices,
        or (B, num_classes + 1) float weights over the label embeddings (interpolation). seeds (B,):
        step i of a stochastic sampler draws noise stream i + 1 of each sample's seed, unless
        ``noise_fn(i)`` gives that noise. ``timesteps`` and ``callback`` are the samplers' hooks (start
        part way; inspect or replace the state after each step); without ``timesteps`` the sampler visits
        ``steps`` timesteps placed by ``spacing``. ``guidance_interval`` limits CFG to lo <= t <= hi.
        ``autoguidance_scale`` != 1 adds autoguidance by ``self.guide`` (see ``cfg_model_fn``).
        """
        device = self.device
        x, y = latents.to(device), labels.to(device)
        if noise_fn is None:
            if seeds is None:
                raise ValueError("denoise needs seeds (one per sample) or a noise_fn for the sampler's step noise")
            seeds = seeds.to(device)

            def noise_fn(i: int) -> torch.Tensor:
                return seeded_normal(seeds, self.vae.latent_shape, stream=i + 1)
        model = _unet_call(getattr(self, "_unet_fn", self.unet), device, self.tile_size)
        if self.unet.config.guidance_input:  # a student takes the scale as an input: one undoubled batch per step
            w = torch.full((x.shape[0],), float(guidance_scale), device=device)
            model_fn = lambda xx, tt: model(xx, tt, y, w)  # noqa: E731
        else:
            guide = None if self.guide is None else _unet_call(getattr(self, "_guide_fn", self.guide), device, self.tile_size)
            model_fn = cfg_model_fn(model, y, guidance_scale, null_label=self.num_classes,
                                    guidance_interval=guidance_interval, guide=guide, autoguidance_scale=autoguidance_scale)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        if timesteps is None:
            timesteps = make_timesteps(self.alphas_cumprod, steps, spacing)
        return SAMPLERS[sampler](model_fn, x, self.alphas_cumprod, None, self.config.diffusion.prediction,
                                 noise_fn=noise_fn, progress=progress, timesteps=timesteps, callback=callback, **kwargs)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, labels: Sequence[int] | torch.Tensor, guidance_scale: float | None = None,
                 steps: int | None = None, sampler: str | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, eta: float | None = None, batch_size: int | None = None,
                 progress: bool = False, guidance_interval: Sequence[int] | None = None,
                 spacing: str | None = None, autoguidance_scale: float | None = None) -> torch.Tensor:
        """Digits of the given classes, (N, 1, 28, 28) float in [0, 1] on the pipeline's device.

        guidance_scale: CFG scale, 1 = conditional only, 0 = unconditional (default from config.json).
        steps / sampler / eta: sampler settings ("dpm++", "ddim", "ddpm"; eta is DDIM only).
        generator or seed: randomness. Sample i uses seed + i, and its bits do not depend on batch_size, its
        place in the batch or the other labels: the network runs on fixed tiles of ``tile_size`` rows
        (``run_in_tiles``; docs/scale.md "The same digit whatever the batch").
        batch_size: digits sampled together (memory; default 256 on CPU, 4096 on a GPU).
        guidance_interval: [lo, hi] timesteps (of 0..T-1) where guidance applies; conditional only
        elsewhere (default from config.json; pass [0, T-1] to guide at every step).
        spacing: which timesteps the sampler visits, "uniform" | "trailing" | "logsnr" | "karras".
        autoguidance_scale: autoguidance weight w by the folder's guide model (1 = off; default from
        config.json); combines with CFG: out = cfg + (w - 1) * (cond - guide).
        """
        y = self.check_labels(labels)
        opts = self.sampling_options(guidance_scale, steps, sampler, eta, guidance_interval, spacing, autoguidance_scale)
        batch_size = self.check_batch_size(batch_size)
        seeds = self.seeds(len(y), seed, generator)
        out = []
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            out.append(self._sample_batch(y[sl], seeds[sl], opts, progress))
        return torch.cat(out)

    def _sample_batch(self, y: torch.Tensor, seeds: torch.Tensor, opts: dict, progress: bool) -> torch.Tensor:
        x = self.noise(seeds)  # (B, 4, 7, 7): stream 0 of each seed
        return self.decode(self.denoise(x, y, seeds, progress=progress, **opts))


def _check_count(name: str, value, alternative: str = "") -> int:
    """``value`` if it is an integer >= 1 (not a bool); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{alternative}, got {value!r}")
    return value


def run_in_tiles(fn, tile: int, *rows: torch.Tensor) -> torch.Tensor:
    """``fn(*rows)`` computed ``tile`` rows at a time, the last tile padded with copies of its last row.

    Why: a digit must get the same bits whatever batch it rides in. The CPU's matrix and convolution
    kernels choose their algorithm (and so their rounding) by the batch shape, e.g. batch 1 differs from
    batch 3 in the last bits, so every network call here has one shape. What stays, a digit's position in
    the tile and the other digits in it, changes nothing: no layer mixes samples, and the elementwise
    kernels treat every element alike (``nn.silu``); tests/test_invariance.py checks both on every CPU
    kernel set the machine has. rows: tensors whose first dimension is the batch (x, t, labels, ...).
    """
    n = rows[0].shape[0]
    out = []
    for a in range(0, n, tile):
        part = [r[a:a + tile] for r in rows]
        k = part[0].shape[0]
        if k < tile:  # (k, ...) -> (tile, ...): the pad rows are computed and dropped
            part = [torch.cat([p, p[-1:].expand(tile - k, *p.shape[1:])]) for p in part]
        out.append(fn(*part)[:k])
    return out[0] if len(out) == 1 else torch.cat(out)


def _unet_call(unet, device: torch.device, tile: int):
    """The UNet call in fixed tiles (``run_in_tiles``), as it runs fastest on ``device``; the sampler's maths stays fp32, NCHW.

    On a GPU: bf16 autocast. On a CPU: the input in channels-last (NHWC) memory, which oneDNN's
    convolutions run ~1.15x faster than NCHW here (docs/scale.md); the output back in NCHW.
    """
    if device.type == "cuda":
        def call(xx, tt, yy, *w):  # *w: a distilled student's guidance-scale input
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return unet(xx, tt, yy, *w).float()
    elif device.type == "cpu":
        def call(xx, tt, yy, *w):
            return unet(xx.contiguous(memory_format=torch.channels_last), tt, yy, *w).contiguous()
    else:
        call = unet
    return lambda *args: run_in_tiles(call, tile, *args)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 1, H, W) in [0, 1] -> list of grayscale PIL images."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()[:, 0].numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """(N, 1, H, W) in [0, 1] -> one PIL grid image, ``nrow`` images per row, always ``nrow`` tiles wide.

    torchvision.utils.make_grid's layout (black padding around and between the tiles), written here so that
    the pipeline does not import torchvision: its import pulls in torch._dynamo, ~5 s of every start-up.
    """
    x = images.detach().float().cpu().clamp(0, 1)[:, 0]
    x = torch.nn.functional.pad(x, (padding, 0, padding, 0))  # each tile with its top and left border
    blank = -len(x) % nrow if len(x) else nrow  # blank tiles up to full rows (a lone row of blanks for no images)
    x = torch.cat([x, x.new_zeros(blank, *x.shape[1:])])
    grid = torch.nn.functional.pad(rearrange(x, "(r c) h w -> (r h) (c w)", c=nrow), (0, padding, 0, padding))
    return Image.fromarray((grid * 255).round().to(torch.uint8).numpy())
