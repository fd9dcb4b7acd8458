"""Convolutional VAE with a diagonal-Gaussian posterior: (B,1,28,28) in [-1,1] <-> (B,4,7,7).

Also the dataset helpers that belong to it: ``encode_all`` (posterior means of many images) and
``latent_stats`` (the latent shift and scale, stored in the VAE's config as their one source of truth).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .nn import Attention, Downsample, ResBlock, SiLU, Upsample
from .noise import seeded_normal
from .serialization import load_model, save_model


class DiagonalGaussian:
    """A diagonal Gaussian over latents, parameterised by mean and log-variance."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * noise; noise from ``generator`` or per-example ``seeds`` (B,)."""
        if seeds is not None:
            noise = seeded_normal(seeds, tuple(self.mean.shape[1:]), stream=1, dtype=self.mean.dtype)
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """Per-element KL(q || N(0, I)), same shape as the mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


def check_image_batch(x, channels: int, size: int, value_range: tuple[float, float], who: str, min_batch: int = 0) -> None:
    """ValueError naming the problem and its fix unless ``x`` is a finite float tensor (B, channels, size, size),
    B >= ``min_batch``, with values in ``value_range`` ((-1, 1): the VAE's; (0, 1): the pipeline's)."""
    want = f"[{value_range[0]:g}, {value_range[1]:g}]"
    if not isinstance(x, torch.Tensor):
        kind = type(x).__module__.replace("builtins", "") + "." + type(x).__qualname__
        fix = " (torch.from_numpy(x) makes one)" if kind.startswith("numpy.") else ""
        raise ValueError(f"{who} expects a torch tensor of images (B, {channels}, {size}, {size}); got "
                         f"{kind.lstrip('.')}{fix}")
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size) or len(x) < min_batch:
        batch = f" with B >= {min_batch}" if min_batch else ""
        raise ValueError(f"{who} expects images of shape (B, {channels}, {size}, {size}){batch}; got {tuple(x.shape)}")
    if not x.is_floating_point():
        fix = "use x / 127.5 - 1" if value_range[0] < 0 else "divide uint8 pixels by 255"
        raise ValueError(f"{who} expects float images in {want}; got dtype {x.dtype} ({fix})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{who} got images with {int((~torch.isfinite(x)).sum())} NaN/inf value(s); "
                         f"pass finite images in {want}")
    if x.numel() == 0:  # an empty batch (where allowed) encodes to an empty batch
        return
    lo, hi = x.min().item(), x.max().item()
    if lo < value_range[0] - 0.001 or hi > value_range[1] + 0.001:
        if value_range[0] < 0:
            fix = "map [0, 1] images with x * 2 - 1" if lo >= -0.001 and hi <= 1.001 else "map 0..255 pixels with x / 127.5 - 1"
        else:
            fix = ("map [-1, 1] images with (x + 1) / 2" if lo >= -1.001 and hi <= 1.001 else
                   "divide 0..255 pixels by 255" if lo >= 0 and hi <= 255.001 else "rescale them")
        raise ValueError(f"{who} expects images in {want}; got values in [{lo:.3g}, {hi:.3g}] ({fix})")


class VAE(nn.Module):
    """Encoder -> DiagonalGaussian -> decoder. ``self.config`` is all that is needed to rebuild it."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        ch, g = config.channels, config.groups
        # Encoder: conv_in, then per resolution ResBlocks and a downsample (except at the last).
        self.enc_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            level = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                level.append(ResBlock(prev, c, groups=g))
                prev = c
            if i < len(ch) - 1:
                level.append(Downsample(c))
            self.enc_blocks.append(level)
        self.enc_mid = nn.ModuleList([ResBlock(prev, prev, groups=g), Attention(prev, 1, g), ResBlock(prev, prev, groups=g)])
        self.enc_out = nn.Sequential(nn.GroupNorm(g, prev), SiLU(), nn.Conv2d(prev, 2 * config.latent_channels, 3, padding=1))
        # Decoder mirrors the encoder.
        self.dec_in = nn.Conv2d(config.latent_channels, prev, 3, padding=1)
        self.dec_mid = nn.ModuleList([ResBlock(prev, prev, groups=g), Attention(prev, 1, g), ResBlock(prev, prev, groups=g)])
        self.dec_blocks = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            level = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                level.append(ResBlock(prev, c, groups=g))
                prev = c
            self.dec_blocks.append(level)
            self.dec_up.append(Upsample(c) if i > 0 else nn.Identity())
        self.dec_out = nn.Sequential(nn.GroupNorm(g, prev), SiLU(), nn.Conv2d(prev, config.in_channels, 3, padding=1))
        # Spatial sizes on the way down, so the decoder can undo odd-size rounding (28 -> 14 -> 7).
        sizes = [config.image_size]
        for _ in range(len(ch) - 1):
            sizes.append((sizes[-1] + 1) // 2)
        self._sizes = sizes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        s = self.config.latent_size
        return (self.config.latent_channels, s, s)

    @property
    def _dtype(self) -> torch.dtype:
        """The weights' dtype: what ``encode`` and ``decode`` cast their (float) inputs to."""
        return next(self.parameters()).dtype

    def _check_images(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.config.in_channels, self.config.image_size, (-1.0, 1.0), "VAE.encode")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, 7, 7)."""
        self._check_images(x)
        return self._encode(x.to(self._dtype))  # float64 or half images: the weights' dtype, not a dtype-mismatch error

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.enc_in(x)
        for level in self.enc_blocks:
            for block in level:
                h = block(h)
        for block in self.enc_mid:
            h = block(h)
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Unscaled latents (B, 4, 7, 7) -> images (B, C, H, W), clamped to [-1, 1] unless ``clamp=False``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"VAE.decode expects latents of shape (B, {', '.join(map(str, self.latent_shape))}); got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"VAE.decode expects float latents; got dtype {z.dtype}")
        if not torch.isfinite(z).all():  # NaN latents decode to NaN images: say where the problem is instead
            raise ValueError(f"VAE.decode got latents with {int((~torch.isfinite(z)).sum())} NaN/inf value(s); "
                             "they come from upstream (a diverged model or corrupt input): pass finite latents")
        x = self._decode(z.to(self._dtype))
        return x.clamp(-1, 1) if clamp else x

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z)
        for block in self.dec_mid:
            h = block(h)
        levels = reversed(range(len(self.config.channels)))  # decoder blocks run lowest resolution first
        for i, level, up in zip(levels, self.dec_blocks, self.dec_up):
            for block in level:
                h = block(h)
            if i > 0:
                h = up(h, (self._sizes[i - 1],) * 2)
        return self.dec_out(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, seeds: torch.Tensor | None = None):
        """Training pass: returns (reconstruction, posterior)."""
        posterior = self._encode(x)
        return self._decode(posterior.sample(generator, seeds)), posterior

    # Latent normalisation: the diffusion model works on (z - shift) * scale.
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def with_latent_stats(self, shift: float, scale: float) -> "VAE":
        """Store the latent shift/scale in the config (the one source of truth) and return self."""
        self.config = replace(self.config, shift_factor=float(shift), scaling_factor=float(scale))
        return self

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors."""
        save_model(self, self.config, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VAE":
        """Load a VAE saved with ``save_pretrained`` (or the VAE run folder)."""
        return load_model(cls, VAEConfig, directory, device)  # an LDM run folder is named, with its vae/


@torch.no_grad()
def encode_all(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (unscaled) of float images in [-1, 1], in batches, on the VAE's device."""
    device = next(vae.parameters()).device
    # _encode skips the per-call input checks: callers pass whole datasets already mapped to [-1, 1].
    return torch.cat([vae._encode(images[i:i + batch_size].to(device)).mean for i in range(0, len(images), batch_size)])


@torch.no_grad()
def latent_stats(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(mean, 1/std) of the posterior means of ``images`` (float in [-1, 1]): the latent shift and scale."""
    z = encode_all(vae, images, batch_size)
    return z.mean().item(), 1.0 / z.std().item()


def vae_loss(model: VAE, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None,
             seeds: torch.Tensor | None = None):
    """Per-pixel MSE + kl_weight * per-element KL. Returns (loss, dict of parts, reconstruction)."""
    recon, posterior = model(x, generator, seeds)
    mse = F.mse_loss(recon.float(), x.float())
    kl = posterior.kl().float().mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}, recon
