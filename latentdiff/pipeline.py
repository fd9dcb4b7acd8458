"""LatentDiffusion: VAE + UNet + schedule. ``generate()`` turns labels into digits.

``generate`` is ``decode(sample(noise(seeds)))`` over batches; those three steps are public so that
``latentdiff.edit`` (class swap, inpainting, interpolation, trajectories) can be written on top of the
pipeline. Imports run one way: this module never imports its editors, the server, the evaluator or
the trainer (tests/test_imports.py checks it).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange
from PIL import Image

from .config import DiffusionConfig, SampleConfig, to_dict
from .diffusion import make_schedule
from .errors import ModelLoadError
from .noise import seeded_normal
from .sampling import SAMPLERS, Denoiser, NoiseFn, StepCallback, guided
from .serialization import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, check_device, model_dir, read_config,
                            read_tensors, sha256)
from .timesteps import make_timesteps
from .unet import TaughtUNet, UNet
from .vae import VAE, check_image_batch


GUIDE_DIR = "guide"  # the autoguidance guide UNet inside an LDM folder (optional)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"  # a taught-classes folder (latentdiff.teach)
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


def read_adapter(directory: str | Path) -> tuple[Path, str, list[str]]:
    """A taught-classes folder's adapter.json (latentdiff.teach): (its base LDM folder, resolved; the base UNet's
    SHA-256 it was taught on; the taught classes' names). ModelLoadError if it is not one teach.py wrote."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
        base, want, names = Path(meta["base"]), str(meta["base_unet_sha256"]), list(meta["class_names"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is invalid ({e}); re-run teach.py") from None
    return (base if base.is_absolute() else (Path(directory) / base).resolve()), want, names


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
        self.class_names = [str(c) for c in range(unet.config.num_classes)]  # label i's name; taught classes add theirs
        # The callables sampling runs: the modules themselves, or their compiled versions after ``compile()``.
        self.compiled: dict[str, object] = {}

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
        self._tile_size = None if value is None else check_count("tile_size", value, " (or None for the device's default)")

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
        directory = model_dir(directory)
        device = check_device(device)
        if directory.is_file():
            raise ModelLoadError(f"{directory} is a file, not a folder; pass the LDM run folder written by train_ldm.py")
        if not directory.is_dir():
            raise ModelLoadError(f"{directory} does not exist; pass the LDM run folder written by train_ldm.py")
        if (directory / ADAPTER_CONFIG).is_file():
            return cls._from_adapter(directory, device, tile_size)
        if not (directory / "unet").is_dir():
            raise ModelLoadError(f"{directory} is not an LDM run folder (no unet/ inside); pass the folder written by "
                                 "train_ldm.py (a VAE folder loads with VAE.from_pretrained)")
        config = read_config(PipelineConfig, directory)
        unet = UNet.from_pretrained(directory / "unet", device)
        vae = VAE.from_pretrained(directory / "vae", device)
        guide = UNet.from_pretrained(directory / GUIDE_DIR, device) if (directory / GUIDE_DIR).is_dir() else None
        return cls(unet, vae, config, guide, tile_size)

    @classmethod
    def _from_adapter(cls, directory: Path, device, tile_size: int | None) -> "LatentDiffusion":
        """A taught-classes folder (teach.py): its base model, loaded from where the adapter says, with the taught
        classes' label embeddings added after the base's own. The base folder is only read."""
        base, want, names = read_adapter(directory)
        weights = base / "unet" / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelLoadError(f"{directory} adds classes to the base model {base}, which is missing; restore it "
                                 "there, or teach again on the model you have")
        if sha256(weights) != want:
            raise ModelLoadError(f"{directory} was taught on another model than the one now at {base} (its UNet's "
                                 "weights differ); restore that base, or teach again on this one")
        pipe = cls.from_pretrained(base, device, tile_size)
        tensors = read_tensors(directory / ADAPTER_WEIGHTS, "re-run teach.py")
        rows = tensors["class_embed"]
        if rows.shape[0] != len(names):
            raise ModelLoadError(f"{directory}: {rows.shape[0]} taught embeddings but {len(names)} class names; re-run teach.py")
        grown = pipe.unet.with_classes(rows.to(pipe.device)).eval()
        tuned = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        lora = {k[len("lora."):-len(".A")] for k in tensors if k.startswith("lora.") and k.endswith(".A")}
        try:
            if tuned:  # a fine-tuned adapter (teach method "finetune") carries the whole tuned UNet: taught classes only
                grown.load_state_dict(tuned)
            elif lora:  # a LoRA adapter ("lora"): its factors, merged into the grown base here, so no peft at sampling
                grown = grown.with_lora({n: (tensors[f"lora.{n}.A"], tensors[f"lora.{n}.B"]) for n in sorted(lora)})
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{directory}'s tuned weights do not fit its base ({e}); re-run teach.py") from None
        return pipe.with_taught(grown, names, routed=bool(tuned or lora))

    def with_taught(self, unet: UNet, names: list[str], routed: bool) -> "LatentDiffusion":
        """A new pipeline with the classes ``names`` added after this one's: ``unet`` is this pipeline's UNet grown by
        them (``UNet.with_classes``, then taught). ``routed``: ``unet`` is a tuned copy that serves only the taught
        classes (``TaughtUNet`` over this pipeline's base UNet). Shares the VAE; ``self`` is unchanged. Without the
        autoguidance guide, which learned no new class."""
        base = self.unet.base if isinstance(self.unet, TaughtUNet) else self.unet
        out = LatentDiffusion(TaughtUNet(base, unet) if routed else unet, self.vae, self.config, None, self._tile_size)
        out.class_names = self.class_names + list(names)
        return out

    # ------------------------------------------------------------------ inputs
    def check_labels(self, labels) -> torch.Tensor:
        """Class indices as a (N,) long tensor; ValueError naming the problem otherwise."""
        return check_labels(labels, self.num_classes)

    def settings(self, **overrides) -> SampleConfig:
        """The sampling settings of one call: the folder's ``sample`` config with ``overrides`` (None keeps the
        default), checked once, here. Keywords: ``SampleConfig.CALL_KEYS``. ValueError naming the bad one."""
        unknown = sorted(set(overrides) - set(SampleConfig.CALL_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling setting {unknown[0]!r}; the settings are {list(SampleConfig.CALL_KEYS)}")
        given = {k: _plain_number(v) for k, v in overrides.items() if v is not None}
        if isinstance(given.get("guidance_interval"), list):
            given["guidance_interval"] = tuple(given["guidance_interval"])
        s = replace(self.config.sample, **given)
        s.validate(self.config.diffusion.num_timesteps, student=self.unet.config.guidance_input, prefix="")
        if s.autoguidance_scale != 1 and self.guide is None:
            raise ValueError(f"autoguidance_scale={s.autoguidance_scale} needs a guide model, and this pipeline has none "
                             f"(no {GUIDE_DIR}/ in its folder): train with guide.fraction > 0, or use autoguidance_scale=1")
        return replace(s, guidance_scale=float(s.guidance_scale), eta=float(s.eta),
                       autoguidance_scale=float(s.autoguidance_scale))

    def check_batch_size(self, batch_size: int | None) -> int:
        """``batch_size``, or the measured default: 256 on CPU (throughput peaks there), 4096 on a GPU."""
        if batch_size is None:
            return 4096 if self.device.type == "cuda" else 256
        return check_count("batch_size", batch_size)

    def seeds(self, n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample seeds seed, seed+1, ... (N,) int64; image i depends on its own seed only."""
        if seed is not None:
            seed = check_seed(seed, "seed", n)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return torch.arange(n, dtype=torch.int64) + seed

    def compile(self, mode: str = "reduce-overhead") -> "LatentDiffusion":
        """torch.compile the UNet (and guide) and the VAE decoder for sampling; "reduce-overhead" adds CUDA graphs on a GPU.

        Each new batch shape compiles once (tens of seconds); with fixed tiles (``tile_size``) that is one
        shape per network. Returns self.
        """
        self.compiled = {"unet": torch.compile(self.unet, mode=mode, dynamic=False),
                         "decode": torch.compile(self.vae._decode, mode=mode, dynamic=False)}
        if self.guide is not None:
            self.compiled["guide"] = torch.compile(self.guide, mode=mode, dynamic=False)
        return self

    @property
    def denoiser(self) -> Denoiser:
        """The UNet as a ``Denoiser`` (x_t, t, labels[, w]) -> (x0, eps): its schedule and prediction type, run in
        fixed tiles as fits the device; a distilled student takes the guidance scale as an input."""
        net = _unet_call(self.compiled.get("unet", self.unet), self.device, self.tile_size)
        return Denoiser(net, self.alphas_cumprod, self.config.diffusion.prediction, self.unet.config.guidance_input)

    @property
    def guide_denoiser(self) -> Denoiser | None:
        """The autoguidance guide UNet as a ``Denoiser`` (None without a guide)."""
        if self.guide is None:
            return None
        net = _unet_call(self.compiled.get("guide", self.guide), self.device, self.tile_size)
        return Denoiser(net, self.alphas_cumprod, self.config.diffusion.prediction)

    # ------------------------------------------------------------------ building blocks (latentdiff.edit uses these)
    def noise(self, seeds: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """(B, 4, 7, 7) standard normals on the device; row i from (seeds[i], stream) alone."""
        return seeded_normal(seeds.to(self.device), self.vae.latent_shape, stream=stream)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [0, 1] -> scaled latents (B, 4, 7, 7): the posterior mean, as in training."""
        check_image_batch(images, self.vae.config.in_channels, self.vae.config.image_size, (0.0, 1.0), "encode", min_batch=1)
        x = images.to(self.device).float() * 2 - 1
        z = run_in_tiles(lambda xx: self.vae._encode(xx).mean, self.tile_size, x)
        return self.vae.scale_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, 7, 7) -> images (B, 1, 28, 28) in [0, 1] (fp32 decode)."""
        shape = self.vae.latent_shape
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != shape or not len(latents):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"decode expects scaled latents of shape (B, {', '.join(map(str, shape))}) with B >= 1; got {got}")
        latents = latents.to(self.device)
        if not torch.isfinite(latents).all():  # one sync per batch; NaN digits would hide where things broke
            raise ValueError(f"decode got latents with {int((~torch.isfinite(latents)).sum())} NaN/inf value(s): they "
                             "come from upstream (a diverged model, an extreme guidance_scale, corrupt input); pass finite latents")
        decoder = self.compiled.get("decode", self.vae._decode)

        def decode(z: torch.Tensor) -> torch.Tensor:
            if z.device.type == "cpu":  # NHWC: oneDNN runs the decoder's convolutions ~1.4x faster (docs/scale.md)
                z = z.contiguous(memory_format=torch.channels_last)
            return decoder(z).contiguous()  # about [-1, 1]

        images = run_in_tiles(decode, self.tile_size, self.vae.unscale_latents(latents).float())
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None, settings: SampleConfig, *,
               timesteps: torch.Tensor | None = None, callback: StepCallback | None = None,
               noise_fn: NoiseFn | None = None, progress: bool = False) -> torch.Tensor:
        """Run the sampler of ``settings`` from ``latents`` (B, 4, 7, 7) to clean scaled latents, guided towards ``labels``.

        One batch, no checks (take ``settings`` from ``self.settings(...)``). labels: (B,) class indices, or
        (B, num_classes + 1) float weights over the label embeddings (interpolation). seeds (B,): step i of a
        stochastic sampler draws noise stream i + 1 of each sample's seed, unless ``noise_fn(i)`` gives that
        noise. ``timesteps`` and ``callback`` are the samplers' hooks (start part way; inspect or replace the
        state after each step); without ``timesteps`` the sampler visits ``settings.steps`` timesteps placed by
        ``settings.spacing``.
        """
        x, y = latents.to(self.device), labels.to(self.device)
        if noise_fn is None:
            if seeds is None:
                raise ValueError("sample needs seeds (one per sample) or a noise_fn for the sampler's step noise")
            seeds = seeds.to(self.device)

            def noise_fn(i: int) -> torch.Tensor:
                return seeded_normal(seeds, self.vae.latent_shape, stream=i + 1)
        s = settings
        denoiser = guided(self.denoiser, y, s.guidance_scale, self.num_classes, s.guidance_interval,
                          self.guide_denoiser, s.autoguidance_scale)
        if timesteps is None:
            timesteps = make_timesteps(self.alphas_cumprod, s.steps, s.spacing)
        options = {"eta": s.eta} if s.sampler == "ddim" else {}
        return SAMPLERS[s.sampler](denoiser, x, timesteps, noise_fn, callback, progress, **options)

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
        settings = self.settings(guidance_scale=guidance_scale, steps=steps, sampler=sampler, eta=eta,
                                 guidance_interval=guidance_interval, spacing=spacing,
                                 autoguidance_scale=autoguidance_scale)
        batch_size = self.check_batch_size(batch_size)
        seeds = self.seeds(len(y), seed, generator)
        out = []
        for start in range(0, len(y), batch_size):
            part = slice(start, start + batch_size)
            latents = self.noise(seeds[part])  # (B, 4, 7, 7): stream 0 of each seed
            out.append(self.decode(self.sample(latents, y[part], seeds[part], settings, progress=progress)))
        return torch.cat(out)


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """Class indices in 0..num_classes-1 as a (N,) long tensor; ValueError naming the problem otherwise."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D integer tensor or a list of ints, got {labels.dtype} shape {tuple(labels.shape)}")
        values = labels.tolist()
    else:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
            one = f"; for one digit pass [{labels!r}]" if isinstance(labels, numbers.Integral) else ""
            raise ValueError(f"labels must be a list of class indices (integers) like [3, 7], got {labels!r}{one}")
        values = list(labels)
        # numpy integers (a label array from load_mnist, np.arange) are class indices too; bools and floats are not
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise ValueError(f"labels must be integers, got {bad[0]!r}; pass class indices like [3, 7]")
        values = [int(v) for v in values]
    if not values:
        raise ValueError("labels is empty; pass at least one class index")
    out = [v for v in values if not 0 <= v < num_classes]
    if out:
        raise ValueError(f"label {out[0]} is out of range; valid classes are 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.long)


def check_seed(seed, name: str = "seed", n: int = 1) -> int:
    """``seed`` as an int such that seed .. seed + n - 1 are int64 seeds; ValueError naming ``name`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    seed, lo, hi = int(seed), -2**63, 2**63 - max(n, 1)
    if not lo <= seed <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi} (64-bit seeds; sample i uses {name} + i), got {seed}")
    return seed


def _plain_number(value):
    """numpy scalars (np.int64 from np.arange, np.float32) as Python numbers, so the settings' checks take them."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def check_count(name: str, value, alternative: str = "") -> int:
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
