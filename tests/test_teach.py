"""Teaching a new class (latentdiff.teach, teach.py): the adapter format, old classes unchanged, refusals, held-out data."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec

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
from latentdiff.serialization import read_tensors
from latentdiff.teach import LORA_TARGETS, TeachConfig, save_taught, taught_pipeline, teach, teach_folder
from latentdiff.unet import TaughtUNet

FAST = TeachConfig(method="embedding", steps=15, batch_size=8, variants=3)
TUNE = TeachConfig(method="finetune", steps=10, batch_size=8, variants=2, prior_per_class=2)
LORA = TeachConfig(method="lora", steps=10, batch_size=8, variants=2, prior_per_class=2, lora_rank=4)
needs_peft = pytest.mark.skipif(find_spec("peft") is None, reason="teach method lora needs peft: pip install -e '.[lora]'")


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
    (examples(), "plus", TeachConfig(method="dreambooth"), "method"),
    (examples(), "plus", TeachConfig(method="lora", lora_rank=0), "lora_rank"),
])
def test_bad_input_writes_nothing(base, tmp_path, images, name, config, word):
    with pytest.raises((ValueError, ConfigError), match=word):
        teach_folder(base, images, name, tmp_path / "out", config)
    assert list(tmp_path.iterdir()) == []  # no folder, no half-written temporary


def test_an_existing_out_folder_is_never_overwritten(base, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunDirError, match="exists"):
        teach_folder(base, examples(), "plus", tmp_path / "taken", FAST)


def test_an_out_under_a_file_is_refused_before_teaching(base, tmp_path, monkeypatch):
    """It used to fail only when the adapter was written, after the whole teaching, with a FileExistsError traceback."""
    import latentdiff.teach as teach_module

    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(teach_module, "teach", lambda *a, **k: pytest.fail("taught before checking --out"))
    with pytest.raises(RunDirError, match="lies under the file"):
        teach_folder(base, examples(), "plus", tmp_path / "afile" / "star", FAST)
    assert (tmp_path / "afile").read_text() == "mine"


def test_cli_images_that_do_not_exist_are_named(base, tmp_path, monkeypatch, capsys):
    code, _, err = run_teach(["--model", base, "--images", tmp_path / "nope", "--name", "x", "--out", tmp_path / "o"],
                             monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err, err


# ---------------------------------------------------------------------------------------------- lora
def lora_loss(unet, pipe, k: int) -> float:
    """The diffusion loss of class ``k`` on the examples, over 100 fixed noise draws."""
    z, abar = pipe.encode(examples()), pipe.alphas_cumprod.float()
    return sum(diffusion_loss(unet, z, torch.full((4,), k), abar, pipe.config.diffusion, unet.config.num_classes,
                              seeds=torch.arange(4) + s).item() for s in range(0, 400, 4))


@needs_peft
def test_lora_teaches_and_its_adapter_is_the_factors_and_rows(base, tmp_path):
    """"lora": the adapter holds the new row and LoRA factors of LORA_TARGETS only (a fraction of finetune's tuned UNet);
    loaded, they are merged into the base's weights and routed like finetune's (the old classes and the unconditional
    model bit-identical, guided or not); the taught class's loss falls; the reloaded model is the taught one, bit
    for bit."""
    pipe = LatentDiffusion.from_pretrained(base)
    unet = teach(pipe, examples(), LORA)
    taught = taught_pipeline(pipe, unet, "plus", LORA)
    out = save_taught(tmp_path / "lora", base, taught, ["plus"])
    tensors = read_tensors(out / ADAPTER_WEIGHTS)
    factors = sorted(k for k in tensors if k != "class_embed")
    assert factors and all(k.startswith("lora.") and k.endswith((".A", ".B")) for k in factors)
    assert {k[5:-2].rsplit(".", 1)[1] for k in factors} == set(LORA_TARGETS)
    assert all(tensors[k].shape[0 if k.endswith(".A") else 1] == 4 for k in factors)  # rank 4
    tuned = teach_folder(base, examples(), "plus", tmp_path / "tuned", TUNE)
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 0.4 * (tuned / ADAPTER_WEIGHTS).stat().st_size  # measured 0.16
    loaded = LatentDiffusion.from_pretrained(out)
    assert isinstance(loaded.unet, TaughtUNet) and loaded.class_names[-1] == "plus"
    untouched = [n for n, w in pipe.unet.state_dict().items()
                 if n != "class_embed.weight" and torch.equal(w, loaded.unet.tuned.state_dict()[n])]
    assert untouched and not any(n.rsplit(".", 2)[-2] in LORA_TARGETS for n in untouched if n.endswith(".weight"))
    for scale in (0.0, 1.0, 2.0):
        assert torch.equal(loaded.generate(list(range(10)), seed=2, guidance_scale=scale),
                           pipe.generate(list(range(10)), seed=2, guidance_scale=scale))
    assert torch.equal(loaded.generate([10, 3, 10], seed=4), taught.generate([10, 3, 10], seed=4))
    start = pipe.unet.with_classes(pipe.unet.class_embed.weight.detach()[:10].mean(0, keepdim=True))
    longer = teach(pipe, examples(), TeachConfig(method="lora", steps=60, batch_size=16, variants=4, prior_per_class=2))
    assert lora_loss(longer, pipe, 10) < 0.97 * lora_loss(start, pipe, 10)  # measured 0.88 on this tiny random UNet


@needs_peft
def test_teaching_again_on_a_lora_adapter(base, tmp_path):
    """lora after lora: the factors side by side along the rank, still no tuned UNet in the file; a row (embedding)
    after lora keeps the factors; finetune after lora saves the tuned UNet whole; lora after finetune is refused in
    one line. Each reloads to the model it was taught as, and the old classes stay the base's."""
    one = teach_folder(base, examples(), "plus", tmp_path / "one", LORA)
    two = teach_folder(one, examples().flip(-1), "minus", tmp_path / "two", LORA)
    row = teach_folder(one, examples().flip(-2), "vee", tmp_path / "row", FAST)
    tensors = read_tensors(two / ADAPTER_WEIGHTS)
    assert not any(k.startswith("unet.") for k in tensors) and tensors["lora.mid.1.qkv.A"].shape[0] == 8
    assert set(read_tensors(row / ADAPTER_WEIGHTS)) == set(read_tensors(one / ADAPTER_WEIGHTS))
    plain, first = LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(one)
    with_row = LatentDiffusion.from_pretrained(row)
    assert torch.equal(with_row.generate([10, 5], seed=1), first.generate([10, 5], seed=1))  # the same LoRA weights
    stacked = LatentDiffusion.from_pretrained(two)
    assert stacked.class_names[-2:] == ["plus", "minus"]
    assert torch.equal(stacked.generate(list(range(10)), seed=2), plain.generate(list(range(10)), seed=2))
    pipe = LatentDiffusion.from_pretrained(one)  # in memory, as the server teaches: the same bits as the reloaded file
    again = taught_pipeline(pipe, teach(pipe, examples().flip(-1), LORA), "minus", LORA)
    assert torch.equal(again.generate([11, 10], seed=3), stacked.generate([11, 10], seed=3))
    full = teach_folder(one, examples().flip(-1), "minus", tmp_path / "full", TUNE)
    assert any(k.startswith("unet.") for k in read_tensors(full / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="fine-tuned copy") as e:
        teach_folder(full, examples(), "bar", tmp_path / "bar", LORA)
    assert "\n" not in str(e.value) and not (tmp_path / "bar").exists()


@needs_peft
def test_merged_lora_is_the_peft_model():
    """UNet.with_lora's merge computes what peft's LoRA layers compute beside the frozen weights (to float rounding)."""
    from latentdiff.teach import _factors, _require_peft

    unet = tiny_pipeline(seed=4).unet.eval()
    injected = unet.with_classes(unet.class_embed.weight.detach()[:1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in _require_peft()(injected, 3, 0):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B too, which peft starts at zero
    grown = unet.with_classes(injected.class_embed.weight.detach()[10:11])
    merged = grown.with_lora(_factors(injected))
    x, t, y = torch.randn(4, 4, 7, 7, generator=g), torch.tensor([5, 30, 60, 90]), torch.tensor([10, 3, 11, 0])
    with torch.no_grad():
        want, got = injected(x, t, y), merged(x, t, y)
        assert (want - grown(x, t, y)).abs().max() > 0.1  # the updates matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.exactness
def test_lora_merge_gives_the_same_bits_on_every_kernel_set_and_thread_count():
    """with_lora's merge is numpy's fp32 W + sum_j B[:, j] A[j], rank by rank from IEEE-rounded products, whatever
    the kernel set (tests/test_invariance.py reruns this under each) and the thread count: no peft needed."""
    unet = tiny_pipeline(seed=4).unet
    w = unet.state_dict()["mid.0.conv1.weight"]  # (out, in, 3, 3)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, *w.shape[1:], generator=g), torch.randn(w.shape[0], 5, generator=g)
    big_a, big_b = a.flatten(1).numpy(), b.numpy()
    delta = big_b[:, :1] * big_a[:1]
    for j in range(1, 5):
        delta = delta + big_b[:, j:j + 1] * big_a[j:j + 1]
    want = torch.from_numpy(w.flatten(1).numpy() + delta).view_as(w)
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(unet.with_lora({"mid.0.conv1": (a, b)}).state_dict()["mid.0.conv1.weight"], want), n
    finally:
        torch.set_num_threads(before)


@needs_peft
def test_lora_factors_that_do_not_fit_are_refused(base, tmp_path):
    out = teach_folder(base, examples(), "plus", tmp_path / "lora", LORA)
    tensors = read_tensors(out / ADAPTER_WEIGHTS)
    a = tensors["lora.mid.1.qkv.A"]
    with pytest.raises(ValueError, match="do not fit 'mid.1.qkv'"):
        LatentDiffusion.from_pretrained(base).unet.with_lora({"mid.1.qkv": (a, tensors["lora.mid.1.proj.B"])})
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if k != "lora.mid.1.qkv.B"}, out / ADAPTER_WEIGHTS)
    with pytest.raises(ModelLoadError, match="do not fit its base"):
        LatentDiffusion.from_pretrained(out)


def test_lora_without_peft_is_one_line_and_its_adapters_still_load(base, tmp_path, monkeypatch):
    """peft is needed to teach with LoRA only: without it, teaching says how to install it, and a LoRA adapter loads
    (its factors are merged by UNet.with_lora)."""
    saved = None
    if find_spec("peft") is not None:
        saved = teach_folder(base, examples(), "plus", tmp_path / "lora", LORA)
        want = LatentDiffusion.from_pretrained(saved).generate([10, 2], seed=0)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install 'latentdiff\[lora\]'") as e:
        teach_folder(base, examples(), "plus", tmp_path / "out", LORA)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    if saved is not None:
        assert torch.equal(LatentDiffusion.from_pretrained(saved).generate([10, 2], seed=0), want)


@pytest.mark.parametrize("theirs", ["full", "empty"])
def test_an_out_folder_made_by_another_run_meanwhile_is_left_and_this_work_kept_beside_it(base, tmp_path, monkeypatch,
                                                                                          theirs):
    import latentdiff.teach as teach_module

    out = tmp_path / "plus"
    real = teach_module.teach

    def racing(*args, **kw):  # another teach.py run with the same --out finishes while this one teaches
        out.mkdir()
        if theirs == "full":
            (out / "adapter.json").write_text("theirs")
        return real(*args, **kw)

    monkeypatch.setattr(teach_module, "teach", racing)
    with pytest.raises(RunDirError, match=f"{out} was made by another run .* saved as {out}-2$"):
        teach_folder(base, examples(), "plus", out, FAST)
    assert sorted(p.name for p in out.iterdir()) == (["adapter.json"] if theirs == "full" else [])
    if theirs == "full":
        assert (out / "adapter.json").read_text() == "theirs"
    assert LatentDiffusion.from_pretrained(tmp_path / "plus-2").class_names[-1] == "plus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plus", "plus-2"]  # no hidden temporary folder left


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
                                tmp_path / "b", "--steps", "5", "--method", "embedding"], monkeypatch, capsys)  # no prior: fast
    assert code == 0 and LatentDiffusion.from_pretrained(tmp_path / "b").class_names[-1] == "plus", err


@needs_peft
def test_cli_method_lora(base, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", images=(examples()[:, 0].numpy() * 255).astype(np.uint8))
    code, out, err = run_teach(["--model", base, "--images", tmp_path / "x.npz", "--name", "plus", "--out",
                                tmp_path / "c", "--steps", "3", "--method", "lora", "--lora-rank", "2"], monkeypatch, capsys)
    assert code == 0 and "as class 10" in out, err
    assert read_tensors(tmp_path / "c" / ADAPTER_WEIGHTS)["lora.mid.1.qkv.A"].shape[0] == 2
    assert json.loads((tmp_path / "c" / ADAPTER_CONFIG).read_text())["teach"]["lora_rank"] == 2


@pytest.mark.parametrize("setup, word", [
    (lambda d: d.mkdir(), "no .png files"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"not a png")), "not a readable PNG"),
    (lambda d: (d.mkdir(), Image.new("L", (40, 28)).save(d / "a.png")), "square"),
    (lambda d: np.savez(d.with_suffix(".npz"), pics=np.zeros((3, 28, 28), np.uint8)), "'images'"),
    (lambda d: (d.mkdir(), Image.new("L", (28, 28), 255).save(d / "a.png")), "a.png looks like dark ink"),
    (lambda d: np.savez(d.with_suffix(".npz"), images=np.full((3, 28, 28), 255, np.uint8)), "images[0] looks like dark"),
])
def test_cli_bad_images_are_one_line(base, tmp_path, monkeypatch, capsys, setup, word):
    target = tmp_path / "imgs"
    setup(target)
    path = target.with_suffix(".npz") if target.with_suffix(".npz").exists() else target
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
