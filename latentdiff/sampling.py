"""Samplers as plain functions over any model function, plus the classifier-free guidance wrapper.

A model function is ``model_fn(x_t, t) -> output`` where ``t`` is a (B,) long tensor of timesteps
and ``output`` is an eps- or v-prediction (``prediction``). Every sampler starts from ``x`` (the
noise at t = T-1), makes exactly ``steps`` model calls, and returns the clean sample.

Two hooks serve editing and inspection without touching the loops: ``timesteps`` (an explicit
descending sequence; start from a partly noised ``x`` at ``timesteps[0]``, as SDEdit does) and
``callback(i, t_next, x, x0)``, called after step ``i`` with the new state ``x`` (at timestep
``t_next``; -1 once ``x`` is the final sample) and that step's clean estimate ``x0``. A callback
that returns a tensor replaces ``x`` (inpainting re-imposes the known region this way).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .diffusion import predict_x0_eps
from .timesteps import check_timesteps, sampling_timesteps  # noqa: F401  (re-exported: the samplers' import names)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def _resolve(alphas_cumprod: torch.Tensor, steps: int | None, timesteps: torch.Tensor | None) -> torch.Tensor:
    if timesteps is not None:
        return check_timesteps(timesteps, alphas_cumprod.shape[0])
    return sampling_timesteps(alphas_cumprod.shape[0], steps)


def _after_step(callback: StepCallback | None, i: int, t_next: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    out = callback(i, t_next, x, x0)
    return x if out is None else out


def _default_noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> NoiseFn:
    device = generator.device if generator is not None else x.device
    return lambda i: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _tbatch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device).expand(x.shape[0])


@torch.no_grad()
def ddim(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int | None, prediction: str = "v",
         eta: float = 0.0, noise_fn: NoiseFn | None = None, generator: torch.Generator | None = None,
         progress: bool = False, timesteps: torch.Tensor | None = None,
         callback: StepCallback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta=0 is deterministic, eta=1 is DDPM's ancestral sampler."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    ts = _resolve(alphas_cumprod, steps, timesteps)
    abar = alphas_cumprod.to(torch.float64)
    noise_fn = noise_fn or _default_noise(x, generator)
    for i in tqdm(range(len(ts)), disable=not progress, desc="ddim", leave=False):
        a_t = abar[ts[i]]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0, eps = predict_x0_eps(model_fn(x, _tbatch(ts[i], x)), x, a_t.to(x.dtype), prediction)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt().item() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt().item() * eps
        if sigma > 0:
            x = x + sigma.item() * noise_fn(i)
        x = _after_step(callback, i, int(ts[i + 1]) if i + 1 < len(ts) else -1, x, x0)
    return x


@torch.no_grad()
def ddpm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int | None = None,
         prediction: str = "v", noise_fn: NoiseFn | None = None, generator: torch.Generator | None = None,
         progress: bool = False, timesteps: torch.Tensor | None = None,
         callback: StepCallback | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), i.e. DDIM with eta=1; ``steps`` defaults to T.

    With fewer steps than T it samples the DDPM posterior between the visited timesteps.
    """
    steps = alphas_cumprod.shape[0] if steps is None and timesteps is None else steps
    return ddim(model_fn, x, alphas_cumprod, steps, prediction, eta=1.0, noise_fn=noise_fn,
                generator=generator, progress=progress, timesteps=timesteps, callback=callback)


@torch.no_grad()
def dpm_solver_pp_2m(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int | None,
                     prediction: str = "v", noise_fn: NoiseFn | None = None,
                     generator: torch.Generator | None = None, progress: bool = False,
                     timesteps: torch.Tensor | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR (Lu et al. 2022, Alg. 2). Deterministic."""
    ts = _resolve(alphas_cumprod, steps, timesteps)
    abar = alphas_cumprod.to(torch.float64)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)  # log-SNR / 2
    x0_prev, h_prev = None, None
    for i in tqdm(range(len(ts)), disable=not progress, desc="dpm++", leave=False):
        t = ts[i]
        x0, _ = predict_x0_eps(model_fn(x, _tbatch(t, x)), x, abar[t].to(x.dtype), prediction)
        if i + 1 == len(ts):  # last step goes to sigma = 0, where the solution is the denoised sample
            return _after_step(callback, i, -1, x0, x0)
        s = ts[i + 1]
        h = (lam[s] - lam[t]).item()
        # Second-order correction from the previous x0, skipped on the first step and on the last
        # real step ("lower order final", as diffusers does when the final sigma is 0): with even
        # spacing in t that step spans a much larger log-SNR jump than the one before (h/h_prev ~ 10+
        # at 20 steps), and the extrapolation (1 + 1/2r) x0 - (1/2r) x0_prev then amplifies error.
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


def consistency_x0(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction: str) -> torch.Tensor:
    """A consistency model's output f(x, t) from a network output ``out`` (eps or v) at x (B, C, H, W), t (B,)."""
    x0, _ = predict_x0_eps(out, x, alphas_cumprod.to(x.device)[t].to(x.dtype), prediction)
    c_skip, c_out = (c.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1))) for c in consistency_scalings(t))
    return c_skip * x + c_out * x0


@torch.no_grad()
def lcm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int | None, prediction: str = "v",
        noise_fn: NoiseFn | None = None, generator: torch.Generator | None = None, progress: bool = False,
        timesteps: torch.Tensor | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM): f(x, t) -> x0, re-noise to the next t, repeat.

    Made for distilled students (distill.py), one model call per step; step i's fresh noise is noise_fn(i).
    """
    ts = _resolve(alphas_cumprod, steps, timesteps)
    abar = alphas_cumprod.to(torch.float64)
    noise_fn = noise_fn or _default_noise(x, generator)
    for i in tqdm(range(len(ts)), disable=not progress, desc="lcm", leave=False):
        t = _tbatch(ts[i], x)
        x0 = consistency_x0(model_fn(x, t), x, t, alphas_cumprod, prediction)
        if i + 1 == len(ts):
            return _after_step(callback, i, -1, x0, x0)
        a = abar[ts[i + 1]]
        x = a.sqrt().item() * x0 + (1 - a).sqrt().item() * noise_fn(i)  # q(x_s | x0): DDPM eq. 4
        x = _after_step(callback, i, int(ts[i + 1]), x, x0)
    return x  # pragma: no cover (the loop always returns)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpm_solver_pp_2m, "lcm": lcm}


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
    """Batch rows ``cfg_model_fn`` runs per digit over ``timesteps``: 2 at a guided step, 1 elsewhere,
    plus one row of the guide network at every step when autoguidance is on (``autoguidance_scale`` != 1).

    Scale 1 (conditional) and 0 (unconditional) never double the batch; None guides at every step.
    """
    guide_rows = 0 if autoguidance_scale == 1.0 else len(timesteps)
    if guidance_scale in (0.0, 1.0):
        return len(timesteps) + guide_rows
    lo, hi = guidance_interval if guidance_interval is not None else (0, int(timesteps.max()))
    return len(timesteps) + int(((timesteps >= lo) & (timesteps <= hi)).sum()) + guide_rows


def cfg_model_fn(model: Callable, labels: torch.Tensor, guidance_scale: float, null_label: int,
                 guidance_interval: tuple[int, int] | None = None, guide: Callable | None = None,
                 autoguidance_scale: float = 1.0) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022), optionally with autoguidance, as a model function of (x, t).

    out = uncond + s * (cond - uncond): s = 1 is the conditional model alone, s = 0 the
    unconditional one, s > 1 strengthens the label. One doubled batch per guided call. ``labels`` is (B,)
    class indices, or (B, K+1) float weights over the label embeddings (the UNet blends them).

    guidance_interval [lo, hi]: guide only at timesteps lo <= t <= hi (inclusive, in the schedule's
    0..T-1; Kynkaanniemi et al. 2024); elsewhere the model is conditional only (s = 1) and runs the
    single, undoubled batch. None guides at every step. The decision reads t's value on the host: free
    on a CPU; on a GPU the samplers' copy of t to the device has already waited for the stream.

    Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): with a
    ``guide`` model (same signature as ``model``: a weaker, e.g. earlier, version of it) and weight
    w = ``autoguidance_scale`` != 1, every step adds (w - 1) * (cond - guide(x, t, labels)). With CFG off
    (s = 1) that is the paper's guide + w * (cond - guide); w = 1 is plain CFG. The guidance interval
    gates CFG only: the paper applies autoguidance at every noise level.
    """
    interval = check_guidance_interval(guidance_interval)
    if autoguidance_scale != 1.0 and guide is None:
        raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide model; pass guide= or use 1.0")
    null = torch.full(labels.shape[:1], null_label, dtype=torch.long, device=labels.device)
    if labels.is_floating_point():  # (B, K+1) label-embedding weights: the null label is one-hot too
        null = torch.nn.functional.one_hot(null, labels.shape[1]).to(labels.dtype)

    def cfg(x: torch.Tensor, t: torch.Tensor, use_cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CFG output, the conditional output where it was computed: None for s = 0)."""
        if not use_cfg or guidance_scale == 1.0:
            cond = model(x, t, labels)
            return cond, cond
        if guidance_scale == 0.0 and autoguidance_scale == 1.0:
            return model(x, t, null), None
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C, H, W)
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond), cond

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # one timestep per call: every sampler steps the whole batch together
        use_cfg = interval is None or interval[0] <= int(t[0]) <= interval[1]
        out, cond = cfg(x, t, use_cfg)
        if autoguidance_scale == 1.0:
            return out
        return out + (autoguidance_scale - 1.0) * (cond - guide(x, t, labels))

    if interval is None and autoguidance_scale == 1.0 and guidance_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    return fn
