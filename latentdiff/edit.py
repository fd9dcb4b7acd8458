"""Editing and exploring digits with a trained LatentDiffusion: class swap, inpainting, interpolation, trajectories.

Every function takes the pipeline first and is built on its public pieces: ``encode`` / ``decode``
(images in [0, 1] <-> scaled latents), ``noise`` (per-seed Gaussian noise), ``sample`` (a guided
sampler started from any latents at any timestep, with a per-step callback) and ``settings`` (the
model's sampling defaults with a call's overrides, checked: one ``SampleConfig``). Sampling keywords
(``guidance_scale``, ``steps``, ``sampler``, ``eta``, ...) default to the model's config, as in ``generate``. Randomness:
``seed`` (sample i uses seed + i) or ``generator``; a result never depends on ``batch_size``.

    out = img2img(pipe, threes, labels=[8] * len(threes), strength=0.7, seed=0)   # 3 -> 8
    out = inpaint(pipe, digits, mask, labels=[5] * len(digits), seed=0)           # mask: 1 keep, 0 fill
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion import renoise
from .pipeline import LatentDiffusion, check_seed, make_grid
from .sampling import ddim_inverse, guided
from .timesteps import make_timesteps
from .vae import check_image_batch


# ---------------------------------------------------------------------------------------- input checks
def check_images(images, who: str, size: int = 28) -> torch.Tensor:
    """(N, 1, 28, 28) or (N, 28, 28) float in [0, 1], N >= 1 -> (N, 1, 28, 28) float32; else the ValueError of
    vae.check_image_batch (the pipeline's own check), naming ``who`` and the fix."""
    x = images.unsqueeze(1) if isinstance(images, torch.Tensor) and images.ndim == 3 else images
    check_image_batch(x, 1, size, (0.0, 1.0), who, min_batch=1)
    return x.float()


def check_mask(mask, n: int, size: int = 28) -> torch.Tensor:
    """Pixel mask (1 = keep, 0 = fill) of shape (N|1, 1, 28, 28), (N|1, 28, 28) or (28, 28) -> (N, 1, 28, 28)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch tensor of shape (N, 1, {size}, {size}), (1, 1, {size}, {size}) "
                         f"or ({size}, {size}), got {type(mask).__name__}")
    m = mask[None, None] if mask.ndim == 2 else mask.unsqueeze(1) if mask.ndim == 3 else mask
    if m.ndim != 4 or tuple(m.shape[1:]) != (1, size, size) or m.shape[0] not in (1, n):
        raise ValueError(f"mask must have shape ({n}, 1, {size}, {size}), (1, 1, {size}, {size}) or ({size}, {size}) "
                         f"for {n} images, got {tuple(mask.shape)}")
    m = m.float()
    if not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)][0].item()
        raise ValueError(f"mask values must be 0 (fill) or 1 (keep), got {bad!r}; threshold a soft mask first")
    return m.expand(n, -1, -1, -1)


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 = unchanged, 1 = a fresh sample), got {strength!r}")
    return float(strength)


def check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2 (both ends are included), got {frames!r}")
    return frames


def _labels_for(pipe: LatentDiffusion, labels, n: int) -> torch.Tensor:
    """One label per image (a single label is repeated)."""
    y = pipe.check_labels([labels] if isinstance(labels, numbers.Integral) and not isinstance(labels, bool) else labels)
    if len(y) not in (1, n):
        raise ValueError(f"labels has {len(y)} entries for {n} images; pass one label per image, or one for all")
    return y.expand(n).clone()


def _batched(n: int, batch_size: int, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    return torch.cat([fn(slice(s, s + batch_size)) for s in range(0, n, batch_size)])


def _noised(pipe: LatentDiffusion, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """q(z_t | z): sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPM eq. 4); t = -1 means clean."""
    return z if t < 0 else renoise(z, eps, pipe.alphas_cumprod[t])


# ---------------------------------------------------------------------------------------- img2img (SDEdit)
def sdedit_timesteps(alphas_cumprod: torch.Tensor, steps: int, strength: float,
                     spacing: str = "uniform") -> torch.Tensor:
    """t0 = round(strength * (T-1)), then the timesteps below t0 of a full ``steps``-step run with ``spacing``.

    The step density is the full run's (about strength * steps steps for uniform spacing), and strength
    1 gives exactly the full schedule, so img2img at strength 1 is ``generate``.
    """
    t0 = round(strength * (alphas_cumprod.shape[0] - 1))
    full = make_timesteps(alphas_cumprod, steps, spacing)
    return torch.cat([torch.tensor([t0]), full[full < t0]])


@torch.no_grad()
def img2img(pipe: LatentDiffusion, images: torch.Tensor, labels, strength: float, *, seed: int | None = None,
            generator: torch.Generator | None = None, batch_size: int | None = None, **sampling) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): encode, noise to ``strength``, denoise towards ``labels`` with CFG.

    strength 0 returns the VAE reconstruction; strength 1 starts from pure noise and returns exactly
    ``pipe.generate(labels, seed=seed)``; in between, the source's layout survives the noise level.
    """
    x = check_images(images, "img2img")
    n = x.shape[0]
    y, s = _labels_for(pipe, labels, n), check_strength(strength)
    settings, batch_size = pipe.settings(**sampling), pipe.check_batch_size(batch_size)
    seeds = pipe.seeds(n, seed, generator)
    ts = sdedit_timesteps(pipe.alphas_cumprod, settings.steps, s, settings.spacing)

    def run(sl: slice) -> torch.Tensor:
        z = pipe.encode(x[sl])  # (B, 4, 7, 7)
        if s == 0:
            return pipe.decode(z)
        eps = pipe.noise(seeds[sl])  # stream 0, the noise generate() starts from
        start = eps if s == 1 else _noised(pipe, z, eps, int(ts[0]))
        return pipe.decode(pipe.sample(start, y[sl], seeds[sl], settings, timesteps=ts))

    return _batched(n, batch_size, run)


# ---------------------------------------------------------------------------------------- inpainting
def latent_mask(mask: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(N, 1, 28, 28) 0/1 pixel mask -> (N, 1, 7, 7) fraction of kept pixels under each latent cell."""
    return F.adaptive_avg_pool2d(mask, latent_size)


@torch.no_grad()
def inpaint(pipe: LatentDiffusion, images: torch.Tensor, mask, labels, *, seed: int | None = None,
            generator: torch.Generator | None = None, batch_size: int | None = None, **sampling) -> torch.Tensor:
    """Fill the ``mask == 0`` pixels so the digit becomes ``labels``; ``mask == 1`` pixels are kept.

    Works in the 7x7 latent grid: the mask is averaged over each cell's 4x4 pixels (a cell on the
    edge of the mask blends known and generated latents), and after every sampler step the kept
    cells are reset to the source latents noised to the new timestep with the run's own starting
    noise (one fixed eps, which is the path a deterministic sampler would follow for that latent);
    the last step puts back the clean source latents. No pixel paste: the kept area is the VAE's
    reconstruction and the decoder blends the seam. An all-keep mask returns the reconstruction,
    an all-fill mask exactly ``pipe.generate(labels, seed=seed)``.
    """
    x = check_images(images, "inpaint")
    n = x.shape[0]
    m_pix = check_mask(mask, n)
    y = _labels_for(pipe, labels, n)
    settings, batch_size = pipe.settings(**sampling), pipe.check_batch_size(batch_size)
    seeds = pipe.seeds(n, seed, generator)

    def run(sl: slice) -> torch.Tensor:
        z = pipe.encode(x[sl])
        m = latent_mask(m_pix[sl], z.shape[-1]).to(z.device)  # (B, 1, 7, 7) in [0, 1]
        eps = pipe.noise(seeds[sl])

        def keep_known(i: int, t_next: int, state: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            return m * _noised(pipe, z, eps, t_next) + (1 - m) * state

        return pipe.decode(pipe.sample(eps, y[sl], seeds[sl], settings, callback=keep_known))

    return _batched(n, batch_size, run)


def half_mask(side: str, size: int = 28) -> torch.Tensor:
    """(1, 1, 28, 28) mask that keeps one half ("left", "right", "top", "bottom") and fills the other."""
    m = torch.zeros(1, 1, size, size)
    h = size // 2
    halves = {"left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None)),
              "top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None))}
    if side not in halves:
        raise ValueError(f"unknown half {side!r}; choose one of {sorted(halves)}")
    m[0, 0][halves[side]] = 1
    return m


# ---------------------------------------------------------------------------------------- interpolation
def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of (1, ...) tensors at weights w (K,) -> (K, ...); w=0 gives a, w=1 gives b exactly."""
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    cos = ((a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))).clamp(-1, 1)
    omega = torch.acos(cos)  # (1,)
    w = w.double().to(a.device)[:, None]  # (K, 1)
    if omega.item() < 1e-6:  # (nearly) parallel: the lerp is the limit
        out = (1 - w) * a64 + w * b64
    else:
        out = (torch.sin((1 - w) * omega) * a64 + torch.sin(w * omega) * b64) / torch.sin(omega)
    return out.to(a.dtype).view(-1, *a.shape[1:])


def _frame_weights(frames: int) -> torch.Tensor:
    return torch.linspace(0, 1, check_frames(frames), dtype=torch.float64)


@torch.no_grad()
def interpolate_seeds(pipe: LatentDiffusion, label: int, seed_a: int, seed_b: int, frames: int, *,
                      batch_size: int | None = None, **sampling) -> torch.Tensor:
    """(frames, 1, 28, 28): digits of one class along the slerp from seed_a's noise to seed_b's.

    The stochastic samplers' per-step noise is slerped the same way, so the first and last frames
    are exactly ``pipe.generate([label], seed=seed_a)`` and ``... seed=seed_b`` for every sampler.
    """
    y = pipe.check_labels([label])
    sa, sb = torch.tensor([check_seed(seed_a, "seed_a")]), torch.tensor([check_seed(seed_b, "seed_b")])
    w = _frame_weights(frames)
    settings, batch_size = pipe.settings(**sampling), pipe.check_batch_size(batch_size)

    def run(sl: slice) -> torch.Tensor:
        ws = w[sl]

        def noise_fn(i: int) -> torch.Tensor:  # step i's noise: stream i + 1, as in generate
            return slerp(pipe.noise(sa, i + 1), pipe.noise(sb, i + 1), ws)

        start = slerp(pipe.noise(sa), pipe.noise(sb), ws)
        return pipe.decode(pipe.sample(start, y.expand(len(ws)), None, settings, noise_fn=noise_fn))

    return _batched(len(w), batch_size, run)


@torch.no_grad()
def interpolate_classes(pipe: LatentDiffusion, label_a: int, label_b: int, seed: int, frames: int, *,
                        batch_size: int | None = None, **sampling) -> torch.Tensor:
    """(frames, 1, 28, 28): one seed, the label embedding blended linearly from label_a to label_b.

    CFG acts on the blended embedding (the unconditional half is unchanged). The end frames are
    ``pipe.generate([label_a], seed=seed)`` and ``... [label_b] ...`` (a one-hot blend is the lookup).
    """
    ya, yb = pipe.check_labels([label_a, label_b]).tolist()
    seed = check_seed(seed, "seed")
    w = _frame_weights(frames).float()[:, None]  # (K, 1)
    onehot = torch.eye(pipe.num_classes + 1)
    weights = (1 - w) * onehot[ya] + w * onehot[yb]  # (K, num_classes + 1)
    settings, batch_size = pipe.settings(**sampling), pipe.check_batch_size(batch_size)
    seeds = torch.full((len(w),), seed, dtype=torch.int64)  # every frame shares the seed's noise

    def run(sl: slice) -> torch.Tensor:
        return pipe.decode(pipe.sample(pipe.noise(seeds[sl]), weights[sl], seeds[sl], settings))

    return _batched(len(w), batch_size, run)


# ---------------------------------------------------------------------------------------- your hand in every class
# swap_class's defaults, chosen on the quick model by bench/hand_swap.py (1,000 test digits, two draws; docs/editing.md):
# inverted to 0.7 (T-1) and guided at 6, 96-97% of the swaps read as the target and the source's ink mass and slant
# correlate with the output's at 0.88 and 0.71-0.73; a full inversion keeps only 0.35 of either.
SWAP_STRENGTH = 0.7
SWAP_GUIDANCE = 6.0


def _ddim_settings(pipe: LatentDiffusion, sampling: dict):
    """The settings of an inversion-based edit: deterministic DDIM (eta 0), the model's steps and guidance unless given."""
    if pipe.unet.config.guidance_input:
        raise ValueError("inversion needs the teacher: this model is a distilled student; pass the LDM it was "
                         "distilled from")
    settings = pipe.settings(**{"sampler": "ddim", "eta": 0.0, **{k: v for k, v in sampling.items() if v is not None}})
    if settings.sampler != "ddim" or settings.eta != 0:
        raise ValueError(f"inversion runs deterministic DDIM both ways: sampler must be 'ddim' with eta=0, got "
                         f"{settings.sampler!r} with eta={settings.eta:g}; leave sampler and eta out")
    return settings


def _no_noise(i: int) -> torch.Tensor:
    raise AssertionError("deterministic DDIM draws no noise")  # pragma: no cover


@torch.no_grad()
def invert(pipe: LatentDiffusion, images: torch.Tensor, labels=None, *, strength: float = 1.0,
           inversion_scale: float = 1.0, refine: int = 0, batch_size: int | None = None,
           **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion of ``images`` under their own class: (latents (N, 4, 7, 7) at the noise level strength x (T-1),
    the descending timesteps that lead back from there).

    labels: the images' classes (one per image, or one for all), or None to invert with the null label
    (unconditional). inversion_scale: the CFG scale of the inversion (1 = conditional only: CFG's
    extrapolation makes the walk up and the walk down disagree). refine: fixed-point iterations per step
    (``sampling.ddim_inverse``: a closer round trip for one more UNet call per step each). ``sampling``: steps and spacing (the
    model's unless given); the way back with ``pipe.sample`` at guidance 1 under the same labels returns
    the source latents up to the discretisation.
    """
    x = check_images(images, "invert")
    n = x.shape[0]
    y = None if labels is None else _labels_for(pipe, labels, n)
    if isinstance(inversion_scale, bool) or not isinstance(inversion_scale, (int, float)) \
            or not math.isfinite(inversion_scale) or inversion_scale < 0:
        raise ValueError(f"inversion_scale must be a finite number >= 0 (1 = conditional only), got {inversion_scale!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (fixed-point iterations per step), got {refine!r}")
    settings, batch_size = _ddim_settings(pipe, sampling), pipe.check_batch_size(batch_size)
    ts = sdedit_timesteps(pipe.alphas_cumprod, settings.steps, check_strength(strength), settings.spacing)
    null = torch.full((n,), pipe.num_classes, dtype=torch.long)

    def run(sl: slice) -> torch.Tensor:
        z = pipe.encode(x[sl])
        labels_sl = (null if y is None else y)[sl].to(pipe.device)
        denoiser = guided(pipe.denoiser, labels_sl, float(inversion_scale), pipe.num_classes)
        return ddim_inverse(denoiser, z, ts, refine=refine)

    return _batched(n, batch_size, run), ts


@torch.no_grad()
def swap_class(pipe: LatentDiffusion, images: torch.Tensor, labels, targets, *, strength: float = SWAP_STRENGTH,
               inversion_scale: float = 1.0, refine: int = 0, batch_size: int | None = None,
               **sampling) -> torch.Tensor:
    """The same hand writing another class: DDIM-invert each image under its own class (``invert``) to the noise
    level strength x (T-1), then run deterministic DDIM back to a clean digit under its target class, guided
    with ``guidance_scale`` (default ``SWAP_GUIDANCE``, not the model's: the class has to change in the few
    steps below that level).

    labels: the source classes (or None: invert unconditionally); targets: one class per image, or one for
    all. Thickness, slant, size and position live in the inverted latent, so they carry over (docs/editing.md
    has the measured figures); a target equal to the source at guidance 1 gives back the source's
    reconstruction. No seed: the edit is deterministic.
    """
    if sampling.get("guidance_scale") is None:
        sampling["guidance_scale"] = SWAP_GUIDANCE
    x = check_images(images, "swap_class")
    n = x.shape[0]
    y_target = _labels_for(pipe, targets, n)
    settings, batch_size = _ddim_settings(pipe, sampling), pipe.check_batch_size(batch_size)
    latents, ts = invert(pipe, x, labels, strength=strength, inversion_scale=inversion_scale, refine=refine,
                         batch_size=batch_size, **sampling)

    def run(sl: slice) -> torch.Tensor:
        return pipe.decode(pipe.sample(latents[sl], y_target[sl], None, settings, timesteps=ts, noise_fn=_no_noise))

    return _batched(n, batch_size, run)


@torch.no_grad()
def every_class(pipe: LatentDiffusion, image: torch.Tensor, label=None, **options) -> torch.Tensor:
    """One digit written as every class, (num_classes, 1, 28, 28): ``swap_class`` to 0, 1, ..., num_classes - 1."""
    x = check_images(image, "every_class")
    if x.shape[0] != 1:
        raise ValueError(f"every_class takes one image, got {x.shape[0]}; call swap_class for several")
    k = pipe.num_classes
    return swap_class(pipe, x.expand(k, -1, -1, -1), None if label is None else [label] * k, list(range(k)), **options)


# ---------------------------------------------------------------------------------------- trajectories
@dataclass(frozen=True)
class Trajectory:
    """A sampling run, step by step. S = sampler steps."""

    images: torch.Tensor     # (N, 1, 28, 28) the final digits, in [0, 1]
    x0: torch.Tensor         # (N, S, 1, 28, 28) decoded clean estimate of each step; x0[:, -1] == images
    latents: torch.Tensor    # (N, S, 4, 7, 7) the noisy (scaled) latent after each step
    timesteps: torch.Tensor  # (S,) the timestep of latents[:, i]; -1 = clean


@torch.no_grad()
def trajectory(pipe: LatentDiffusion, labels, *, seed: int | None = None, generator: torch.Generator | None = None,
               batch_size: int | None = None, **sampling) -> Trajectory:
    """``pipe.generate(labels, ...)`` that also keeps every step's decoded x0 and noisy latent."""
    y = pipe.check_labels(labels)
    settings, batch_size = pipe.settings(**sampling), pipe.check_batch_size(batch_size)
    seeds = pipe.seeds(len(y), seed, generator)
    parts, times = [], []

    def run(sl: slice) -> torch.Tensor:
        x0s, states = [], []
        times.clear()

        def record(i: int, t_next: int, state: torch.Tensor, x0: torch.Tensor) -> None:
            x0s.append(pipe.decode(x0))
            states.append(state.float())
            times.append(t_next)

        z = pipe.sample(pipe.noise(seeds[sl]), y[sl], seeds[sl], settings, callback=record)
        parts.append((torch.stack(x0s, 1), torch.stack(states, 1)))
        return pipe.decode(z)

    images = _batched(len(y), batch_size, run)
    return Trajectory(images, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                      torch.tensor(times, dtype=torch.long))


def trajectory_strip(traj: Trajectory, latent_range: float = 3.0) -> Image.Image:
    """Two rows per digit, one column per step: the noisy latent (its 4 channels tiled 2x2) and the decoded x0."""
    n, s = traj.x0.shape[:2]
    lat = traj.latents.cpu()  # (N, S, 4, 7, 7)
    c = lat.shape[2]
    side = math.ceil(math.sqrt(c))
    lat = F.pad(lat, (0, 0, 0, 0, 0, side * side - c))  # pad channels to a square tiling
    tiles = lat.view(n, s, side, side, *lat.shape[-2:]).permute(0, 1, 2, 4, 3, 5)  # (N, S, rows, 7, cols, 7)
    tiles = tiles.reshape(n * s, 1, side * lat.shape[-2], side * lat.shape[-1])
    size = traj.x0.shape[-1]
    tiles = F.interpolate(tiles, size=(size, size), mode="nearest")  # 14x14 -> 28x28, blocky on purpose
    tiles = ((tiles + latent_range) / (2 * latent_range)).clamp(0, 1).view(n, s, 1, size, size)
    rows = torch.stack([tiles, traj.x0.cpu()], 1)  # (N, 2, S, 1, 28, 28)
    return make_grid(rows.reshape(-1, 1, size, size), nrow=s)
