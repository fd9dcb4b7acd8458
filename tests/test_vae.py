"""VAE: shapes, the diagonal Gaussian posterior, input checks, latent scaling, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vae

from latentdiff import VAE, DiagonalGaussian
from latentdiff.errors import ModelLoadError
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


def test_encode_and_decode_take_any_float_dtype_and_empty_batches():
    """float64 (torch.from_numpy of a float array) and half inputs used to fail deep in a convolution
    ('Input type (double) and bias type (float) should be the same'); an empty batch in encode's min()."""
    vae = tiny_vae()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    z = vae.encode(x).mean
    assert torch.allclose(vae.encode(x.double()).mean, z, atol=1e-5) and vae.encode(x.half()).mean.dtype == torch.float32
    assert torch.allclose(vae.decode(z.double()), vae.decode(z), atol=1e-5)
    assert vae.encode(x[:0]).mean.shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match="float latents"):
        vae.decode(z.long())


def test_from_pretrained_of_an_ldm_folder_points_at_its_vae(tmp_path):
    """README: VAE.from_pretrained("runs/vae") or "runs/ldm/vae"; "runs/ldm" itself used to fail as an invalid config.json."""
    from conftest import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    with pytest.raises(ModelLoadError, match=r"is an LDM run folder, not a VAE folder; its VAE is in .*ldm/vae"):
        VAE.from_pretrained(tmp_path / "ldm")
    from latentdiff.unet import UNet  # the same for a UNet (evaluate --guide runs/ldm said "unknown keys")

    with pytest.raises(ModelLoadError, match=r"is an LDM run folder, not a UNet folder; its UNet is in .*ldm/unet"):
        UNet.from_pretrained(tmp_path / "ldm")
    with pytest.raises(ModelLoadError, match="is a file; pass the model folder"):
        VAE.from_pretrained(tmp_path / "ldm" / "vae" / "config.json")
    assert VAE.from_pretrained(tmp_path / "ldm" / "vae").config.latent_channels == 4


def test_from_pretrained_of_another_kind_of_model_names_it(tmp_path):
    """runs/ldm/unet passed as a VAE (or the VAE as a UNet) used to read as 'config.json is invalid: unknown key(s)'."""
    from conftest import tiny_pipeline

    from latentdiff import UNet

    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    with pytest.raises(ModelLoadError, match=r"ldm/unet holds a UNet, not a VAE; pass a VAE folder \(a VAE run folder"):
        VAE.from_pretrained(tmp_path / "ldm" / "unet")
    with pytest.raises(ModelLoadError, match=r"ldm/vae holds a VAE, not a UNet; pass a UNet folder"):
        UNet.from_pretrained(tmp_path / "ldm" / "vae")
    cfg = tmp_path / "ldm" / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace('"groups"', '"colour": 1, "groups"'))  # an unknown key: still "invalid"
    with pytest.raises(ModelLoadError, match="is invalid"):
        VAE.from_pretrained(tmp_path / "ldm" / "vae")
