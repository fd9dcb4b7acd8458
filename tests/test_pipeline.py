"""LatentDiffusion.generate: shapes, range, seeding, batch-size invariance, input checks, save/load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from latentdiff import VAE, LatentDiffusion, make_grid, to_pil
from latentdiff.config import SampleConfig
from latentdiff.errors import ModelLoadError
from latentdiff.sampling import SAMPLERS, Denoiser, guided
from latentdiff.timesteps import make_timesteps

LABELS = [0, 1, 2, 3, 4, 5, 6, 7]


def test_generate_shape_and_range(pipe):
    images = pipe.generate([3, 3, 7], seed=0)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_same_seed_same_images(pipe, sampler):
    a = pipe.generate(LABELS[:3], seed=5, steps=3, sampler=sampler, eta=0.5)
    b = pipe.generate(LABELS[:3], seed=5, steps=3, sampler=sampler, eta=0.5)
    c = pipe.generate(LABELS[:3], seed=6, steps=3, sampler=sampler, eta=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_generator_is_reproducible(pipe):
    a = pipe.generate([1, 2], steps=2, generator=torch.Generator().manual_seed(3))
    b = pipe.generate([1, 2], steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.exactness
@pytest.mark.parametrize("sampler, eta", [("dpm++", 0.0), ("ddpm", 0.0), ("ddim", 0.5)])
def test_image_i_does_not_depend_on_batch_size(pipe, sampler, eta):
    """Sample i is seeded by seed + i alone, including the per-step noise of stochastic samplers."""
    full = pipe.generate(LABELS, seed=11, steps=4, sampler=sampler, eta=eta, batch_size=8)
    ones = pipe.generate(LABELS, seed=11, steps=4, sampler=sampler, eta=eta, batch_size=1)
    threes = pipe.generate(LABELS, seed=11, steps=4, sampler=sampler, eta=eta, batch_size=3)
    assert torch.equal(full, ones), (full - ones).abs().max()  # bit for bit: fixed tiles (pipeline.run_in_tiles)
    assert torch.equal(full, threes), (full - threes).abs().max()


@pytest.mark.exactness
def test_image_i_does_not_depend_on_the_other_labels(pipe):
    """A prefix of a request gives the same images as the whole request."""
    full = pipe.generate(LABELS, seed=2, steps=3, sampler="ddpm")
    head = pipe.generate(LABELS[:3], seed=2, steps=3, sampler="ddpm")
    assert torch.equal(full[:3], head)


def test_labels_and_guidance_matter(pipe):
    base = pipe.generate([3, 3], seed=0, steps=3, guidance_scale=3.0)
    assert not torch.allclose(base, pipe.generate([4, 4], seed=0, steps=3, guidance_scale=3.0))
    assert not torch.allclose(base, pipe.generate([3, 3], seed=0, steps=3, guidance_scale=1.0))
    # With guidance 0 the labels are ignored: the output is the unconditional model's.
    assert torch.equal(pipe.generate([3, 9], seed=0, steps=3, guidance_scale=0.0),
                       pipe.generate([5, 1], seed=0, steps=3, guidance_scale=0.0))


def test_int_guidance_and_tensor_labels(pipe):
    a = pipe.generate(torch.tensor([1, 2]), seed=0, steps=2, guidance_scale=2)
    b = pipe.generate([1, 2], seed=0, steps=2, guidance_scale=2.0)
    assert torch.equal(a, b)


def test_config_defaults_are_used(pipe):
    sc = pipe.config.sample
    a = pipe.generate([1], seed=0)
    b = pipe.generate([1], seed=0, steps=sc.steps, sampler=sc.sampler, guidance_scale=sc.guidance_scale, eta=sc.eta)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, word", [
    ({"labels": [10]}, "out of range"),
    ({"labels": [-1]}, "out of range"),
    ({"labels": [1.0]}, "integer"),
    ({"labels": [True]}, "integer"),
    ({"labels": ["3"]}, "integer"),
    ({"labels": []}, "empty"),
    ({"labels": torch.tensor([1.0])}, "integer"),
    ({"labels": torch.tensor([[1]])}, "1-D"),
    ({"guidance_scale": float("nan")}, "guidance"),
    ({"guidance_scale": float("inf")}, "guidance"),
    ({"guidance_scale": -1.0}, "guidance"),
    ({"guidance_scale": "3"}, "guidance"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.0}, "steps"),
    ({"steps": 101}, "steps"),
    ({"sampler": "euler"}, "sampler"),
    ({"eta": -0.5}, "eta"),
    ({"eta": 5.0}, r"eta must be a finite number >= 0 and <= 1 \(0 = deterministic DDIM, 1 = DDPM's noise\), got 5\.0"),
    ({"eta": float("nan")}, "eta"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": 1.5}, "seed"),
    ({"labels": 3}, r"list of class indices \(integers\) like \[3, 7\], got 3; for one digit pass \[3\]"),
    ({"labels": None}, "list of class indices"),
    ({"labels": "37"}, "list of class indices"),
    ({"seed": 2**64}, "seed must be an integer in"),
    ({"seed": -2**63 - 1}, "seed must be an integer in"),
    ({"seed": 2**63 - 1}, r"seed must be an integer in -9223372036854775808\.\.9223372036854775806"),  # seed + 1 overflows
])
def test_bad_inputs_raise_value_error(pipe, kwargs, word):
    args = {"labels": [1, 2], "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=word):
        pipe.generate(**args)


def test_steps_up_to_num_timesteps(pipe):
    assert pipe.generate([1], seed=0, steps=1).shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_save_load_round_trip(tmp_path, prediction):
    pipe = tiny_pipeline(seed=3, prediction=prediction)
    pipe.save_pretrained(tmp_path / "ldm")
    assert {p.name for p in (tmp_path / "ldm").iterdir()} >= {"config.json", "unet", "vae"}
    assert json.loads((tmp_path / "ldm" / "config.json").read_text())["diffusion"]["prediction"] == prediction
    loaded = LatentDiffusion.from_pretrained(tmp_path / "ldm")
    assert loaded.config == pipe.config
    assert loaded.unet.config == pipe.unet.config and loaded.vae.config == pipe.vae.config
    assert torch.equal(loaded.alphas_cumprod, pipe.alphas_cumprod)
    for a, b in ((pipe.unet, loaded.unet), (pipe.vae, loaded.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for sampler in ("dpm++", "ddpm"):
        assert torch.equal(pipe.generate([1, 5], seed=0, steps=3, sampler=sampler),
                           loaded.generate([1, 5], seed=0, steps=3, sampler=sampler))


def test_save_with_given_unet_weights(tmp_path):
    pipe, other = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    pipe.save_pretrained(tmp_path / "ldm", unet_state_dict=other.unet.state_dict())
    loaded = LatentDiffusion.from_pretrained(tmp_path / "ldm")
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in loaded.unet.state_dict().items())


def test_latent_scale_travels_with_the_vae(tmp_path):
    pipe = tiny_pipeline()
    pipe.vae.with_latent_stats(0.25, 3.0)
    pipe.save_pretrained(tmp_path / "ldm")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "ldm")
    assert (loaded.vae.config.shift_factor, loaded.vae.config.scaling_factor) == (0.25, 3.0)


# ---------------------------------------------------------------------------------------------- images
def test_to_pil_and_grid():
    images = torch.linspace(0, 1, 5 * 28 * 28).view(5, 1, 28, 28)
    pils = to_pil(images)
    assert len(pils) == 5 and pils[0].size == (28, 28) and pils[0].mode == "L"
    grid = make_grid(images, nrow=2, padding=2)
    assert grid.size == (2 * 30 + 2, 3 * 30 + 2)
    arr = np.asarray(grid)
    assert arr[2:30, 2:30].tolist() == np.asarray(pils[0]).tolist()


# ---------------------------------------------------------------------------------------------- interval and spacing
class CountingUNet(torch.nn.Module):
    """Wraps a UNet and counts the rows it is asked to run (CFG's doubled batch counts double here)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.rows = unet, unet.config, 0

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        return self.unet(x, t, y)


def test_generate_guidance_interval(pipe):
    """[0, T-1] is plain CFG; an interval no step visits is scale 1; a partial one saves the unguided half-batches."""
    args = {"labels": [1, 5, 7], "seed": 0, "steps": 4, "guidance_scale": 3.0}
    plain = pipe.generate(**args)
    assert torch.equal(pipe.generate(**args, guidance_interval=[0, 99]), plain)
    assert torch.equal(pipe.generate(**args, guidance_interval=(50, 60)),  # 4 steps visit 99, 66, 33, 0
                       pipe.generate(**{**args, "guidance_scale": 1.0}))
    pipe.unet, pipe.tile_size = CountingUNet(pipe.unet), 1  # tiles of 1 row: count the rows, not the padding
    part = pipe.generate(**args, guidance_interval=(30, 70))  # guides at 66 and 33 only
    assert pipe.unet.rows == 3 * (1 + 2 + 2 + 1)
    assert not torch.equal(part, plain)


def test_generate_spacing(pipe):
    args = {"labels": [2, 8], "seed": 0, "steps": 5}
    uniform = pipe.generate(**args)
    assert torch.equal(pipe.generate(**args, spacing="uniform"), uniform)
    assert not torch.equal(pipe.generate(**args, spacing="logsnr"), uniform)


def test_sample_config_defaults_for_interval_and_spacing():
    base = tiny_pipeline()
    cfg = dataclasses.replace(base.config, sample=dataclasses.replace(base.config.sample, guidance_interval=(30, 70),
                                                                       spacing="karras", guidance_scale=3.0))
    configured = LatentDiffusion(base.unet, base.vae, cfg)
    a = configured.generate([3, 4], seed=0)
    assert torch.equal(a, base.generate([3, 4], seed=0, guidance_scale=3.0, guidance_interval=[30, 70], spacing="karras"))


@pytest.mark.parametrize("kwargs, word", [
    ({"guidance_interval": [10, 5]}, "guidance_interval"),
    ({"guidance_interval": [0, 100]}, "guidance_interval"),
    ({"guidance_interval": [1.5, 20]}, "guidance_interval"),
    ({"guidance_interval": 5}, "guidance_interval"),
    ({"spacing": "cosine"}, "spacing"),
])
def test_bad_interval_and_spacing(pipe, kwargs, word):
    with pytest.raises(ValueError, match=word):
        pipe.generate([1], seed=0, **kwargs)


def test_interval_and_spacing_are_saved_and_old_configs_load(tmp_path):
    """config.json keeps the new fields; a config.json from before them loads with guidance at every step."""
    base = tiny_pipeline()
    cfg = dataclasses.replace(base.config, sample=dataclasses.replace(base.config.sample, guidance_interval=(10, 80),
                                                                       spacing="logsnr"))
    LatentDiffusion(base.unet, base.vae, cfg).save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["sample"]["guidance_interval"] == [10, 80] and saved["sample"]["spacing"] == "logsnr"
    assert LatentDiffusion.from_pretrained(tmp_path / "new").config == cfg
    base.save_pretrained(tmp_path / "old")
    old = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("guidance_interval", "spacing"):
        del old["sample"][key]
    for key in ("loss_weighting", "min_snr_gamma"):
        del old["diffusion"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    loaded = LatentDiffusion.from_pretrained(tmp_path / "old")
    assert loaded.config.sample.guidance_interval is None and loaded.config.sample.spacing == "uniform"
    assert torch.equal(loaded.generate([1, 2], seed=0, guidance_scale=2.0),
                       base.generate([1, 2], seed=0, guidance_scale=2.0, guidance_interval=[0, 99]))


def test_saved_interval_beyond_the_schedule_is_a_load_error(tmp_path):
    base = tiny_pipeline()  # T = 100
    base.save_pretrained(tmp_path / "ldm")
    data = json.loads((tmp_path / "ldm" / "config.json").read_text())
    data["sample"]["guidance_interval"] = [100, 800]
    (tmp_path / "ldm" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"sample.guidance_interval .* <= 99"):
        LatentDiffusion.from_pretrained(tmp_path / "ldm")
def test_make_grid_layout_is_torchvision_layout():
    """Built on torchvision.utils.make_grid: same pixels; always nrow tiles wide; a lone image keeps its padding."""
    import torchvision

    images = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    tv = (torchvision.utils.make_grid(images, nrow=3, padding=1)[0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(make_grid(images, nrow=3, padding=1)), tv)
    assert make_grid(images[:2], nrow=4).size == (4 * 30 + 2, 30 + 2)  # short row: still 4 tiles wide, black
    one = np.asarray(make_grid(images[:1], nrow=1, padding=3))
    assert one.shape == (34, 34) and one[:3].max() == 0 and one[3:31, 3:31].tolist() == np.asarray(to_pil(images[:1])[0]).tolist()


def test_decode_refuses_non_finite_latents(pipe):
    z = torch.zeros(2, *pipe.vae.latent_shape)
    assert pipe.decode(z).shape == (2, 1, 28, 28)
    z[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        pipe.decode(z)


def test_cpu_channels_last_matches_nchw_and_returns_nchw(pipe):
    """The pipeline runs the UNet and decoder on NHWC inputs on a CPU: same numbers as NCHW, NCHW out."""
    torch.manual_seed(0)
    z = torch.randn(5, *pipe.vae.latent_shape)
    images = pipe.decode(z)
    assert images.is_contiguous()
    ref = ((pipe.vae._decode(pipe.vae.unscale_latents(z)) + 1) / 2).clamp(0, 1)  # NCHW all the way
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=0)
    y, seeds = torch.tensor([0, 1, 2, 3, 4]), torch.arange(5)
    seen, forward = [], pipe.unet.forward
    pipe.unet.forward = lambda x, *a: seen.append(x.is_contiguous(memory_format=torch.channels_last)) or forward(x, *a)
    settings = pipe.settings(guidance_scale=2.0, steps=4, sampler="dpm++", guidance_interval=None)
    out = pipe.sample(pipe.noise(seeds), y, seeds, settings)
    del pipe.unet.forward
    assert out.is_contiguous() and seen and all(seen)  # the UNet saw NHWC inputs at every call
    plain = Denoiser(pipe.unet, pipe.alphas_cumprod, pipe.config.diffusion.prediction)  # the plain NCHW UNet call
    ref = SAMPLERS["dpm++"](guided(plain, y, 2.0, pipe.num_classes), pipe.noise(seeds),
                            make_timesteps(pipe.alphas_cumprod, 4, "uniform"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_settings_are_one_checked_sample_config(pipe):
    """generate's keywords, the editing functions' and the server's all become one SampleConfig, checked once."""
    s = pipe.settings(guidance_scale=2, steps=3, guidance_interval=[0, 50], eta=None)
    assert isinstance(s, SampleConfig) and s.guidance_scale == 2.0 and isinstance(s.guidance_scale, float)
    assert s.guidance_interval == (0, 50) and s.eta == pipe.config.sample.eta and s.steps == 3
    assert s.to_kwargs() == {"guidance_scale": 2.0, "steps": 3, "sampler": s.sampler, "eta": s.eta,
                             "guidance_interval": [0, 50], "spacing": s.spacing, "autoguidance_scale": 1.0}
    assert pipe.settings(**s.to_kwargs()) == s  # a round trip through JSON-ready keywords
    with pytest.raises(ValueError, match="unknown sampling setting 'tile_size'"):
        pipe.settings(tile_size=8)
    for bad, word in [({"steps": "3"}, "steps"), ({"steps": 101}, "1..100"), ({"guidance_scale": float("nan")}, "finite"),
                      ({"eta": True}, "eta"), ({"sampler": "euler"}, "choose one of"), ({"spacing": 3}, "spacing")]:
        with pytest.raises(ValueError, match=word):
            pipe.settings(**bad)


def test_a_students_settings_are_checked_at_the_same_place(pipe):
    from latentdiff.distill import make_student

    student = LatentDiffusion(make_student(pipe.unet), pipe.vae, pipe.config)
    assert student.settings(sampler="lcm", steps=2).sampler == "lcm"
    assert student.settings(sampler="ddim", eta=0).sampler == "ddim"
    for bad in ({"sampler": "dpm++"}, {"sampler": "ddim", "eta": 0.5}, {"sampler": "lcm", "guidance_interval": [0, 5]}):
        with pytest.raises(ValueError, match="needs the teacher"):
            student.settings(**bad)


def test_numpy_labels_seeds_and_settings_are_plain_numbers(pipe):
    """Class indices from numpy (a load_mnist label array, np.arange) work like ints; they used to be refused as
    'not integers', or to crash as not iterable."""
    want = pipe.generate([1, 2], seed=3, steps=2, guidance_scale=2.0)
    got = pipe.generate(np.array([1, 2]), seed=np.int64(3), steps=np.int64(2), guidance_scale=np.float32(2.0))
    assert torch.equal(got, want)


def test_encode_and_decode_check_their_own_inputs(pipe):
    """pipe.encode takes [0, 1] images: a [-1, 1] image is named as such (not 'VAE.encode expects [-1, 1]'); pipe.decode
    refused nothing of the wrong shape (8x8 latents decoded to digits, silently)."""
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"encode expects images in \[0, 1\].*\(x \+ 1\) / 2"):
        pipe.encode(x * 2 - 1)
    with pytest.raises(ValueError, match="divide uint8 pixels by 255"):
        pipe.encode((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"a torch tensor of images \(B, 1, 28, 28\); got numpy.ndarray \(torch.from_numpy"):
        pipe.encode(x.numpy())
    with pytest.raises(ValueError, match=r"with B >= 1; got \(0, 1, 28, 28\)"):
        pipe.encode(x[:0])
    for bad in (torch.zeros(2, 4, 8, 8), torch.zeros(4, 7, 7), torch.zeros(0, 4, 7, 7)):
        with pytest.raises(ValueError, match=r"decode expects scaled latents of shape \(B, 4, 7, 7\)"):
            pipe.decode(bad)
    assert pipe.decode(pipe.encode(x).double()).shape == (2, 1, 28, 28)


def test_from_pretrained_names_a_file_and_a_bad_device(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "ldm")
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        LatentDiffusion.from_pretrained(tmp_path / "ldm" / "config.json")
    with pytest.raises(ValueError, match="device 'gpu' is not a device"):
        LatentDiffusion.from_pretrained(tmp_path / "ldm", device="gpu")
    for bad in (None, pipe):  # was pathlib's TypeError: 'expected str, bytes or os.PathLike object'
        with pytest.raises(ValueError, match="a model folder is a path"):
            LatentDiffusion.from_pretrained(bad)
        with pytest.raises(ValueError, match="a model folder is a path"):
            VAE.from_pretrained(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            LatentDiffusion.from_pretrained(tmp_path / "ldm", device="cuda")
