"""Teaching a new class (latentdiff.teach, teach.py): the adapter format, old classes unchanged, refusals, held-out data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_pipeline
from PIL import Image

from latentdiff import LatentDiffusion
from latentdiff.config import DataConfig
from latentdiff.data import training_set
from latentdiff.diffusion import diffusion_loss
from latentdiff.errors import ConfigError, ModelLoadError, RunDirError
from latentdiff.pipeline import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from latentdiff.teach import TeachConfig, teach, teach_folder
from latentdiff.unet import TaughtUNet

FAST = TeachConfig(method="embedding", steps=15, batch_size=8, variants=3)
TUNE = TeachConfig(method="finetune", steps=10, batch_size=8, variants=2, prior_per_class=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teach") / "base"
    tiny_pipeline(seed=4).save_pretrained(folder)
    return folder


def examples(k: int = 4) -> torch.Tensor:
    x = torch.zeros(k, 1, 28, 28)
    for i in range(k):  # a "plus" sign, a little different each time
        x[i, 0, 12 + i % 2:16, 6:22] = 1
        x[i, 0, 6:22, 12:16 - i % 2] = 1
    return x


def test_taught_class_adds_one_row_and_leaves_the_old_classes_bit_identical(base, tmp_path):
    out = teach_folder(base, examples(), "plus", tmp_path / "plus", FAST)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 4096  # one embedding row, not a model
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["class_names"] == ["plus"] and meta["examples"] == 4 and meta["base"] == str(base.resolve())
    plain, taught = LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(out)
    assert taught.class_names == [*map(str, range(10)), "plus"] and taught.num_classes == 11
    assert torch.equal(plain.generate(list(range(10)), seed=3), taught.generate(list(range(10)), seed=3))
    new = taught.generate([10, 10], seed=3)
    assert new.shape == (2, 1, 28, 28) and not torch.equal(new, plain.generate([9, 9], seed=3))
    with pytest.raises(ValueError, match="out of range"):
        plain.generate([10])


def test_teaching_lowers_the_loss_on_the_examples(base):
    pipe = LatentDiffusion.from_pretrained(base)
    z = pipe.encode(examples())
    abar = pipe.alphas_cumprod.float()
    k = pipe.num_classes

    def loss(row):
        unet = pipe.unet.with_classes(row)
        cfg = pipe.config.diffusion
        return sum(diffusion_loss(unet, z, torch.full((4,), k), abar, cfg, k + 1, seeds=torch.arange(4) + s).item()
                   for s in range(0, 400, 4))

    start = pipe.unet.class_embed.weight.detach()[:k].mean(0, keepdim=True)
    learned = teach(pipe, examples(), TeachConfig(method="embedding", steps=60, batch_size=16, variants=4))
    learned = learned.class_embed.weight.detach()[k:k + 1]
    assert loss(learned) < 0.97 * loss(start)  # measured 0.95 on this tiny random UNet


def test_finetune_carries_the_tuned_unet_and_stacks(base, tmp_path):
    """"finetune" (the default) tunes every weight with prior preservation: the adapter holds the whole UNet, which the
    loaded model runs for the taught class only, so the old classes and the unconditional model stay bit-identical,
    alone or beside a taught digit in one batch, guided or not; the new one samples; an embedding row stacks."""
    out = teach_folder(base, examples(), "plus", tmp_path / "tuned", TUNE)
    plain, tuned = LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(out)
    assert tuned.class_names[-1] == "plus" and tuned.num_classes == 11
    assert isinstance(tuned.unet, TaughtUNet) and tuned.unet.base.config == plain.unet.config
    state = tuned.unet.tuned.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in plain.unet.state_dict().items() if k != "class_embed.weight")
    old = list(range(10))
    for scale in (0.0, 1.0, 2.0):  # unconditional, conditional alone, guided
        assert torch.equal(tuned.generate(old, seed=2, guidance_scale=scale), plain.generate(old, seed=2, guidance_scale=scale))
    mixed = tuned.generate([10, 3, 10, 7], seed=5)  # sample i uses seed 5 + i
    assert torch.equal(mixed[1:2], plain.generate([3], seed=6)) and torch.equal(mixed[3:4], plain.generate([7], seed=8))
    assert torch.equal(mixed[2:3], tuned.generate([10], seed=7))  # the taught digit whatever its batch-mates
    assert not torch.equal(mixed[2:3], tuned.generate([10], seed=8))
    more = teach_folder(out, examples().flip(-1), "minus", tmp_path / "more", FAST)
    stacked = LatentDiffusion.from_pretrained(more)
    assert stacked.class_names[-2:] == ["plus", "minus"]
    assert torch.equal(stacked.generate([10, 3], seed=0), tuned.generate([10, 3], seed=0))  # the tuned UNet came along


def test_adapters_stack_and_refuse_another_base(base, tmp_path):
    one = teach_folder(base, examples(), "plus", tmp_path / "one", FAST)
    two = teach_folder(one, examples().flip(-1), "minus", tmp_path / "two", FAST)
    stacked = LatentDiffusion.from_pretrained(two)
    assert stacked.class_names[-2:] == ["plus", "minus"] and stacked.num_classes == 12
    assert torch.equal(stacked.generate([10], seed=0), LatentDiffusion.from_pretrained(one).generate([10], seed=0))
    other = tmp_path / "other"
    tiny_pipeline(seed=5).save_pretrained(other)
    meta = json.loads((one / ADAPTER_CONFIG).read_text())
    (one / ADAPTER_CONFIG).write_text(json.dumps({**meta, "base": str(other)}))
    with pytest.raises(ModelLoadError, match="taught on another model"):
        LatentDiffusion.from_pretrained(one)
    (one / ADAPTER_CONFIG).write_text(json.dumps({**meta, "base": str(tmp_path / "gone")}))
    with pytest.raises(ModelLoadError, match="missing"):
        LatentDiffusion.from_pretrained(one)


@pytest.mark.parametrize("images, name, config, word", [
    (examples(1), "plus", FAST, "at least 2 examples"),
    (examples() * 2, "plus", FAST, r"\[0, 1\]"),
    (torch.zeros(3, 1, 14, 14), "plus", FAST, "28"),
    (examples(), "7", FAST, "already has a class named '7'"),
    (examples(), "  ", FAST, "printable"),
    (examples(), "plus", TeachConfig(steps=0), "steps"),
    (examples(), "plus", TeachConfig(lr=float("nan")), "lr"),
    (examples(), "plus", TeachConfig(method="lora"), "method"),
])
def test_bad_input_writes_nothing(base, tmp_path, images, name, config, word):
    with pytest.raises((ValueError, ConfigError), match=word):
        teach_folder(base, images, name, tmp_path / "out", config)
    assert list(tmp_path.iterdir()) == []  # no folder, no half-written temporary


def test_an_existing_out_folder_is_never_overwritten(base, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunDirError, match="exists"):
        teach_folder(base, examples(), "plus", tmp_path / "taken", FAST)


# ---------------------------------------------------------------------------------------------- teach.py
def run_teach(args, monkeypatch, capsys):
    return run_script("teach.py", args, monkeypatch, capsys)


def test_cli_from_pngs_and_from_npz(base, tmp_path, monkeypatch, capsys):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, x in enumerate(examples()):
        Image.fromarray((x[0].numpy() * 255).astype(np.uint8)).resize((56, 56)).save(pngs / f"{i}.png")
    code, out, err = run_teach(["--model", base, "--images", pngs, "--name", "plus", "--out", tmp_path / "a",
                                "--steps", "5"], monkeypatch, capsys)
    assert code == 0 and "as class 10" in out, err
    np.savez(tmp_path / "x.npz", images=(examples()[:, 0].numpy() * 255).astype(np.uint8))
    code, out, err = run_teach(["--model", base, "--images", tmp_path / "x.npz", "--name", "plus", "--out",
                                tmp_path / "b", "--steps", "5"], monkeypatch, capsys)
    assert code == 0 and LatentDiffusion.from_pretrained(tmp_path / "b").class_names[-1] == "plus", err


@pytest.mark.parametrize("setup, word", [
    (lambda d: d.mkdir(), "no .png files"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"not a png")), "not a readable PNG"),
    (lambda d: (d.mkdir(), Image.new("L", (40, 28)).save(d / "a.png")), "square"),
    (lambda d: np.savez(d.with_suffix(".npz"), pics=np.zeros((3, 28, 28), np.uint8)), "'images'"),
])
def test_cli_bad_images_are_one_line(base, tmp_path, monkeypatch, capsys, setup, word):
    target = tmp_path / "imgs"
    setup(target)
    path = target.with_suffix(".npz") if word == "'images'" else target
    code, _, err = run_teach(["--model", base, "--images", path, "--name", "x", "--out", tmp_path / "o"],
                             monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- held-out data
def test_exclude_classes_leaves_them_out(mnist_dir):
    images, labels = training_set(DataConfig(root=str(mnist_dir), download=False))
    kept_images, kept = training_set(DataConfig(root=str(mnist_dir), download=False, exclude_classes=(7, 3)))
    assert not torch.isin(kept, torch.tensor([3, 7])).any()
    assert len(kept) == int((~torch.isin(labels, torch.tensor([3, 7]))).sum()) and len(kept_images) == len(kept)
    for bad in [(10,), (1, 1), tuple(range(10))]:
        with pytest.raises(ConfigError, match="exclude_classes"):
            DataConfig(exclude_classes=bad).validate()
