"""The heart of sampling: one denoiser, one guidance function, and samplers that all take the same arguments.

- ``Denoiser``: a network wrapped once with its noise schedule and prediction type (eps or v), so that
  ``D(x_t, t, labels)`` gives the clean estimate x0 and the noise estimate eps (k-diffusion's wrappers and
  EDM's ``Precond`` play this part).
- ``guided(D, labels, scale, ...)``: classifier-free guidance, the guidance interval and autoguidance over
  denoisers, or a distilled student's guidance-scale input; the result is a denoiser of (x_t, t) alone.
- Samplers: ``sampler(D, x, timesteps, noise=None, callback=None, progress=False)`` starts from ``x`` at
  ``timesteps[0]`` (noise at T-1 for a full run; a partly noised latent for SDEdit), makes one denoiser call
  per timestep and returns the clean sample. ``ddim`` alone also takes ``eta``.

Hooks for editing and inspection: ``noise(i)`` gives the fresh noise of step i (a function, or a
``torch.Generator`` to draw it from; stochastic samplers only), and ``callback(i, t_next, x, x0)`` is called
after step i with the new state ``x`` (at timestep ``t_next``; -1 once ``x`` is the final sample) and that
step's clean estimate ``x0``; a callback that returns a tensor replaces ``x`` (inpainting re-imposes the known
region this way). ``LatentDiffusion.sample`` runs all of this for a pipeline; docs/how-a-digit-is-made.md
runs it inline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from .diffusion import predict_x0_eps, renoise
from .timesteps import check_timesteps

NoiseFn = Callable[[int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class Denoiser:
    """A network wrapped with its schedule: ``D(x_t, t, *cond) -> (x0, eps)``, the clean and noise estimates.

    net: ``net(x_t, t, *cond)`` -> the eps- or v-prediction (``prediction``); t is a (B,) long tensor.
    alphas_cumprod: the schedule's abar_t (T,). takes_scale: the net is a distilled student, which takes the
    guidance scale as an input after the labels (``net(x, t, labels, w)``), so ``guided`` passes it in
    instead of running CFG.
    """

    net: Callable[..., torch.Tensor]
    alphas_cumprod: torch.Tensor
    prediction: str = "v"
    takes_scale: bool = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond) -> tuple[torch.Tensor, torch.Tensor]:
        return self.estimates(self.net(x, t, *cond), x, t)

    def estimates(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at (x, t) -> (x0, eps)."""
        abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype)
        return predict_x0_eps(out, x, abar, self.prediction)


def guided(denoiser: Denoiser, labels: torch.Tensor, scale: Union[float, torch.Tensor], null_label: int,
           interval: tuple[int, int] | None = None, guide: Denoiser | None = None,
           autoguidance_scale: float = 1.0) -> Denoiser:
    """The denoiser guided towards ``labels`` with scale ``scale``: a Denoiser of (x_t, t).

    Classifier-free guidance (Ho & Salimans 2022): out = uncond + s * (cond - uncond), on the network outputs
    (the x0 and eps estimates follow linearly). s = 1 is the conditional model alone, s = 0 the unconditional
    one (label ``null_label``), s > 1 strengthens the label; one doubled batch per guided call. ``scale`` may
    be a (B,) tensor, one scale per example (distillation's teachers). ``labels`` is (B,) class indices, or
    (B, K+1) float weights over the label embeddings (the UNet blends them).

    interval [lo, hi]: guide only at timesteps lo <= t <= hi (Kynkaanniemi et al. 2024); elsewhere the model
    is conditional only and runs the single, undoubled batch. The decision reads t's value on the host.

    Autoguidance (Karras et al. 2024): with a ``guide`` (a weaker version of the same model) and weight
    w = ``autoguidance_scale`` != 1, every step adds (w - 1) * (cond - guide); with s = 1 that is the paper's
    guide + w * (cond - guide). The interval gates CFG only.

    A distilled student (``denoiser.takes_scale``) gets the scale as its input instead: one batch per step.
    """
    net, per_example = denoiser.net, isinstance(scale, torch.Tensor)
    if denoiser.takes_scale:
        w = scale if per_example else torch.full((labels.shape[0],), float(scale), device=labels.device)
        return replace(denoiser, net=lambda x, t: net(x, t, labels, w), takes_scale=False)
    if autoguidance_scale != 1.0 and guide is None:
        raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide model; pass guide= or use 1.0")
    if interval is None and autoguidance_scale == 1.0 and not per_example and scale == 1.0:
        return replace(denoiser, net=lambda x, t: net(x, t, labels))
    null = torch.full(labels.shape[:1], null_label, dtype=torch.long, device=labels.device)
    if labels.is_floating_point():  # (B, K+1) label-embedding weights: the null label is one-hot too
        null = torch.nn.functional.one_hot(null, labels.shape[1]).to(labels.dtype)

    def cfg(x: torch.Tensor, t: torch.Tensor, use_cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CFG output, the conditional output where it was computed: None for s = 0)."""
        if not use_cfg or (not per_example and scale == 1.0):
            cond = net(x, t, labels)
            return cond, cond
        if not per_example and scale == 0.0 and autoguidance_scale == 1.0:
            return net(x, t, null), None
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        s = scale.view(-1, *([1] * (x.ndim - 1))) if per_example else scale
        return uncond + s * (cond - uncond), cond

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # one timestep per call: every sampler steps the whole batch together
        out, cond = cfg(x, t, interval is None or interval[0] <= int(t[0]) <= interval[1])
        if autoguidance_scale == 1.0:
            return out
        return out + (autoguidance_scale - 1.0) * (cond - guide.net(x, t, labels))

    return replace(denoiser, net=fn)


# ------------------------------------------------------------------------------------------ samplers
def _noise_source(noise: NoiseFn | torch.Generator | None, x: torch.Tensor) -> NoiseFn:
    if callable(noise):
        return noise
    device = noise.device if noise is not None else x.device
    return lambda i: torch.randn(x.shape, generator=noise, dtype=x.dtype, device=device).to(x.device)


def _after_step(callback: StepCallback | None, i: int, t_next: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    out = callback(i, t_next, x, x0)
    return x if out is None else out


def _steps(denoiser: Denoiser, timesteps, progress: bool, desc: str):
    """(timesteps checked, abar in float64, the step indices with a progress bar)."""
    abar = denoiser.alphas_cumprod.to("cpu", torch.float64)
    ts = check_timesteps(timesteps, abar.shape[0])
    return ts, abar, tqdm(range(len(ts)), disable=not progress, desc=desc, leave=False)


def _t(ts: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
    """Step i's timestep as the (B,) tensor the network takes."""
    return ts[i].to(x.device).expand(x.shape[0])


@torch.no_grad()
def ddim(denoiser: Denoiser, x: torch.Tensor, timesteps, noise: NoiseFn | torch.Generator | None = None,
         callback: StepCallback | None = None, progress: bool = False, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM's ancestral sampler."""
    if not 0 <= eta <= 1:  # above 1 the fresh noise can outgrow the level stepped to (renoise would clamp it)
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM's noise), got {eta!r}")
    ts, abar, steps = _steps(denoiser, timesteps, progress, "ddim")
    noise = _noise_source(noise, x)
    for i in steps:
        a_t = abar[ts[i]]
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0, eps = denoiser(x, _t(ts, i, x))
        sigma = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).clamp(min=0).sqrt()
        x = renoise(x0, eps, a_next, sigma)
        if sigma > 0:
            x = x + sigma.item() * noise(i)
        x = _after_step(callback, i, int(ts[i + 1]) if i + 1 < len(ts) else -1, x, x0)
    return x


@torch.no_grad()
def ddim_inverse(denoiser: Denoiser, x: torch.Tensor, timesteps, callback: StepCallback | None = None,
                 progress: bool = False, refine: int = 0) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021, app. F): the deterministic DDIM ODE run
    from a clean ``x`` up to the noisiest of ``timesteps``, returning the noise that ``ddim`` (eta 0) over the same
    timesteps maps back to ``x``, up to the discretisation: a plain step uses the estimates at its start, where
    the DDIM step down uses those at its end.

    refine: fixed-point iterations per step (as in Pan et al. 2023 and ReNoise, Garibi et al. 2024): re-evaluate
    the denoiser at the step's end and re-solve the DDIM step down for its start, so the walk down lands back on
    the walk up's points (each costs one more denoiser call per step). timesteps: the descending sequence
    ``ddim`` would visit; the walk goes up it, from x at timesteps[-1] (treated as clean) to timesteps[0].
    callback(i, t, x, x0) after each step, as the samplers'.
    """
    ts = check_timesteps(timesteps, denoiser.alphas_cumprod.shape[0]).flip(0)  # ascending
    abar = denoiser.alphas_cumprod.to("cpu", torch.float64)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="ddim inversion", leave=False):
        x0, eps = denoiser(x, _t(ts, i, x))
        up = renoise(x0, eps, abar[ts[i + 1]])
        for _ in range(refine):  # the point whose DDIM step down (with its own eps) lands on x
            _, eps = denoiser(up, _t(ts, i + 1, x))
            x0 = (x - (1 - abar[ts[i]]).sqrt().to(x.dtype) * eps) / abar[ts[i]].sqrt().to(x.dtype)
            up = renoise(x0, eps, abar[ts[i + 1]])
        x = _after_step(callback, i, int(ts[i + 1]), up, x0)
    return x


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps, noise: NoiseFn | torch.Generator | None = None,
         callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2): DDIM with eta = 1. Meant for all T timesteps; with
    fewer it samples the DDPM posterior between the visited ones."""
    return ddim(denoiser, x, timesteps, noise, callback, progress, eta=1.0)


@torch.no_grad()
def dpm_solver_pp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps, noise: NoiseFn | torch.Generator | None = None,
                     callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR (Lu et al. 2022, Alg. 2). Deterministic (``noise`` unused).

    The second-order correction needs the previous step's x0, so the first step is first order. So is the
    step before the last: with even spacing in t it spans a much larger log-SNR jump than the one before
    (h / h_prev ~ 10+ at 20 steps), where the extrapolation (1 + 1/2r) x0 - (1/2r) x0_prev amplifies error.
    The last step goes to sigma = 0 and returns that step's x0 (a first-order step there gives exactly x0).
    diffusers' DPMSolverMultistepScheduler differs here: with its defaults (final_sigmas_type "zero") only the
    final step to sigma = 0 is first order; the step before it stays second order (its ``lower_order_second``
    changes nothing at order 2).
    """
    ts, abar, steps = _steps(denoiser, timesteps, progress, "dpm++")
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)  # log-SNR / 2
    x0_prev, h_prev = None, None
    for i in steps:
        t = ts[i]
        x0, _ = denoiser(x, _t(ts, i, x))
        if i + 1 == len(ts):  # the last step goes to sigma = 0, where the solution is the denoised sample
            return _after_step(callback, i, -1, x0, x0)
        s = ts[i + 1]
        h = (lam[s] - lam[t]).item()
        if x0_prev is None or i + 2 == len(ts):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma[s] / sigma[t]).item() * x - (alpha[s] * torch.expm1(torch.tensor(-h, dtype=torch.float64))).item() * d
        x = _after_step(callback, i, int(s), x, x0)
        x0_prev, h_prev = x0, h
    return x  # pragma: no cover (the loop always returns)


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of a consistency model at timesteps t (LCM, Luo et al. 2023, sec. 4.1): c_skip(0) = 1, c_out(0) = 0.

    f(x, t) = c_skip x + c_out x0_hat(x, t), so f(x, 0) = x exactly (the boundary condition); above t ~ 20
    c_skip is < 1e-3 and f is the network's x0 estimate. Scaling t by 10 as the LCM code does.
    """
    st = t.to(torch.float64) * timestep_scaling
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2).sqrt()


def consistency_x0(x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A consistency model's output f(x, t) = c_skip x + c_out x0 from its denoiser's estimate x0 at x (B, ...), t (B,)."""
    c_skip, c_out = (c.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1))) for c in consistency_scalings(t))
    return c_skip * x + c_out * x0


@torch.no_grad()
def lcm(denoiser: Denoiser, x: torch.Tensor, timesteps, noise: NoiseFn | torch.Generator | None = None,
        callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM): f(x, t) -> x0, re-noise to the next t, repeat.

    Made for distilled students (distill.py), one denoiser call per step; step i's fresh noise is noise(i).
    """
    ts, abar, steps = _steps(denoiser, timesteps, progress, "lcm")
    noise = _noise_source(noise, x)
    for i in steps:
        t = _t(ts, i, x)
        x0 = consistency_x0(denoiser(x, t)[0], x, t)
        if i + 1 == len(ts):
            return _after_step(callback, i, -1, x0, x0)
        x = renoise(x0, noise(i), abar[ts[i + 1]])  # q(x_s | x0): DDPM eq. 4
        x = _after_step(callback, i, int(ts[i + 1]), x, x0)
    return x  # pragma: no cover (the loop always returns)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpm_solver_pp_2m, "lcm": lcm}


# ------------------------------------------------------------------------------------------ guidance settings
def check_guidance_interval(interval, num_timesteps: int | None = None) -> tuple[int, int] | None:
    """Validate a guidance interval: None (every step) or two integer timesteps lo <= hi within 0..T-1."""
    if interval is None:
        return None
    values = list(interval) if isinstance(interval, (list, tuple)) else None
    if values is None or len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"guidance_interval must be two integer timesteps [lo, hi] (or None for every step), got {interval!r}")
    lo, hi = values
    top = "T-1" if num_timesteps is None else str(num_timesteps - 1)
    if not 0 <= lo <= hi or (num_timesteps is not None and hi >= num_timesteps):
        raise ValueError(f"guidance_interval [lo, hi] needs 0 <= lo <= hi <= {top} (timesteps of the schedule), "
                         f"got [{lo}, {hi}]")
    return lo, hi


def interval_label(interval, num_timesteps: int | None = None) -> str:
    """A guidance interval as text: "every step" for None or [0, T-1], else "t in [lo, hi]"."""
    if interval is None or (num_timesteps is not None and list(interval) == [0, num_timesteps - 1]):
        return "every step"
    lo, hi = interval
    return f"t in [{lo}, {hi}]"


def unet_rows(timesteps: torch.Tensor, guidance_scale: float, guidance_interval: tuple[int, int] | None,
              autoguidance_scale: float = 1.0) -> int:
    """Batch rows ``guided`` runs per digit over ``timesteps`` for a teacher: 2 at a guided step, 1 elsewhere,
    plus one row of the guide network at every step when autoguidance is on (``autoguidance_scale`` != 1).

    Scale 1 (conditional) and 0 (unconditional) never double the batch; None guides at every step.
    """
    guide_rows = 0 if autoguidance_scale == 1.0 else len(timesteps)
    if guidance_scale in (0.0, 1.0):
        return len(timesteps) + guide_rows
    lo, hi = guidance_interval if guidance_interval is not None else (0, int(timesteps.max()))
    return len(timesteps) + int(((timesteps >= lo) & (timesteps <= hi)).sum()) + guide_rows
