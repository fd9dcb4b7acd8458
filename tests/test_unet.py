"""UNet: output shapes on odd and even latent grids, conditioning, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet

from latentdiff import UNet
from latentdiff.nn import timestep_embedding


def call(unet: UNet, b: int, size: int, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, unet.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, unet.config.num_classes + 1, (b,), generator=g) if labels is None else labels
    with torch.no_grad():
        return unet(x, t, y)


@pytest.mark.parametrize("size", [7, 5, 9, 8, 4])
def test_output_shape(size):
    unet = tiny_unet(sample_size=size)
    assert call(unet, 3, size).shape == (3, 4, size, size)


@pytest.mark.parametrize("channels, attn", [((16,), (True,)), ((16, 32, 32), (False, True, True))])
def test_output_shape_other_depths(channels, attn):
    unet = tiny_unet(channels=channels, attention_levels=attn)
    assert call(unet, 2, 7).shape == (2, 4, 7, 7)
    assert call(unet, 2, 9).shape == (2, 4, 9, 9)


def test_other_latent_channels():
    unet = tiny_unet(in_channels=2)
    assert call(unet, 2, 7).shape == (2, 2, 7, 7)


def test_zero_output_at_init():
    torch.manual_seed(0)
    unet = UNet(tiny_unet().config)
    assert torch.equal(call(unet, 2, 7), torch.zeros(2, 4, 7, 7))


def test_label_and_time_change_the_output():
    unet = tiny_unet()
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        base = unet(x, t, torch.tensor([3, 3]))
        assert not torch.allclose(base, unet(x, t, torch.tensor([4, 4])))
        assert not torch.allclose(base, unet(x, t, torch.tensor([10, 10])))  # the null label is a valid input
        assert not torch.allclose(base, unet(x, t + 1, torch.tensor([3, 3])))


def test_samples_are_independent_in_a_batch():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 4, 7, 7, generator=g), torch.tensor([1, 50, 300, 999]), torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        full = unet(x, t, y)
        single = torch.cat([unet(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert torch.allclose(full, single, atol=1e-5)


def test_label_out_of_range_fails():
    with pytest.raises(IndexError):
        call(tiny_unet(), 1, 7, labels=torch.tensor([11]))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert e.shape == (3, 16)
    assert torch.equal(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert timestep_embedding(torch.tensor([0.5]), 7).shape == (1, 7)


def test_backward():
    unet = tiny_unet().train()
    g = torch.Generator().manual_seed(0)
    out = unet(torch.randn(2, 4, 7, 7, generator=g), torch.tensor([3, 4]), torch.tensor([1, 10]))
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())


def test_save_load_round_trip(tmp_path):
    unet = tiny_unet(sample_size=5)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == unet.config and not loaded.training
    sd, lsd = unet.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    assert torch.equal(call(unet, 3, 5), call(loaded, 3, 5))


def test_save_given_state_dict(tmp_path):
    unet = tiny_unet()
    other = tiny_unet(seed=1).state_dict()
    unet.save_pretrained(tmp_path / "u", state_dict=other)
    loaded = UNet.from_pretrained(tmp_path / "u")
    assert all(torch.equal(v, other[k]) for k, v in loaded.state_dict().items())
