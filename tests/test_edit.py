"""latentdiff.edit and latentdiff.latents: class swap, inpainting, interpolation, trajectories, stored latents.

Tiny random models: the checks are exact identities (reconstruction, plain samples at the ends,
batch-split independence, determinism), not image quality, which bench/edit_eval.py measures.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import run_script, tiny_pipeline
from PIL import Image

import latentdiff.latents as latents_module
from latentdiff import LatentDiffusion, edit
from latentdiff.data import load_mnist
from latentdiff.errors import DataError
from latentdiff.latents import decode_latents, encode_split, load_latents, save_latents

ATOL = 0.0  # bit for bit across batch shapes, as for generate (pipeline.run_in_tiles)
LABELS = [3, 1, 4, 1, 5, 9]


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline(seed=1)


@pytest.fixture(scope="module")
def digits():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def recon(pipe, x):
    return pipe.decode(pipe.encode(x))


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- img2img
def test_strength_0_is_the_reconstruction(tiny, digits):
    out = edit.img2img(tiny, digits, LABELS, 0.0, seed=0)
    assert out.shape == (6, 1, 28, 28) and torch.equal(out, recon(tiny, digits))


@pytest.mark.exactness
@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_strength_1_is_generate(tiny, digits, sampler):
    """Strength 1 starts from generate's own noise on generate's schedule, so the source is ignored."""
    out = edit.img2img(tiny, digits, LABELS, 1.0, seed=7, sampler=sampler, eta=0.5, guidance_scale=2.0)
    assert torch.equal(out, tiny.generate(LABELS, seed=7, sampler=sampler, eta=0.5, guidance_scale=2.0))


def test_strength_moves_away_from_the_source(tiny, digits):
    rec = recon(tiny, digits)
    dist = [(edit.img2img(tiny, digits, 3, s, seed=0) - rec).abs().mean().item() for s in (0.0, 0.2, 1.0)]
    assert dist[0] == 0 < dist[1] < dist[2]


def test_img2img_uses_the_source_and_the_labels(tiny, digits):
    a = edit.img2img(tiny, digits, 3, 0.6, seed=0, guidance_scale=3.0)
    assert not close(a, edit.img2img(tiny, digits.flip(0), 3, 0.6, seed=0, guidance_scale=3.0), atol=1e-3)
    assert not close(a, edit.img2img(tiny, digits, 8, 0.6, seed=0, guidance_scale=3.0), atol=1e-3)


@pytest.mark.exactness
@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_img2img_batch_split_and_seed(tiny, digits, sampler):
    full = edit.img2img(tiny, digits, LABELS, 0.5, seed=3, sampler=sampler)
    assert close(full, edit.img2img(tiny, digits, LABELS, 0.5, seed=3, sampler=sampler, batch_size=4))
    assert close(full[:2], edit.img2img(tiny, digits[:2], LABELS[:2], 0.5, seed=3, sampler=sampler))
    assert torch.equal(full, edit.img2img(tiny, digits, LABELS, 0.5, seed=3, sampler=sampler))
    assert not close(full, edit.img2img(tiny, digits, LABELS, 0.5, seed=4, sampler=sampler), atol=1e-3)


def test_img2img_accepts_n_28_28_and_a_generator(tiny, digits):
    a = edit.img2img(tiny, digits[:, 0], 2, 0.4, generator=torch.Generator().manual_seed(1))
    b = edit.img2img(tiny, digits, [2] * 6, 0.4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras", "trailing"])
@pytest.mark.parametrize("steps, strength", [(10, 1.0), (10, 0.5), (10, 0.05), (20, 0.3), (1000, 0.002), (5, 0.0)])
def test_sdedit_timesteps(steps, strength, spacing):
    from latentdiff.diffusion import make_schedule
    from latentdiff.timesteps import make_timesteps
    abar = make_schedule("cosine", 1000)
    ts, full = edit.sdedit_timesteps(abar, steps, strength, spacing), make_timesteps(abar, steps, spacing)
    assert ts[0] == round(strength * 999) and bool((ts[1:] < ts[:-1]).all())
    assert torch.equal(ts[1:], full[full < ts[0]])  # the full run's own timesteps below t0
    if strength == 1.0:
        assert torch.equal(ts, full)


def test_img2img_strength_one_is_generate_with_any_spacing(tiny, digits):
    for spacing in ("logsnr", "karras"):
        assert torch.equal(edit.img2img(tiny, digits, LABELS, 1.0, seed=5, spacing=spacing),
                           tiny.generate(LABELS, seed=5, spacing=spacing))


# ---------------------------------------------------------------------------------------------- inpainting
def test_all_keep_mask_is_the_reconstruction(tiny, digits):
    assert torch.equal(edit.inpaint(tiny, digits, torch.ones(28, 28), LABELS, seed=0), recon(tiny, digits))


def test_all_fill_mask_is_generate(tiny, digits):
    out = edit.inpaint(tiny, digits, torch.zeros(1, 1, 28, 28), LABELS, seed=2, guidance_scale=2.0)
    assert torch.equal(out, tiny.generate(LABELS, seed=2, guidance_scale=2.0))


def test_half_mask_keeps_its_half(tiny, digits, monkeypatch):
    """The final latents: kept cells are the source latents exactly, filled cells the model's, the seam a blend."""
    final = []
    decode = tiny.decode
    monkeypatch.setattr(tiny, "decode", lambda z: final.append(z) or decode(z))
    out = edit.inpaint(tiny, digits, edit.half_mask("left"), LABELS, seed=0, guidance_scale=2.0)
    z, src = final[-1], tiny.encode(digits)  # (6, 4, 7, 7)
    assert torch.equal(out, decode(z))
    assert torch.equal(z[..., :3], src[..., :3])  # columns 0-2 cover pixels 0-11, all kept
    assert (z[..., 4:] - src[..., 4:]).abs().mean() > 0.1  # pixels 16-27: filled
    free = edit.inpaint(tiny, digits, torch.zeros(28, 28), LABELS, seed=0, guidance_scale=2.0)
    assert not close(out[..., 20:], free[..., 20:], atol=1e-3)  # the fill depends on the kept half


@pytest.mark.exactness
def test_inpaint_batch_split_and_per_image_masks(tiny, digits):
    masks = torch.stack([edit.half_mask(s)[0] for s in ("left", "right", "top", "bottom", "left", "top")])
    full = edit.inpaint(tiny, digits, masks, LABELS, seed=5, sampler="ddim", eta=1.0)
    assert close(full, edit.inpaint(tiny, digits, masks, LABELS, seed=5, sampler="ddim", eta=1.0, batch_size=4))
    one = edit.inpaint(tiny, digits[1:2], masks[1], LABELS[1], seed=6, sampler="ddim", eta=1.0)
    assert close(full[1:2], one)  # image 1 uses seed 5 + 1


def test_latent_mask_is_the_cell_average():
    m = edit.latent_mask(edit.half_mask("left"), 7)  # 14 kept columns over cells of 4: 3 full, one half
    assert m.shape == (1, 1, 7, 7)
    assert m[0, 0, 0].tolist() == [1, 1, 1, 0.5, 0, 0, 0] and torch.equal(m[0, 0, :, 3], torch.full((7,), 0.5))


# ---------------------------------------------------------------------------------------------- interpolation
@pytest.mark.exactness
@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_seed_interpolation_ends_are_plain_samples(tiny, sampler):
    frames = edit.interpolate_seeds(tiny, 4, 10, 20, 5, sampler=sampler, guidance_scale=2.0)
    assert frames.shape == (5, 1, 28, 28)
    assert close(frames[0], tiny.generate([4], seed=10, sampler=sampler, guidance_scale=2.0)[0])
    assert close(frames[-1], tiny.generate([4], seed=20, sampler=sampler, guidance_scale=2.0)[0])
    assert not close(frames[2], frames[0], atol=1e-3) and not close(frames[2], frames[-1], atol=1e-3)
    again = edit.interpolate_seeds(tiny, 4, 10, 20, 5, sampler=sampler, guidance_scale=2.0, batch_size=2)
    assert close(frames, again)


@pytest.mark.exactness
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_class_interpolation_ends_are_plain_samples(tiny, guidance):
    frames = edit.interpolate_classes(tiny, 2, 7, 11, 4, guidance_scale=guidance)
    assert close(frames[0], tiny.generate([2], seed=11, guidance_scale=guidance)[0])
    assert close(frames[-1], tiny.generate([7], seed=11, guidance_scale=guidance)[0])
    assert not close(frames[1], frames[0], atol=1e-3)
    assert torch.equal(frames, edit.interpolate_classes(tiny, 2, 7, 11, 4, guidance_scale=guidance))


def test_slerp_ends_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 7, 7, generator=g), torch.randn(1, 4, 7, 7, generator=g)
    out = edit.slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.equal(out[0], a[0]) and torch.equal(out[-1], b[0])
    # Unlike a lerp, the middle keeps the norm of Gaussian noise (a lerp would shrink it by ~1/sqrt 2).
    assert abs(out[2].norm() / a.norm() - 1) < 0.15
    assert torch.equal(edit.slerp(a, a, torch.tensor([0.0, 0.5])), torch.cat([a, a]))


# ---------------------------------------------------------------------------------------------- trajectories
@pytest.mark.exactness
@pytest.mark.parametrize("sampler", ["dpm++", "ddim"])
def test_trajectory(tiny, sampler):
    traj = edit.trajectory(tiny, [1, 2, 3], seed=0, steps=5, sampler=sampler, batch_size=2)
    assert traj.x0.shape == (3, 5, 1, 28, 28) and traj.latents.shape == (3, 5, 4, 7, 7)
    assert traj.timesteps.tolist()[-1] == -1 and len(traj.timesteps) == 5
    assert bool((traj.timesteps[1:] < traj.timesteps[:-1]).all())
    assert torch.equal(traj.x0[:, -1], traj.images)
    assert close(traj.images, tiny.generate([1, 2, 3], seed=0, steps=5, sampler=sampler))
    strip = edit.trajectory_strip(traj)
    assert strip.size == (5 * 30 + 2, 6 * 30 + 2)  # 5 steps across; 2 rows per digit


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ({"images": torch.rand(2, 3, 28, 28)}, "shape"),
    ({"images": torch.rand(2, 1, 14, 14)}, "shape"),
    ({"images": torch.rand(0, 1, 28, 28)}, "B >= 1"),
    ({"images": torch.zeros(2, 1, 28, 28, dtype=torch.uint8)}, "255"),
    ({"images": torch.full((2, 1, 28, 28), 2.0)}, r"\[0, 1\]"),
    ({"images": torch.full((2, 1, 28, 28), float("nan"))}, "NaN"),
    ({"images": np.zeros((2, 1, 28, 28))}, r"torch tensor .* numpy.ndarray \(torch.from_numpy"),
    ({"labels": [3, 4, 5]}, "one label per image"),
    ({"labels": [10]}, "out of range"),
    ({"labels": [1.5]}, "integer"),
    ({"strength": 1.5}, "strength"),
    ({"strength": -0.1}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"strength": True}, "strength"),
    ({"strength": "0.5"}, "strength"),
    ({"seed": 1.5}, "seed"),
    ({"guidance_scale": -1.0}, "guidance"),
    ({"steps": 0}, "steps"),
    ({"sampler": "euler"}, "sampler"),
    ({"batch_size": 0}, "batch_size"),
]


@pytest.mark.parametrize("kwargs, word", BAD)
def test_img2img_bad_inputs(tiny, kwargs, word):
    args = {"images": torch.rand(2, 1, 28, 28), "labels": [1, 2], "strength": 0.5, "seed": 0, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=word):
        edit.img2img(tiny, **args)


@pytest.mark.parametrize("mask, word", [
    (torch.full((28, 28), 0.5), "0 \\(fill\\) or 1"),
    (torch.ones(3, 1, 28, 28), "shape"),
    (torch.ones(14, 14), "shape"),
    (torch.ones(2, 2, 28, 28), "shape"),
    ([[1] * 28] * 28, "torch tensor"),
])
def test_inpaint_bad_masks(tiny, mask, word):
    with pytest.raises(ValueError, match=word):
        edit.inpaint(tiny, torch.rand(2, 1, 28, 28), mask, [1, 2], seed=0, steps=2)


def test_inpaint_accepts_bool_and_int_masks(tiny):
    x = torch.rand(2, 1, 28, 28)
    m = edit.half_mask("top")
    a = edit.inpaint(tiny, x, m, 1, seed=0, steps=2)
    assert torch.equal(a, edit.inpaint(tiny, x, m.bool(), 1, seed=0, steps=2))
    assert torch.equal(a, edit.inpaint(tiny, x, m.long()[0], 1, seed=0, steps=2))


@pytest.mark.parametrize("call, word", [
    (lambda p: edit.interpolate_seeds(p, 3, 0, 1, 1), "frames"),
    (lambda p: edit.interpolate_seeds(p, 3, 0, 1, 2.5), "frames"),
    (lambda p: edit.interpolate_seeds(p, 3, 0.5, 1, 3), "seed_a"),
    (lambda p: edit.interpolate_seeds(p, 3, 0, "1", 3), "seed_b"),
    (lambda p: edit.interpolate_seeds(p, 11, 0, 1, 3), "out of range"),
    (lambda p: edit.interpolate_classes(p, 3, 12, 0, 3), "out of range"),
    (lambda p: edit.interpolate_classes(p, 3, 4, None, 3), "seed"),
    (lambda p: edit.interpolate_classes(p, 3, 4, 0, 0), "frames"),
    (lambda p: edit.interpolate_classes(p, 3, 4, 0, 3, eta=-1.0), "eta"),
    (lambda p: edit.trajectory(p, [], seed=0), "empty"),
    (lambda p: edit.trajectory(p, 3, seed=0), r"for one digit pass \[3\]"),  # was TypeError: 'int' object is not iterable
    (lambda p: edit.interpolate_seeds(p, 3, 0, 2**64, 3), "seed_b must be an integer in"),  # was 'Overflow when unpacking'
    (lambda p: edit.interpolate_classes(p, 3, 4, -2**63 - 1, 3), "seed must be an integer in"),
    (lambda p: edit.trajectory(p, [1], seed=0, steps=101), "steps"),
    (lambda p: edit.half_mask("middle"), "half"),
])
def test_other_bad_inputs(tiny, call, word):
    with pytest.raises(ValueError, match=word):
        call(tiny)


# ---------------------------------------------------------------------------------------------- stored latents
def test_encode_split_round_trip(tmp_path, mnist_dir):
    tiny = tiny_pipeline(seed=1)
    vae = tiny.vae.with_latent_stats(0.3, 1.7)
    data = encode_split(vae, mnist_dir, "test")
    images, labels = load_mnist(mnist_dir, "test")
    assert data.latents.shape == (len(images), 4, 7, 7) and torch.equal(data.labels, labels)
    save_latents(tmp_path / "z.safetensors", data, vae="tiny")
    back = load_latents(tmp_path / "z.safetensors")
    assert torch.equal(back.latents, data.latents) and torch.equal(back.labels, labels)
    assert (back.scaling_factor, back.shift_factor) == (1.7, 0.3) and back.metadata["split"] == "test"
    # Stored latents are the scaled posterior means, and decode with the file's own scale and shift.
    x = images[:5].float().div(255).unsqueeze(1)
    assert close(back.latents[:5], tiny.encode(x), atol=1e-5)
    assert close(decode_latents(vae, back)[:5], recon(tiny, x), atol=1e-5)
    assert len(encode_split(vae, mnist_dir, "test", limit=10).latents) == 10


def test_bad_latent_files(tmp_path, tiny):
    with pytest.raises(DataError, match="not found"):
        load_latents(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataError, match="truncated"):
        load_latents(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a latents file"):
        load_latents(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="limit"):
        encode_split(tiny.vae, tmp_path, limit=0)


def test_latents_files_refuse_folders_and_zero_batches(tiny, tmp_path):
    with pytest.raises(DataError, match="is a folder; pass a latents .safetensors file"):
        load_latents(tmp_path)  # was "not found"
    z = torch.zeros(2, 4, 7, 7)
    from latentdiff.latents import LatentSet

    with pytest.raises(ValueError, match="is a folder; pass a file name"):
        save_latents(tmp_path, LatentSet(z, torch.zeros(2, dtype=torch.long), 1.0, 0.0, {}))  # was IsADirectoryError
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):  # was range()'s message
        decode_latents(tiny.vae, LatentSet(z, torch.zeros(2, dtype=torch.long), 1.0, 0.0, {}), batch_size=0)


# ---------------------------------------------------------------------------------------------- command line
def run_edit(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    return run_script("edit.py", args, monkeypatch, capsys)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit") / "ldm"
    tiny_pipeline(seed=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("cmd, extra, size", [
    ("swap", ["--indices", "0", "1", "--to", "7", "--strengths", "0", "0.5", "1"], (4 * 30 + 2, 2 * 30 + 2)),
    ("inpaint", ["--indices", "0", "1", "2", "--keep", "top", "--labels", "5"], (3 * 30 + 2, 3 * 30 + 2)),
    ("every-class", ["--indices", "0", "1", "--steps", "3"], (11 * 30 + 2, 2 * 30 + 2)),
    ("interp-seeds", ["--labels", "1", "2", "--frames", "3"], (3 * 30 + 2, 2 * 30 + 2)),
    ("interp-classes", ["--pairs", "3:8", "--frames", "4"], (4 * 30 + 2, 30 + 2)),
    ("trajectory", ["--labels", "3", "--steps", "3"], (3 * 30 + 2, 2 * 30 + 2)),
])
def test_cli_pictures(saved, mnist_dir, tmp_path, monkeypatch, capsys, cmd, extra, size):
    out = tmp_path / "x.png"
    data = ["--data-dir", mnist_dir] if cmd in ("swap", "inpaint", "every-class") else []
    code, stdout, err = run_edit([cmd, "--model", saved, "--device", "cpu", "--out", out, *data, *extra], monkeypatch, capsys)
    assert code == 0 and "wrote" in stdout, err
    assert Image.open(out).size == size


def test_cli_inpaint_mask_png(saved, mnist_dir, tmp_path, monkeypatch, capsys):
    Image.fromarray((edit.half_mask("right")[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "m.png")
    code, _, err = run_edit(["inpaint", "--model", saved, "--data-dir", mnist_dir, "--indices", "0", "--mask",
                             tmp_path / "m.png", "--labels", "2", "--out", tmp_path / "x.png"], monkeypatch, capsys)
    assert code == 0, err


def test_cli_encode_decode(saved, mnist_dir, tmp_path, monkeypatch, capsys):
    z = tmp_path / "z.safetensors"
    code, stdout, err = run_edit(["encode", "--vae", saved / "vae", "--data-dir", mnist_dir, "--limit", "20",
                                  "--out", z, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "20 latents" in stdout, err
    code, stdout, err = run_edit(["decode", "--vae", saved / "vae", "--latents", z, "--count", "12", "--nrow", "6",
                                  "--out", tmp_path / "g.png", "--device", "cpu", "--zoom", "2"], monkeypatch, capsys)
    assert code == 0 and Image.open(tmp_path / "g.png").size == (2 * (6 * 30 + 2), 2 * (2 * 30 + 2)), err


@pytest.mark.parametrize("args, word", [
    (["swap", "--to", "12"], "out of range"),
    (["swap", "--to", "1", "--strengths", "1.5"], "strength"),
    (["swap", "--to", "1", "--indices", "99999"], "indices"),
    (["inpaint", "--labels", "1"], "exactly one of --keep"),
    (["inpaint", "--labels", "1", "--mask", "missing.png"], "missing.png"),
    (["interp-seeds", "--frames", "1"], "frames"),
    (["interp-classes", "--pairs", "3-8"], "A:B"),
    (["trajectory", "--steps", "0"], "steps"),
    (["trajectory", "--zoom", "0"], "zoom"),
    (["every-class", "--label", "3"], "--label goes with --image"),
    (["every-class", "--image", "missing.png"], "missing.png"),
    (["every-class", "--sampler", "ddpm"], "sampler must be 'ddim'"),
])
def test_cli_bad_input_is_one_line(saved, mnist_dir, tmp_path, monkeypatch, capsys, args, word):
    data = ["--data-dir", mnist_dir] if args[0] in ("swap", "inpaint", "every-class") else []
    code, _, err = run_edit([*args, "--model", saved, "--out", tmp_path / "x.png", *data], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, out, word", [
    (["interp-seeds", "--labels", "1", "--frames", "2"], ".", "is a folder"),
    (["interp-seeds", "--labels", "1", "--frames", "2"], "afile/x.png", "is a file, not a folder"),
    (["trajectory", "--labels", "1"], "x.xyz", "PIL writes no image format"),
    (["encode", "--limit", "2"], ".", "is a folder"),
    (["encode", "--limit", "2"], "afile/z.safetensors", "is a file, not a folder"),
    (["encode", "--limit", "2"], "z.npz", "latents are written as safetensors; end the name in .safetensors"),
])
def test_cli_bad_out_is_refused_before_any_work(saved, mnist_dir, tmp_path, monkeypatch, capsys, args, out, word):
    """A --out that cannot be written fails before the model loads, not after the sampling (a folder used to fail with
    PIL's 'unknown file extension', a name under a file with a traceback, both after all the work)."""
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(LatentDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(latents_module, "encode_split", lambda *a, **k: pytest.fail("the split was encoded"))
    model = ["--vae", saved / "vae", "--data-dir", mnist_dir] if args[0] == "encode" else ["--model", saved]
    code, _, err = run_edit([*args, *model, "--out", tmp_path / out], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_cli_unreadable_image_is_one_line(saved, mnist_dir, tmp_path, monkeypatch, capsys, flag):
    (tmp_path / "junk.png").write_text("not a png")
    args = ["every-class", "--image", tmp_path / "junk.png"] if flag == "--image" else \
        ["inpaint", "--labels", "1", "--indices", "0", "--data-dir", mnist_dir, "--mask", tmp_path / "junk.png"]
    code, _, err = run_edit([*args, "--model", saved, "--out", tmp_path / "x.png"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "not a readable image" in err, err


def test_cli_decode_bad_file(saved, tmp_path, monkeypatch, capsys):
    code, _, err = run_edit(["decode", "--vae", saved / "vae", "--latents", tmp_path / "no.safetensors",
                             "--out", tmp_path / "g.png"], monkeypatch, capsys)
    assert code == 2 and "not found" in err



# ---------------------------------------------------------------------------------------------- your hand in every class
def test_ddim_inversion_is_exact_where_ddim_is():
    """With the exact model of single-point data, DDIM is exact at any step count, so the walk up (ddim_inverse) and
    the walk down (ddim) over the same timesteps meet: the source comes back to float precision."""
    from conftest import single_point_oracle

    from latentdiff.diffusion import make_schedule
    from latentdiff.sampling import Denoiser, ddim, ddim_inverse
    from latentdiff.timesteps import make_timesteps

    abar = make_schedule("cosine", 1000)
    x0 = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = Denoiser(single_point_oracle(x0, abar), abar, "v")
    for steps, spacing in [(5, "uniform"), (20, "logsnr"), (50, "trailing")]:
        ts = make_timesteps(abar, steps, spacing)
        noise = ddim_inverse(d, x0, ts)
        torch.testing.assert_close(ddim(d, noise, ts), x0, atol=1e-9, rtol=0)


def test_invert_then_sample_back_returns_the_source_latent(tiny, digits):
    """The stated tolerance on a (random, rough) tiny UNet: the round trip's error shrinks with the steps and, at
    every timestep of the schedule (T = 100), is below 0.1 on latents of scale ~1."""
    z = tiny.encode(digits)
    errors = []
    for steps in (10, 100):
        noise, ts = edit.invert(tiny, digits, LABELS, steps=steps)
        settings = tiny.settings(sampler="ddim", steps=steps, guidance_scale=1.0)
        back = tiny.sample(noise, torch.tensor(LABELS), None, settings, timesteps=ts, noise_fn=edit._no_noise)
        errors.append((back - z).abs().max().item())
    assert errors[1] < errors[0] and errors[1] < 0.1, errors
    # fixed-point refinement closes most of the gap at few steps (measured here: 0.69 -> 0.16 -> 0.11 at 10 steps)
    refined = []
    for refine in (1, 3):
        noise, ts = edit.invert(tiny, digits, LABELS, steps=10, refine=refine)
        settings = tiny.settings(sampler="ddim", steps=10, guidance_scale=1.0)
        back = tiny.sample(noise, torch.tensor(LABELS), None, settings, timesteps=ts, noise_fn=edit._no_noise)
        refined.append((back - z).abs().max().item())
    assert refined[1] < refined[0] < errors[0] / 2, (errors, refined)


def test_swap_class_keeps_the_source_and_changes_the_class(tiny, digits):
    same = edit.swap_class(tiny, digits, LABELS, LABELS, steps=100, guidance_scale=1.0)
    assert (same - recon(tiny, digits)).abs().max() < 0.1  # same class, no guidance: the reconstruction
    other = edit.swap_class(tiny, digits, LABELS, 0, steps=10, guidance_scale=3.0)
    weak = edit.swap_class(tiny, digits, LABELS, 0, steps=10, guidance_scale=1.0)
    assert other.shape == digits.shape and not close(other, weak, atol=1e-3)
    assert not close(other, edit.swap_class(tiny, digits.flip(0), LABELS[::-1], 0, steps=10, guidance_scale=3.0), 1e-3)
    uncond = edit.swap_class(tiny, digits, None, 0, steps=10, guidance_scale=3.0)  # no source label: null label
    assert uncond.shape == digits.shape and not close(uncond, other, atol=1e-3)


@pytest.mark.exactness
def test_swap_class_is_the_same_whatever_the_batch(tiny, digits):
    full = edit.swap_class(tiny, digits, LABELS, [2, 7, 0, 8, 6, 3], steps=6)
    assert torch.equal(full, edit.swap_class(tiny, digits, LABELS, [2, 7, 0, 8, 6, 3], steps=6, batch_size=4))
    assert torch.equal(full[1:3], edit.swap_class(tiny, digits[1:3], LABELS[1:3], [7, 0], steps=6))


def test_every_class_is_swap_class_to_each_class(tiny, digits):
    out = edit.every_class(tiny, digits[:1], 3, steps=6)
    assert out.shape == (10, 1, 28, 28)
    assert torch.equal(out[5:6], edit.swap_class(tiny, digits[:1], 3, 5, steps=6))


@pytest.mark.parametrize("call, word", [
    (lambda p, x: edit.swap_class(p, x, LABELS, 0, sampler="dpm++"), "sampler must be 'ddim'"),
    (lambda p, x: edit.swap_class(p, x, LABELS, 0, eta=0.5), "eta=0"),
    (lambda p, x: edit.swap_class(p, x, LABELS, [1, 2]), "one label per image"),
    (lambda p, x: edit.swap_class(p, x, LABELS, 10), "out of range"),
    (lambda p, x: edit.swap_class(p, x, LABELS, 1, strength=1.5), "strength"),
    (lambda p, x: edit.every_class(p, x, 3), "one image"),
    (lambda p, x: edit.invert(p, x * 2, LABELS), r"\[0, 1\]"),
    (lambda p, x: edit.invert(p, x, LABELS, inversion_scale=float("nan")), "inversion_scale"),
    (lambda p, x: edit.swap_class(p, x, LABELS, 0, refine=-1), "refine"),
    (lambda p, x: edit.swap_class(p, x, "3", 0), "integers"),
])
def test_inversion_bad_inputs(tiny, digits, call, word):
    with pytest.raises(ValueError, match=word):
        call(tiny, digits)


def test_inversion_refuses_a_student(tiny, digits):
    from latentdiff import LatentDiffusion
    from latentdiff.distill import make_student

    student = LatentDiffusion(make_student(tiny.unet), tiny.vae, tiny.config)
    with pytest.raises(ValueError, match="needs the teacher"):
        edit.swap_class(student, digits, LABELS, 0)


def test_cli_every_class_from_a_png(saved, tmp_path, monkeypatch, capsys):
    digit = np.zeros((56, 56), dtype=np.uint8)
    digit[10:46, 24:32] = 255  # a thick "1", drawn at twice the size
    Image.fromarray(digit).save(tmp_path / "one.png")
    code, stdout, err = run_edit(["every-class", "--model", saved, "--image", tmp_path / "one.png", "--label", "1",
                                  "--steps", "3", "--out", tmp_path / "x.png"], monkeypatch, capsys)
    assert code == 0 and Image.open(tmp_path / "x.png").size == (11 * 30 + 2, 30 + 2), err


def test_cli_reads_a_16_bit_png_as_its_8_bit_twin_and_refuses_black_on_white(saved, tmp_path, monkeypatch, capsys):
    digit = np.zeros((56, 56), dtype=np.uint8)
    digit[10:46, 24:32] = 255
    Image.fromarray(digit).save(tmp_path / "eight.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # mode I;16
    Image.fromarray(255 - digit).save(tmp_path / "inverted.png")
    outs = []
    for name in ("eight", "sixteen"):
        code, _, err = run_edit(["every-class", "--model", saved, "--image", tmp_path / f"{name}.png", "--label", "1",
                                 "--steps", "2", "--out", tmp_path / f"{name}-out.png"], monkeypatch, capsys)
        assert code == 0, err
        outs.append((tmp_path / f"{name}-out.png").read_bytes())
    assert outs[0] == outs[1]
    code, _, err = run_edit(["every-class", "--model", saved, "--image", tmp_path / "inverted.png", "--label", "1",
                             "--out", tmp_path / "x.png"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "inverted.png looks like dark ink on a light ground" in err, err
    assert not (tmp_path / "x.png").exists()


def test_swap_class_defaults_are_its_measured_ones_not_the_models(tiny, digits):
    """The class must change in the steps below strength 0.7: swap_class guides at SWAP_GUIDANCE unless told."""
    assert tiny.config.sample.guidance_scale != edit.SWAP_GUIDANCE
    default = edit.swap_class(tiny, digits[:2], LABELS[:2], 0, steps=5)
    assert torch.equal(default, edit.swap_class(tiny, digits[:2], LABELS[:2], 0, steps=5, strength=edit.SWAP_STRENGTH,
                                                guidance_scale=edit.SWAP_GUIDANCE))


def test_a_numpy_label_is_one_label(tiny, digits):
    """edit.img2img(pipe, x, np.int64(3), ...) (a label taken from a numpy array) used to be 'not iterable'."""
    import numpy as np

    assert torch.equal(edit.img2img(tiny, digits[:2], np.int64(3), 0.5, seed=0, steps=2),
                       edit.img2img(tiny, digits[:2], 3, 0.5, seed=0, steps=2))
