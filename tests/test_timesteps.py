"""Timestep spacings: every spacing gives a valid sequence, and the continuous ones space what they claim."""

from __future__ import annotations

import pytest
import torch

from latentdiff.diffusion import make_schedule
from latentdiff.timesteps import SPACINGS, make_timesteps, sampling_timesteps


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", sorted(SPACINGS))
def test_every_spacing_is_valid_for_every_step_count(spacing, schedule):
    """Descending, unique, within 0..T-1, first T-1, exactly `steps` long, for 1..50 steps (and all T)."""
    abar = make_schedule(schedule, 1000)
    for steps in list(range(1, 51)) + [999, 1000]:
        ts = make_timesteps(abar, steps, spacing)
        assert ts.dtype == torch.long and ts.shape == (steps,), (steps, ts)
        assert ts[0] == 999 and ts.min() >= 0
        assert bool((ts[1:] < ts[:-1]).all()), (steps, ts)
        if spacing != "trailing" and steps > 1:
            assert ts[-1] == 0
    assert make_timesteps(abar, 1000, spacing).tolist() == list(range(999, -1, -1))


def test_small_schedules():
    abar = make_schedule("cosine", 10)
    for spacing in SPACINGS:
        for steps in range(1, 11):
            ts = make_timesteps(abar, steps, spacing)
            assert len(set(ts.tolist())) == steps and ts[0] == 9 and (ts[1:] < ts[:-1]).all()


def test_uniform_is_the_original_sequence():
    abar = make_schedule("cosine", 1000)
    for steps in (1, 2, 7, 10, 20):
        assert torch.equal(make_timesteps(abar, steps, "uniform"), sampling_timesteps(1000, steps))


def test_trailing_formula():
    abar = make_schedule("linear", 1000)
    assert make_timesteps(abar, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(abar, 1, "trailing").tolist() == [999]


def test_logsnr_is_evenly_spaced_in_log_snr():
    abar = make_schedule("linear", 1000)  # linear: one timestep is a small log-SNR step everywhere
    lam = torch.log(abar / (1 - abar))
    gaps = lam[make_timesteps(abar, 10, "logsnr")][1:].diff()  # from step 1: step 0 is always T-1
    assert gaps.min() > 0 and (gaps.max() - gaps.min()) / gaps.mean() < 0.1


def test_karras_is_evenly_spaced_in_sigma_to_the_one_seventh():
    abar = make_schedule("cosine", 1000)
    sigma = ((1 - abar) / abar).sqrt()
    ts = make_timesteps(abar, 8, "karras")
    gaps = sigma[ts][1:].pow(1 / 7).diff()
    assert gaps.max() < 0 and (gaps.max() - gaps.min()) / gaps.abs().mean() < 0.15
    # Karras spends more of its steps at low noise than uniform spacing does.
    assert (ts < 100).sum() > (make_timesteps(abar, 8, "uniform") < 100).sum()


def test_continuous_spacings_start_resolving_at_sigma_max_80():
    """The cosine schedule's clipped tail (sigma(999) ~ 2e4) does not swallow the steps: only step 0 is above 80."""
    abar = make_schedule("cosine", 1000)
    sigma = ((1 - abar) / abar).sqrt()
    for spacing in ("logsnr", "karras"):
        ts = make_timesteps(abar, 10, spacing)
        assert ts[0] == 999 and sigma[ts[1:]].max() < 80, (spacing, ts)


def test_bad_spacing_and_steps():
    abar = make_schedule("cosine", 100)
    with pytest.raises(ValueError, match="unknown spacing 'log'"):
        make_timesteps(abar, 10, "log")
    for bad in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            make_timesteps(abar, bad, "karras")
