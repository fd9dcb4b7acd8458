"""Loading refuses broken model folders with ModelLoadError: bad config.json, corrupt weights, missing files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_pipeline, tiny_unet, tiny_vae
from safetensors.torch import load_file, save_file

from latentdiff import LatentDiffusion, ModelLoadError, UNet, VAE
from latentdiff.checkpoint import load_checkpoint, save_checkpoint

MODELS = {"vae": (VAE, tiny_vae), "unet": (UNet, tiny_unet)}


@pytest.fixture(params=sorted(MODELS))
def saved(request, tmp_path):
    cls, make = MODELS[request.param]
    folder = tmp_path / request.param
    make().save_pretrained(folder)
    return cls, folder


def _edit_config(folder, fn):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_loads(saved):
    cls, folder = saved
    assert isinstance(cls.from_pretrained(folder), cls)


def test_no_module_prefixes_in_the_file(saved):
    from safetensors.torch import load_file

    _, folder = saved
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_unknown_key_in_config(saved):
    cls, folder = saved
    _edit_config(folder, lambda d: d.update(bogus=1))
    with pytest.raises(ModelLoadError, match="bogus"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("key, value", [("channels", "16"), ("groups", 8.5), ("groups", "8"), ("channels", [8, None])])
def test_wrong_type_in_config(saved, key, value):
    cls, folder = saved
    _edit_config(folder, lambda d: d.update({key: value}))
    with pytest.raises(ModelLoadError, match=key):
        cls.from_pretrained(folder)


def test_invalid_value_in_config(saved):
    cls, folder = saved
    _edit_config(folder, lambda d: d.update(groups=3))  # channels no longer divisible by groups
    with pytest.raises(ModelLoadError, match="divisible"):
        cls.from_pretrained(folder)


def test_config_not_json(saved):
    cls, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        cls.from_pretrained(folder)


def test_config_does_not_match_weights(saved):
    cls, folder = saved
    _edit_config(folder, lambda d: d.update(channels=[c * 2 for c in d["channels"]]))
    with pytest.raises(ModelLoadError, match="does not match"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_weights(saved, keep):
    cls, folder = saved
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        cls.from_pretrained(folder)


def test_garbage_weights(saved):
    cls, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        cls.from_pretrained(folder)


def test_weights_with_a_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    cls, folder = saved
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop(sorted(sd)[0])
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="1 missing"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(saved, name):
    cls, folder = saved
    (folder / name).unlink()
    with pytest.raises(ModelLoadError, match=name):
        cls.from_pretrained(folder)


def test_missing_folder(tmp_path):
    for cls in (VAE, UNet, LatentDiffusion):
        with pytest.raises(ModelLoadError):
            cls.from_pretrained(tmp_path / "nowhere")


def test_refuses_to_save_non_finite_weights(tmp_path):
    vae = tiny_vae()
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ModelLoadError, match="non-finite"):
        vae.save_pretrained(tmp_path / "v")
    assert not (tmp_path / "v" / "config.json").exists()


def _poison(path, value=float("nan"), count=1):
    """Overwrite one element in each of the first ``count`` float tensors of a safetensors file; their names."""
    tensors = load_file(str(path))
    names = [k for k, v in tensors.items() if v.is_floating_point()][:count]
    for k in names:
        tensors[k].view(-1)[0] = value
    save_file(tensors, str(path))
    return names


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_refuses_to_load_non_finite_weights(saved, value):
    """Disk or copy corruption that leaves a valid file of NaN/inf weights is refused, naming file and tensors."""
    cls, folder = saved
    names = _poison(folder / "model.safetensors", value, count=2)
    with pytest.raises(ModelLoadError, match="NaN/inf values in 2 tensor") as e:
        cls.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(e.value) and all(n in str(e.value) for n in names)


def test_ldm_with_non_finite_weights(ldm_dir):
    name = _poison(ldm_dir / "unet" / "model.safetensors")[0]
    with pytest.raises(ModelLoadError, match=rf"unet/model.safetensors holds NaN/inf values in 1 tensor\(s\): {name}"):
        LatentDiffusion.from_pretrained(ldm_dir)


@pytest.mark.parametrize("part", ["model", "ema", "optimizer"])
def test_checkpoint_with_non_finite_tensors_is_not_resumed(tmp_path, part):
    unet = tiny_unet()
    ema = tiny_unet(1)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet(torch.zeros(1, 4, 7, 7), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).sum().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, 3, unet, ema, opt, keep=2)
    name = _poison(ckpt / f"{part}.safetensors")[0]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ModelLoadError, match=rf"{part}.safetensors holds NaN/inf values in 1 tensor\(s\): {name};.*--resume"):
        load_checkpoint(ckpt, unet, ema, opt)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # nothing was half-restored


# ---------------------------------------------------------------------------------------------- LDM folders
@pytest.fixture
def ldm_dir(tmp_path):
    folder = tmp_path / "ldm"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_ldm_with_a_broken_part(ldm_dir, part):
    (ldm_dir / part / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match=part):
        LatentDiffusion.from_pretrained(ldm_dir)


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_ldm_with_a_missing_part(ldm_dir, part):
    shutil.rmtree(ldm_dir / part)
    with pytest.raises(ModelLoadError, match=part):
        LatentDiffusion.from_pretrained(ldm_dir)


def test_ldm_top_config_checked(ldm_dir):
    _edit_config(ldm_dir, lambda d: d["sample"].update(sampler="euler"))
    with pytest.raises(ModelLoadError, match="sampler"):
        LatentDiffusion.from_pretrained(ldm_dir)
    _edit_config(ldm_dir, lambda d: (d["sample"].update(sampler="ddim"), d.update(extra=1)))
    with pytest.raises(ModelLoadError, match="extra"):
        LatentDiffusion.from_pretrained(ldm_dir)


def test_ldm_latent_shape_mismatch_on_load(ldm_dir):
    # sample_size does not change any weight shape, so only the pairing check can catch it.
    _edit_config(ldm_dir / "unet", lambda d: d.update(sample_size=5))
    with pytest.raises(ModelLoadError, match="latents"):
        LatentDiffusion.from_pretrained(ldm_dir)


def test_latent_shape_mismatch_on_construction():
    with pytest.raises(ModelLoadError, match="latents"):
        LatentDiffusion(tiny_unet(sample_size=5), tiny_vae())
    with pytest.raises(ModelLoadError, match="latents"):
        LatentDiffusion(tiny_unet(in_channels=2), tiny_vae())
    with pytest.raises(ModelLoadError, match="latents"):
        LatentDiffusion(tiny_unet(), tiny_vae(channels=(8, 16)))  # 14x14 latents
    LatentDiffusion(tiny_unet(sample_size=14), tiny_vae(channels=(8, 16)))  # a matching pair is fine
