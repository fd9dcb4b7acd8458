"""VAE: shapes, the diagonal Gaussian posterior, input checks, latent scaling, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vae

from latentdiff import VAE, DiagonalGaussian
from latentdiff.vae import vae_loss


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes():
    vae = tiny_vae()
    post = vae.encode(images(3))
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (3, 4, 7, 7) and post.logvar.shape == (3, 4, 7, 7)
    assert vae.latent_shape == (4, 7, 7)
    x = vae.decode(post.mode())
    assert x.shape == (3, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1
    raw = vae.decode(post.mode() * 50, clamp=False)
    assert raw.shape == (3, 1, 28, 28)


@pytest.mark.parametrize("channels, latent", [((8, 16), 14), ((8, 8, 8, 8), 4), ((8,), 28)])
def test_other_depths(channels, latent):
    vae = tiny_vae(channels=channels)
    assert vae.latent_shape == (4, latent, latent)
    z = vae.encode(images(2)).sample(torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, latent, latent)
    assert vae.decode(z).shape == (2, 1, 28, 28)


def test_forward_and_loss():
    vae = tiny_vae().train()
    x = images(4)
    loss, parts, recon = vae_loss(vae, x, kl_weight=1e-3, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(parts["mse"].item() + 1e-3 * parts["kl"].item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    # Same generator seed -> same loss.
    again, _, _ = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


@pytest.mark.parametrize("bad, word", [
    (torch.zeros(2, 1, 27, 28), "shape"),
    (torch.zeros(2, 3, 28, 28), "shape"),
    (torch.zeros(1, 28, 28), "shape"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "float"),
    (torch.full((2, 1, 28, 28), 255.0), r"\[-1, 1\]"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN/inf"),
    (torch.full((2, 1, 28, 28), float("inf")), "NaN/inf"),
])
def test_encode_rejects_bad_input(bad, word):
    with pytest.raises(ValueError, match=word):
        tiny_vae().encode(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_decode_rejects_non_finite_latents(value):
    z = torch.zeros(2, 4, 7, 7)
    z[1, 2, 3, 3] = value
    with pytest.raises(ValueError, match=r"VAE.decode got latents with 1 NaN/inf value"):
        tiny_vae().decode(z)


def test_decode_rejects_wrong_latent_shape():
    with pytest.raises(ValueError, match="latents"):
        tiny_vae().decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        tiny_vae().decode(torch.zeros(4, 7, 7))


# ---------------------------------------------------------------------------------------------- Gaussian
def test_gaussian_sample_is_reproducible_with_generator():
    mean = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    post = DiagonalGaussian(mean, torch.full_like(mean, -2.0))
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    c = post.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert post.mode() is mean


def test_gaussian_sample_statistics():
    mean = torch.full((200_000,), 1.5)
    post = DiagonalGaussian(mean, torch.full_like(mean, math.log(0.25)))  # std 0.5
    z = post.sample(torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_kl():
    zeros = torch.zeros(2, 4, 7, 7)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), zeros)  # N(0, I) || N(0, I) = 0
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    kl = DiagonalGaussian(mean, logvar).kl()
    assert kl.shape == mean.shape and (kl >= 0).all()
    # Closed form for one element: mean 1, var e -> 0.5 * (1 + e - 1 - 1).
    one = DiagonalGaussian(torch.tensor([1.0]), torch.tensor([1.0])).kl()
    assert one.item() == pytest.approx(0.5 * (math.e - 1))


def test_extreme_logvar_stays_finite():
    post = DiagonalGaussian(torch.zeros(3), torch.tensor([-1e4, 0.0, 1e4]))
    assert torch.isfinite(post.std).all() and torch.isfinite(post.kl()).all()


# ---------------------------------------------------------------------------------------------- scaling
def test_latent_scaling_round_trip_and_config():
    vae = tiny_vae()
    assert vae.with_latent_stats(shift=0.3, scale=2.5) is vae
    assert vae.config.shift_factor == 0.3 and vae.config.scaling_factor == 2.5
    z = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(vae.scale_latents(z), (z - 0.3) * 2.5)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)


# ---------------------------------------------------------------------------------------------- saving
def test_save_load_round_trip(tmp_path):
    vae = tiny_vae().with_latent_stats(0.1, 1.7)
    vae.save_pretrained(tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "model.safetensors"}
    loaded = VAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == vae.config and not loaded.training
    sd, lsd = vae.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(vae.encode(x).mean, loaded.encode(x).mean)
        z = vae.encode(x).mean
        assert torch.equal(vae.decode(z), loaded.decode(z))
