"""Samplers against oracle models (exact eps / v for a known x0), Gaussian data, the denoiser and guidance."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiff.diffusion import make_schedule, renoise
from latentdiff.sampling import SAMPLERS, Denoiser, check_guidance_interval, guided
from latentdiff.timesteps import make_timesteps, sampling_timesteps

# (name, sampler kwargs): every sampler and DDIM's eta settings.
SAMPLER_CASES = [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}), ("dpm++", {})]


def run(name: str, net, x: torch.Tensor, abar: torch.Tensor, steps: int | None, prediction: str = "v",
        timesteps: torch.Tensor | None = None, noise=None, callback=None, **kwargs) -> torch.Tensor:
    """Sampler ``name`` over the network function ``net(x_t, t)`` wrapped as a Denoiser, ``steps`` uniform timesteps."""
    ts = timesteps if timesteps is not None else sampling_timesteps(abar.shape[0], steps)
    return SAMPLERS[name](Denoiser(net, abar, prediction), x, ts, noise, callback, **kwargs)


def cfg(model, labels: torch.Tensor, scale: float, null_label: int, interval=None, guide=None, autoguidance_scale=1.0):
    """The guided network function (x, t) -> output of ``guided`` over ``model(x, t, labels)``."""
    wrap = lambda net: Denoiser(net, torch.ones(1000), "v")  # noqa: E731  (the schedule is unused by .net)
    return guided(wrap(model), labels, scale, null_label, interval, guide and wrap(guide), autoguidance_scale).net


def oracle(x0: torch.Tensor, abar: torch.Tensor, prediction: str, calls: list | None = None):
    """The exact model for data that is always x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), v from it."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        if calls is not None:
            calls.append(t[0].item())
        a = abar.to(x_t.dtype)[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 5, 17, 50])
@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_oracle_recovers_x0(name, kwargs, steps, prediction, schedule):
    abar = make_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    x_T = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    calls: list = []
    out = run(name, oracle(x0, abar, prediction, calls), x_T.clone(), abar, steps, prediction,
                         noise=torch.Generator().manual_seed(1), **kwargs)
    assert out.shape == x0.shape and out.dtype == torch.float64
    assert torch.allclose(out, x0, atol=1e-6), (out - x0).abs().max()
    # Exactly `steps` model calls, from T-1 down to 0.
    assert len(calls) == steps and calls[0] == 999 and calls == sorted(calls, reverse=True)
    assert calls[-1] == (0 if steps > 1 else 999)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_oracle_float32(name, kwargs, prediction):
    """In float32 the answer is still close (the last step is at t=0, where abar ~ 1)."""
    abar = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 7, 7, generator=g), torch.randn(2, 4, 7, 7, generator=g)
    out = run(name, oracle(x0, abar, prediction), x_T, abar, 10, prediction,
                         noise=torch.Generator().manual_seed(1), **kwargs)
    assert out.dtype == torch.float32 and torch.allclose(out, x0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- Gaussian data
MU, S0 = 0.7, 0.3  # data distribution N(MU, S0^2) per dimension


def gaussian_denoiser(abar: torch.Tensor, prediction: str):
    """The exact (Bayes-optimal) model for N(MU, S0^2) data: E[x0 | x_t] in closed form."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar.to(x_t.dtype)[t].view(-1, *[1] * (x_t.ndim - 1))
        x0 = MU + S0**2 * a.sqrt() / (a * S0**2 + 1 - a) * (x_t - a.sqrt() * MU)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


def _pf_ode_error(name: str, steps: int, prediction: str, schedule: str = "cosine") -> float:
    """Max error against the exact probability-flow map for N(MU, S0^2) data:
    x_T -> MU + S0 (x_T - sqrt(a) MU) / sqrt(a S0^2 + 1 - a), a = abar at T-1 (the standardised value is conserved)."""
    abar = make_schedule(schedule, 1000)
    x_T = torch.linspace(-3, 3, 61, dtype=torch.float64).view(-1, 1, 1, 1)
    out = run(name, gaussian_denoiser(abar, prediction), x_T, abar, steps, prediction)
    a = abar[-1].item()
    exact = MU + S0 * (x_T - math.sqrt(a) * MU) / math.sqrt(a * S0**2 + 1 - a)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_deterministic_samplers_converge_to_the_probability_flow(prediction, schedule):
    """DDIM (first order) and DPM-Solver++(2M) converge to the exact ODE solution, DPM++ faster.

    Few-step behaviour (the range people use) is pinned in the next test.
    """
    dpm = [_pf_ode_error("dpm++", n, prediction, schedule) for n in (50, 100, 200)]
    ddim_err = [_pf_ode_error("ddim", n, prediction, schedule) for n in (50, 200, 1000)]
    assert dpm[0] > dpm[1] > dpm[2] and dpm[2] < 1e-2
    assert ddim_err[0] > ddim_err[1] > ddim_err[2] and ddim_err[2] < 1e-2
    assert dpm[1] < _pf_ode_error("ddim", 100, prediction, schedule)  # second order beats first order
    if schedule == "cosine":
        assert dpm[2] < 3e-3 and ddim_err[2] < 3e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_improves_steadily_at_few_steps(prediction):
    """At 10-30 steps (cosine) DPM++ gets better with every step count and beats DDIM at each.

    This pins the first-order last step: with timesteps uniform in t the last real step jumps far in
    log-SNR (t=53 -> 0 at 20 steps) and a second-order update there made 15 steps worse than 10.
    """
    dpm = [_pf_ode_error("dpm++", n, prediction) for n in (10, 15, 20, 30)]
    assert dpm == sorted(dpm, reverse=True) and dpm[2] < 0.05
    for n, err in zip((10, 15, 20, 30), dpm):
        assert err < _pf_ode_error("ddim", n, prediction)


@pytest.mark.parametrize("name, kwargs", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_reach_the_data_distribution(name, kwargs):
    """With every timestep the ancestral samplers draw from N(MU, S0^2) (coarser steps under-disperse a little)."""
    abar = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = run(name, gaussian_denoiser(abar, "v"), x_T, abar, 1000, "v", noise=g, **kwargs)
    assert out.mean().item() == pytest.approx(MU, abs=0.015)  # ~3 standard errors
    assert out.std().item() == pytest.approx(S0, abs=0.01)


# ---------------------------------------------------------------------------------------------- randomness
def test_stochastic_sampler_randomness_is_injectable():
    abar = make_schedule("cosine", 100)
    model = lambda x, t: 0.3 * x  # noqa: E731  (not an oracle: the noise matters)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    a = run("ddpm", model, x, abar, 10, noise=torch.Generator().manual_seed(1))
    b = run("ddpm", model, x, abar, 10, noise=torch.Generator().manual_seed(1))
    c = run("ddpm", model, x, abar, 10, noise=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    used: list = []

    def noise_fn(i):
        used.append(i)
        return torch.zeros_like(x)

    d = run("ddim", model, x, abar, 10, eta=1.0, noise=noise_fn)
    e = run("ddim", model, x, abar, 10, eta=1.0, noise=noise_fn)
    assert torch.equal(d, e)
    assert used and all(0 <= i < 10 for i in used)
    # eta=0 never draws noise.
    used.clear()
    run("ddim", model, x, abar, 10, eta=0.0, noise=noise_fn)
    assert used == []
    assert torch.equal(run("dpm++", model, x, abar, 10), run("dpm++", model, x, abar, 10))


def test_sampling_timesteps():
    assert sampling_timesteps(1000, 1).tolist() == [999]
    assert sampling_timesteps(1000, 2).tolist() == [999, 0]
    ts = sampling_timesteps(1000, 20)
    assert len(ts) == 20 and ts[0] == 999 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    assert sampling_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    for bad in (0, -1, 11, 2.5, True):
        with pytest.raises(ValueError):
            sampling_timesteps(10, bad)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_outside_0_1_rejected(eta):
    # Above 1, sigma^2 outgrows 1 - abar of the level stepped to: renoise's clamp hid it and the noise came out wrong.
    abar = make_schedule("cosine", 10)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        run("ddim", lambda x, t: x, torch.zeros(1, 1, 1, 1), abar, 2, eta=eta)


# ---------------------------------------------------------------------------------------------- CFG
class RecordingModel:
    """model(x, t, y) whose output depends on x, t and y; records every call's batch."""

    def __init__(self, null_label: int = 10):
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.null = null_label

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1).float() / 100


def _inputs(b: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 7, 7, generator=g), torch.tensor([5] * b), torch.tensor([1, 4, 7][:b])


def test_cfg_scale_one_is_the_conditional_model():
    m = RecordingModel()
    x, t, y = _inputs()
    assert torch.equal(cfg(m, y, 1.0, 10)(x, t), m(x, t, y))


def test_cfg_scale_zero_is_the_unconditional_model():
    m = RecordingModel()
    x, t, y = _inputs()
    null = torch.full_like(y, 10)
    assert torch.equal(cfg(m, y, 0.0, 10)(x, t), m(x, t, null))


@pytest.mark.parametrize("s", [0.5, 2.0, 3.0, 7.5])
def test_cfg_combination(s):
    m = RecordingModel()
    x, t, y = _inputs()
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
    m.calls.clear()
    out = cfg(m, y, s, 10)(x, t)
    assert torch.allclose(out, uncond + s * (cond - uncond), atol=1e-5)
    # One doubled batch: conditional labels first, then the null label.
    assert len(m.calls) == 1 and m.calls[0][0] == 6
    assert m.calls[0][1].tolist() == y.tolist() + [10, 10, 10]


@pytest.mark.parametrize("s, batch", [(3.0, 6), (1.0, 3), (0.0, 3)])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cfg_one_model_call_per_step(name, s, batch):
    m = RecordingModel()
    x, _, y = _inputs()
    abar = make_schedule("cosine", 100)
    run(name, cfg(m, y, s, 10), x, abar, 7, "v", noise=torch.Generator().manual_seed(0))
    assert len(m.calls) == 7
    assert all(b == batch for b, _ in m.calls)


def test_cfg_with_a_unet():
    """The same identities hold for the real network (scale 1 / 0 / s)."""
    from conftest import tiny_unet

    unet = tiny_unet()
    x, t, y = _inputs()
    with torch.no_grad():
        cond, uncond = unet(x, t, y), unet(x, t, torch.full_like(y, 10))
        assert torch.allclose(cfg(unet, y, 1.0, 10)(x, t), cond)
        assert torch.allclose(cfg(unet, y, 0.0, 10)(x, t), uncond)
        assert torch.allclose(cfg(unet, y, 4.0, 10)(x, t), uncond + 4 * (cond - uncond), atol=1e-5)


# ---------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_explicit_timesteps_start_part_way(name, kwargs):
    """SDEdit-style: start from x0 noised to t=400 and walk an explicit sequence down to 0."""
    abar = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
    a = abar[400]
    x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ts = torch.tensor([400, 300, 150, 40, 0])
    calls: list = []
    out = run(name, oracle(x0, abar, "v", calls), x, abar, None, "v", timesteps=ts,
                         noise=torch.Generator().manual_seed(1), **kwargs)
    assert calls == ts.tolist()
    assert torch.allclose(out, x0, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_explicit_timesteps_equal_the_default_sequence(name, kwargs):
    abar = make_schedule("cosine", 1000)
    model = gaussian_denoiser(abar, "eps")
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = run(name, model, x.clone(), abar, 8, "eps", noise=torch.Generator().manual_seed(1), **kwargs)
    b = run(name, model, x.clone(), abar, None, "eps", timesteps=sampling_timesteps(1000, 8),
                       noise=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_callback_sees_every_step_and_can_replace_the_state(name, kwargs):
    abar = make_schedule("cosine", 1000)
    model = gaussian_denoiser(abar, "v")
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def record(i, t_next, xt, x0):
        seen.append((i, t_next, xt.shape, x0.shape))

    run(name, model, x.clone(), abar, 6, "v", noise=torch.Generator().manual_seed(1), callback=record, **kwargs)
    ts = sampling_timesteps(1000, 6).tolist()
    assert [s[:2] for s in seen] == list(zip(range(6), ts[1:] + [-1]))
    # A callback that pins the state to a constant: the final sample is that constant.
    out = run(name, model, x.clone(), abar, 6, "v", noise=torch.Generator().manual_seed(1),
                         callback=lambda i, t, xt, x0: torch.full_like(xt, 0.25), **kwargs)
    assert torch.equal(out, torch.full_like(x, 0.25))


@pytest.mark.parametrize("bad", [[5, 5, 0], [0, 5], [1000, 0], [-1], [[3, 2]], [2.0, 1.0], []])
def test_bad_explicit_timesteps_rejected(bad):
    abar = make_schedule("cosine", 1000)
    with pytest.raises(ValueError, match="timesteps"):
        run("ddim", gaussian_denoiser(abar, "v"), torch.zeros(1, 1, 2, 2), abar, None, "v", timesteps=torch.tensor(bad))


# ---------------------------------------------------------------------------------------------- spacings
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", ["trailing", "logsnr", "karras"])
@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
def test_oracle_recovers_x0_with_every_spacing(name, kwargs, spacing, schedule):
    abar = make_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
    for steps in (1, 3, 10):
        ts = make_timesteps(abar, steps, spacing)
        calls: list = []
        out = run(name, oracle(x0, abar, "v", calls), x_T.clone(), abar, None, "v", timesteps=ts,
                             noise=torch.Generator().manual_seed(1), **kwargs)
        assert calls == ts.tolist()
        assert torch.allclose(out, x0, atol=1e-6), (steps, (out - x0).abs().max())


# ---------------------------------------------------------------------------------------------- guidance interval
def _run_with_interval(interval, s: float = 3.0, steps: int = 8):
    """dpm++ over a RecordingModel at scale s with a guidance interval -> (output, batch size per call, t per call)."""
    m = RecordingModel()
    x, _, y = _inputs()
    abar = make_schedule("cosine", 1000)
    seen_t: list = []

    def model(xx, tt, yy):
        seen_t.append(int(tt[0]))
        return m(xx, tt, yy)

    out = run("dpm++", cfg(model, y, s, 10, interval), x.clone(), abar, steps, "v")
    return out, [b for b, _ in m.calls], seen_t


def test_interval_covering_every_step_is_plain_cfg():
    full, batches, _ = _run_with_interval((0, 999))
    plain, plain_batches, _ = _run_with_interval(None)
    assert torch.equal(full, plain) and batches == plain_batches == [6] * 8


def test_empty_interval_is_the_conditional_model():
    """No visited timestep lies in [500, 510] at 8 uniform steps: every call is the conditional model, undoubled."""
    empty, batches, ts = _run_with_interval((500, 510))
    cond, cond_batches, _ = _run_with_interval(None, s=1.0)
    assert not any(500 <= t <= 510 for t in ts)
    assert torch.equal(empty, cond) and batches == cond_batches == [3] * 8


def test_interval_guides_exactly_the_steps_inside_it():
    """Bounds are inclusive; steps inside run the doubled batch, the rest the single one (fewer model rows)."""
    _, batches, ts = _run_with_interval((143, 714))  # 8 uniform steps: 999 856 714 571 428 285 143 0
    assert ts == [999, 856, 714, 571, 428, 285, 143, 0]
    assert batches == [3, 3, 6, 6, 6, 6, 6, 3]
    # Per call: the guided combination inside, the conditional output outside.
    m = RecordingModel()
    x, t, y = _inputs()
    fn = cfg(m, y, 2.0, 10, (5, 5))
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
    assert torch.allclose(fn(x, t), uncond + 2.0 * (cond - uncond), atol=1e-5)
    assert torch.equal(fn(x, t + 1), m(x, t + 1, y))


def test_interval_at_scale_zero_is_unconditional_inside():
    m = RecordingModel()
    x, t, y = _inputs()
    fn = cfg(m, y, 0.0, 10, (0, 5))
    assert torch.equal(fn(x, t), m(x, t, torch.full_like(y, 10))) and torch.equal(fn(x, t + 1), m(x, t + 1, y))


@pytest.mark.parametrize("bad", [(5, 4), (-1, 3), (1,), (1, 2, 3), (1.0, 2), (True, 3), "0 9", 7])
def test_bad_guidance_interval_rejected(bad):
    with pytest.raises(ValueError, match="guidance_interval"):
        check_guidance_interval(bad, 1000)


def test_guidance_interval_beyond_the_schedule_rejected():
    assert check_guidance_interval([100, 999], 1000) == (100, 999)
    with pytest.raises(ValueError, match=r"hi <= 99"):
        check_guidance_interval((10, 100), 100)


@pytest.mark.parametrize("interval, s", [(None, 3.0), ((0, 999), 3.0), ((143, 714), 3.0), ((500, 510), 3.0),
                                         ((143, 714), 1.0), (None, 0.0)])
def test_unet_rows_counts_what_cfg_runs(interval, s):
    """unet_rows (used by the benchmarks' FLOP counts) equals the rows guided really sends, per digit."""
    from latentdiff.sampling import unet_rows
    _, batches, _ = _run_with_interval(interval, s=s)
    assert unet_rows(sampling_timesteps(1000, 8), s, interval) == sum(batches) // 3


# ---------------------------------------------------------------------------------------------- the denoiser
def test_denoiser_gives_the_estimates_of_its_network_output():
    from latentdiff.diffusion import predict_x0_eps

    abar = make_schedule("cosine", 100)
    net = lambda x, t, y: 0.5 * x + y.view(-1, 1, 1, 1)  # noqa: E731
    x, t, y = torch.randn(3, 4, 7, 7), torch.tensor([5, 50, 99]), torch.tensor([1.0, 2.0, 3.0])
    for prediction in ("eps", "v"):
        x0, eps = Denoiser(net, abar, prediction)(x, t, y)
        want = predict_x0_eps(net(x, t, y), x, abar[t].float(), prediction)
        assert torch.equal(x0, want[0]) and torch.equal(eps, want[1])
        # and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: the estimates are consistent with the input
        torch.testing.assert_close(renoise(x0, eps, abar[t].view(-1, 1, 1, 1)), x, atol=1e-5, rtol=1e-5)


def test_renoise_is_the_forward_process_and_the_ddim_step():
    from latentdiff.diffusion import q_sample

    abar = make_schedule("cosine", 100)
    x0, eps, t = torch.randn(4, 4, 7, 7), torch.randn(4, 4, 7, 7), torch.tensor([0, 10, 60, 99])
    assert torch.equal(q_sample(x0, t, eps, abar), renoise(x0, eps, abar[t].view(-1, 1, 1, 1)))
    assert torch.equal(renoise(x0, eps, 1.0), x0)  # abar = 1: the clean end
    a, sigma = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    want = math.sqrt(0.5) * x0 + math.sqrt(1 - 0.5 - 0.09) * eps
    torch.testing.assert_close(renoise(x0, eps, a, sigma), want)


def test_per_example_scales_equal_one_call_per_scale():
    """A (B,) tensor of scales (distillation's teachers) guides row i exactly as the float scale[i] does."""
    m = RecordingModel()
    x, t, y = _inputs()
    scales = torch.tensor([0.5, 2.0, 3.0])
    out = cfg(m, y, scales, 10)(x, t)
    for i, s in enumerate(scales.tolist()):
        one = cfg(m, y[i:i + 1], s, 10)(x[i:i + 1], t[i:i + 1])
        assert torch.equal(out[i:i + 1], one), s


def test_a_student_gets_the_scale_as_its_input():
    seen = []

    def student(x, t, y, w):
        seen.append((x.shape[0], w.clone()))
        return x * w.view(-1, 1, 1, 1)

    x, t, y = _inputs()
    d = guided(Denoiser(student, make_schedule("cosine", 1000), "v", takes_scale=True), y, 2.5, 10, interval=(0, 5))
    assert not d.takes_scale
    d(x, t)
    assert seen[0][0] == 3 and seen[0][1].tolist() == [2.5] * 3  # one undoubled batch, the scale as input
    d = guided(Denoiser(student, make_schedule("cosine", 1000), "v", takes_scale=True), y, torch.tensor([1.0, 2, 3]), 10)
    d(x, t)
    assert seen[1][1].tolist() == [1.0, 2.0, 3.0]
