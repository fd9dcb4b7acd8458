"""Try every bad input we know of and print what each gets, as a Markdown table (docs/bad_inputs.md).

    python scripts/bad_inputs.py > docs/bad_inputs.md

Uses tiny models and synthetic IDX files in a temporary folder: no MNIST, no network, ~1 minute.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from latentdiff import VAE, LatentDiffusion, PipelineConfig, UNet  # noqa: E402
from latentdiff.config import DiffusionConfig, SampleConfig, UNetConfig, VAEConfig  # noqa: E402
from latentdiff.data import load_mnist  # noqa: E402
from latentdiff.runlock import RunLock  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from latentdiff.evaluate import load_samples  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def api(what: str, fn) -> None:
    """Record the exception type and message of a Python call that must fail."""
    try:
        fn()
        ROWS.append((what, "**no error**", ""))
    except Exception as e:  # noqa: BLE001 - we report whatever comes out
        ROWS.append((what, type(e).__name__, str(e).splitlines()[0]))


def cli(what: str, args: list[str], env: dict | None = None) -> None:
    """Record exit code and the last stderr line of a script that must fail."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ROWS.append((what, f"exit {proc.returncode}", lines[-1] if lines else "(no message)"))


def write_idx(folder: Path, n: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (g.random((n, 28, 28)) * 255).astype(np.uint8)
    for prefix in ("train", "t10k"):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="latentdiff_bad_"))
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=(8, 16, 16)))
    unet = UNet(UNetConfig(channels=(16, 32), num_heads=2, num_res_blocks=1))
    pipe = LatentDiffusion(unet, vae, PipelineConfig(DiffusionConfig(num_timesteps=100), SampleConfig(steps=2)))
    pipe.save_pretrained(tmp / "ldm")
    vae.save_pretrained(tmp / "vae")

    api("`generate(labels=[10])` (out of range)", lambda: pipe.generate([10]))
    api("`generate(labels=[1.5])` (not an integer)", lambda: pipe.generate([1.5]))
    api("`generate(labels=[])`", lambda: pipe.generate([]))
    api("`generate(..., guidance_scale=nan)`", lambda: pipe.generate([1], guidance_scale=float("nan")))
    api("`generate(..., guidance_scale=-1)`", lambda: pipe.generate([1], guidance_scale=-1.0))
    api("`generate(..., steps=0)`", lambda: pipe.generate([1], steps=0))
    api("`generate(..., sampler='euler')`", lambda: pipe.generate([1], sampler="euler"))
    api("`generate(..., guidance_interval=[800, 100])` (lo > hi)", lambda: pipe.generate([1], guidance_interval=[800, 100]))
    api("`generate(..., guidance_interval=[100, 800])` on a 100-step schedule",
        lambda: pipe.generate([1], guidance_interval=[100, 800]))
    api("`generate(..., spacing='log')`", lambda: pipe.generate([1], spacing="log"))
    api("`generate(..., sampler='ddim', eta=5)` (eta above 1)", lambda: pipe.generate([1], sampler="ddim", eta=5.0))
    api("`generate(labels=3)` (one int, not a list)", lambda: pipe.generate(3))
    api("`generate(..., seed=2**64)` (not a 64-bit seed)", lambda: pipe.generate([1], seed=2**64))
    api("`pipe.encode` of images in [-1, 1] (it takes [0, 1])", lambda: pipe.encode(torch.rand(1, 1, 28, 28) * 2 - 1))
    api("`pipe.decode` of (1, 4, 8, 8) latents", lambda: pipe.decode(torch.zeros(1, 4, 8, 8)))
    api("`from_pretrained(..., device='gpu')`", lambda: LatentDiffusion.from_pretrained(tmp / "ldm", device="gpu"))
    api("`LatentDiffusion.from_pretrained` of its `config.json`",
        lambda: LatentDiffusion.from_pretrained(tmp / "ldm" / "config.json"))
    api("`VAE.from_pretrained` of an LDM run folder", lambda: VAE.from_pretrained(tmp / "ldm"))
    api("`VAE.from_pretrained` of an LDM run folder's `unet/`", lambda: VAE.from_pretrained(tmp / "ldm" / "unet"))
    api("`LatentDiffusion.from_pretrained(None)`", lambda: LatentDiffusion.from_pretrained(None))
    api("`vae.encode` of (2, 28, 28) images", lambda: vae.encode(torch.zeros(2, 28, 28)))
    api("`vae.encode` of uint8-range floats (0..255)", lambda: vae.encode(torch.full((1, 1, 28, 28), 255.0)))
    api("`vae.decode` of (1, 4, 8, 8) latents", lambda: vae.decode(torch.zeros(1, 4, 8, 8)))
    api("`vae.decode` of latents holding NaN", lambda: vae.decode(torch.full((1, 4, 7, 7), float("nan"))))
    api("`vae.encode` of images holding inf", lambda: vae.encode(torch.full((1, 1, 28, 28), float("inf"))))
    api("UNet for 8x7x7 latents paired with a 4x7x7 VAE",
        lambda: LatentDiffusion(UNet(UNetConfig(in_channels=8, channels=(16, 32), num_heads=2)), vae))

    bad = tmp / "bad"
    shutil.copytree(tmp / "vae", bad / "missing")
    (bad / "missing" / "model.safetensors").unlink()
    api("model folder without `model.safetensors`", lambda: VAE.from_pretrained(bad / "missing"))
    shutil.copytree(tmp / "vae", bad / "truncated")
    w = bad / "truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    api("truncated `model.safetensors`", lambda: VAE.from_pretrained(bad / "truncated"))
    shutil.copytree(tmp / "vae", bad / "garbage")
    (bad / "garbage" / "model.safetensors").write_bytes(b"\x00" * 64)
    api("`model.safetensors` full of zeros", lambda: VAE.from_pretrained(bad / "garbage"))
    for name, edit in (("unknown key", {"colour": "red"}), ("wrong type", {"latent_channels": "four"})):
        d = bad / name.replace(" ", "_")
        shutil.copytree(tmp / "vae", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edit)
        (d / "config.json").write_text(json.dumps(cfg))
        api(f"`config.json` with an {name}" if name[0] == "u" else f"`config.json` with a {name}", lambda d=d: VAE.from_pretrained(d))
    shutil.copytree(tmp / "vae", bad / "shape")
    cfg = json.loads((bad / "shape" / "config.json").read_text())
    cfg["channels"] = [16, 16, 16]
    (bad / "shape" / "config.json").write_text(json.dumps(cfg))
    api("`config.json` that does not match the weights", lambda: VAE.from_pretrained(bad / "shape"))
    shutil.copytree(tmp / "vae", bad / "nan")
    w = load_file(str(bad / "nan" / "model.safetensors"))
    w["enc_in.weight"].view(-1)[0] = float("nan")
    save_file(w, str(bad / "nan" / "model.safetensors"))
    api("`model.safetensors` holding NaN weights (a valid file)", lambda: VAE.from_pretrained(bad / "nan"))
    api("`from_pretrained` of a folder that does not exist", lambda: LatentDiffusion.from_pretrained(tmp / "nope"))

    data = tmp / "data"
    write_idx(data)
    (tmp / "empty").mkdir()
    api("data folder without the IDX files (no download)", lambda: load_mnist(tmp / "empty", download=False))
    for name, corrupt in (("bad magic number", lambda b: b[:3] + b"\x09" + b[4:]), ("truncated", lambda b: b[: len(b) // 2])):
        d = tmp / f"data_{name.split()[0]}"
        shutil.copytree(data, d)
        f = d / "train-images-idx3-ubyte.gz"
        f.write_bytes(gzip.compress(corrupt(gzip.decompress(f.read_bytes()))))
        api(f"IDX image file, {name}", lambda d=d: load_mnist(d))
    d = tmp / "data_gz"
    shutil.copytree(data, d)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    api("IDX label file that is not gzip", lambda: load_mnist(d))
    d = tmp / "data_count"
    shutil.copytree(data, d)
    with gzip.open(d / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, 10], ">i4").tobytes() + bytes(10))
    api("image and label files of different lengths", lambda: load_mnist(d))

    # Another generator's samples for `python -m latentdiff.evaluate samples FILE.npz`.
    npz = tmp / "npz"
    npz.mkdir()
    digits, labels = load_mnist(data, "test")
    im, lb = digits.numpy()[:20], labels.numpy()[:20]  # two of each class
    thin = lb.copy()
    thin[np.flatnonzero(lb == 3)[0]] = 4
    (npz / "notzip.npz").write_text("images,labels\n")
    np.save(npz / "array.npy", im)
    for name, arrays in [("keys", {"imgs": im, "lbls": lb}), ("shape", {"images": im[..., None], "labels": lb}),
                         ("onehot", {"images": im, "labels": np.eye(10)[lb]}), ("count", {"images": im, "labels": lb[:19]}),
                         ("range", {"images": im, "labels": lb + 1}), ("float_labels", {"images": im, "labels": lb + 0.5}),
                         ("pm1", {"x": im / 127.5 - 1, "y": lb}), ("nan", {"images": np.full(im.shape, np.nan), "labels": lb}),
                         ("few", {"images": im[:10], "labels": lb[:10]}), ("thin", {"images": im, "labels": thin})]:
        np.savez(npz / f"{name}.npz", **arrays)
    for what, name in [("a file that does not exist", "nope.npz"), ("a text file", "notzip.npz"),
                       ("a `.npy` array", "array.npy"), ("keys `imgs`/`lbls`", "keys.npz"),
                       ("images (N, 28, 28, 1)", "shape.npz"), ("one-hot labels (N, 10)", "onehot.npz"),
                       ("19 labels for 20 images", "count.npz"), ("label 10", "range.npz"), ("labels like 0.5", "float_labels.npz"),
                       ("float images in [-1, 1]", "pm1.npz"), ("NaN images", "nan.npz"), ("10 samples", "few.npz"),
                       ("a class with 1 sample", "thin.npz")]:
        api(f"`evaluate samples`: {what}", lambda name=name: load_samples(npz / name))
    cli("`python -m latentdiff.evaluate samples` of a mismatched file",
        ["-m", "latentdiff.evaluate", "samples", str(npz / "count.npz"), "--classifier", str(tmp / "clf")])

    tiny = ["--set", "model.channels=[8,16,16]", "--set", "train.steps=2", "--set", "train.batch_size=8",
            "--set", "train.log_every=1", "--set", "train.checkpoint_every=1", "--set", "train.preview_every=0"]
    run = tmp / "run"
    subprocess.run([sys.executable, "train_vae.py", "--data-dir", str(data), "--out", str(run), *tiny], cwd=ROOT,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=True)
    cli("`train_vae.py --out` a folder holding another run", ["train_vae.py", "--data-dir", str(data), "--out", str(run), *tiny])
    cli("`--resume latest` with `--set train.lr=0.1` (differs from the saved run)",
        ["train_vae.py", "--data-dir", str(data), "--out", str(run), "--resume", "latest", *tiny, "--set", "train.lr=0.1"])
    cli("`--resume` a path that is not a checkpoint", ["train_vae.py", "--data-dir", str(data), "--out", str(run), "--resume",
                                                        str(tmp / "nope"), *tiny])
    shutil.copytree(run, tmp / "finished")
    shutil.rmtree(tmp / "finished" / "checkpoints")
    cli("`--resume latest` of a finished run with no checkpoint", ["train_vae.py", "--data-dir", str(data), "--out",
                                                                    str(tmp / "finished"), "--resume", "latest", *tiny])
    with RunLock(tmp / "held"):  # this process holds the folder, as a live training run would
        cli("`train_vae.py --out` a folder a live run holds", ["train_vae.py", "--data-dir", str(data), "--out",
                                                               str(tmp / "held"), *tiny])
    cli("`--log-with nosuch` (not a tracker)", ["train_vae.py", "--data-dir", str(data), "--log-with", "nosuch"])
    cli("`--set train.stpes=5` (typo)", ["train_vae.py", "--data-dir", str(data), "--set", "train.stpes=5"])
    cli("`--set train.steps=many` (wrong type)", ["train_vae.py", "--data-dir", str(data), "--set", "train.steps=many"])
    cli("`--set train.batch_size=7 --set train.grad_accum=2`", ["train_vae.py", "--data-dir", str(data), "--out", str(tmp / "r2"),
                                                                 "--set", "train.batch_size=7", "--set", "train.grad_accum=2"])
    cli("`--set train.batch_size=1000` on 64 examples", ["train_vae.py", "--data-dir", str(data), "--out", str(tmp / "r3"),
                                                         "--set", "train.batch_size=1000"])
    cli("`--data-dir` a folder that does not exist, download off", ["train_vae.py", "--data-dir", str(tmp / "nowhere"),
                                                                      "--set", "data.download=false"])
    cli("`--set train.ema_std=0.1 --set train.ema_decay=0` (averaging off, but a width given)",
        ["train_vae.py", "--data-dir", str(data), "--set", "train.ema_std=0.1", "--set", "train.ema_decay=0"])
    cli("`--set train.ema_std=0.4` (wider than any power-function profile)",
        ["train_vae.py", "--data-dir", str(data), "--set", "train.ema_std=0.4"])
    cli("`--set train.mixed_precision=no` (YAML reads a bare `no` as false)",
        ["train_vae.py", "--data-dir", str(data), "--set", "train.mixed_precision=no"])
    cli("`--set 'train.steps=[1'` (not YAML)", ["train_vae.py", "--data-dir", str(data), "--set", "train.steps=[1"])
    cli("`--set train.warmup_steps=-5`", ["train_vae.py", "--data-dir", str(data), "--set", "train.warmup_steps=-5"])
    (tmp / "afile").write_text("mine")
    cli("`train_vae.py --out` a file", ["train_vae.py", "--data-dir", str(data), "--out", str(tmp / "afile"), *tiny])
    cli("`--config` a file that does not exist", ["train_vae.py", "--config", "nope.yaml"])
    cli("`--config` an unknown preset", ["distill_ldm.py", "--config", "quik"])
    cli("`train_ldm.py --vae` a folder that is not a VAE", ["train_ldm.py", "--data-dir", str(data), "--vae", str(tmp / "empty"),
                                                            "--out", str(tmp / "r4")])
    cli("`train_ldm.py --set model.in_channels=8` with a 4-channel VAE",
        ["train_ldm.py", "--data-dir", str(data), "--vae", str(tmp / "vae"), "--out", str(tmp / "r5"),
         "--set", "model.in_channels=8"])
    cli("`train_ldm.py --vae runs/ldm/vae --out runs/ldm --overwrite` (would delete its own VAE)",
        ["train_ldm.py", "--data-dir", str(data), "--vae", str(tmp / "ldm" / "vae"), "--out", str(tmp / "ldm"), "--overwrite"])
    cli("`sample.py --out grid.xyz` (no image format)", ["sample.py", "--model", str(tmp / "ldm"), "--out", str(tmp / "grid.xyz")])
    cli("`sample.py --out` a folder", ["sample.py", "--model", str(tmp / "ldm"), "--out", str(tmp)])
    cli("`sample.py --device nosuch`", ["sample.py", "--model", str(tmp / "ldm"), "--device", "nosuch"])
    cli("`sample.py --labels 12`", ["sample.py", "--model", str(tmp / "ldm"), "--labels", "12"])
    cli("`sample.py --labels three`", ["sample.py", "--model", str(tmp / "ldm"), "--labels", "three"])
    cli("`sample.py --guidance nan`", ["sample.py", "--model", str(tmp / "ldm"), "--guidance", "nan"])
    cli("`sample.py --steps 0`", ["sample.py", "--model", str(tmp / "ldm"), "--steps", "0"])
    cli("`sample.py --sampler euler`", ["sample.py", "--model", str(tmp / "ldm"), "--sampler", "euler"])
    cli("`sample.py --guidance-interval 800 100`", ["sample.py", "--model", str(tmp / "ldm"), "--guidance-interval", "800", "100"])
    cli("`sample.py --per-label 0`", ["sample.py", "--model", str(tmp / "ldm"), "--per-label", "0"])
    cli("`sample.py --model` a VAE folder", ["sample.py", "--model", str(tmp / "vae")])

    # The other rooms: edit.py, teach.py, distill_ldm.py, the evaluator, the sharded mode and its reader.
    (tmp / "junk.png").write_text("not a png")
    cli("`edit.py interp-seeds --out` a folder (checked before sampling)", ["edit.py", "interp-seeds", "--model", str(tmp / "ldm"),
                                                                            "--out", str(tmp)])
    cli("`edit.py trajectory --out` a name under a file", ["edit.py", "trajectory", "--model", str(tmp / "ldm"), "--out",
                                                            str(tmp / "afile" / "t.png")])
    cli("`edit.py every-class --image` a file that is not an image", ["edit.py", "every-class", "--model", str(tmp / "ldm"),
                                                                       "--image", str(tmp / "junk.png")])
    Image.new("L", (56, 56), 255).save(tmp / "paper.png")
    cli("`edit.py every-class --image` dark ink on white paper", ["edit.py", "every-class", "--model", str(tmp / "ldm"),
                                                                   "--image", str(tmp / "paper.png")])
    cli("`edit.py encode --out` a folder", ["edit.py", "encode", "--vae", str(tmp / "vae"), "--data-dir", str(data), "--out",
                                            str(tmp)])
    np.savez(tmp / "plus.npz", images=np.zeros((3, 28, 28), np.uint8))
    cli("`teach.py --out` a name under a file (checked before teaching)",
        ["teach.py", "--model", str(tmp / "ldm"), "--images", str(tmp / "plus.npz"), "--name", "plus", "--out",
         str(tmp / "afile" / "plus")])
    np.savez(tmp / "paper.npz", images=np.full((3, 28, 28), 255, np.uint8))
    cli("`teach.py --images` drawings in dark ink on white", ["teach.py", "--model", str(tmp / "ldm"), "--images",
                                                              str(tmp / "paper.npz"), "--name", "plus", "--out", str(tmp / "t2")])
    cli("`teach.py --images` a path that does not exist", ["teach.py", "--model", str(tmp / "ldm"), "--images",
                                                           str(tmp / "nope"), "--name", "plus", "--out", str(tmp / "t1")])
    from latentdiff.teach import save_adapter  # noqa: E402

    save_adapter(tmp / "ldm_star", tmp / "ldm", ["star"], pipe.unet.class_embed.weight[:1].detach())
    cli("`distill_ldm.py --teacher` a taught-classes adapter (teach.py's folder)",
        ["distill_ldm.py", "--teacher", str(tmp / "ldm_star"), "--out", str(tmp / "fast"), "--data-dir", str(data)])
    cli("`evaluate ldm --out` a folder (checked before the evaluation)",
        ["-m", "latentdiff.evaluate", "ldm", "--model", str(tmp / "ldm"), "--out", str(tmp)])
    cli("`evaluate ldm --batch-size 0`", ["-m", "latentdiff.evaluate", "ldm", "--model", str(tmp / "ldm"), "--batch-size", "0"])
    cli("`evaluate sweep --plot sweep.xyz` (checked before the sweep)",
        ["-m", "latentdiff.evaluate", "sweep", "--model", str(tmp / "ldm"), "--plot", str(tmp / "sweep.xyz")])
    from latentdiff.evaluate import Classifier, ClassifierConfig, evaluate_ldm, load_or_train_classifier  # noqa: E402

    api("`evaluate_ldm` of a taught model (11 classes, a 10-class judge)",
        lambda: evaluate_ldm(LatentDiffusion.from_pretrained(tmp / "ldm_star"), Classifier(ClassifierConfig()), None, 2))
    api("`--classifier` a VAE folder with `--retrain` (would overwrite its weights)",
        lambda: load_or_train_classifier(tmp / "vae", retrain=True))
    cli("`sample.py --out-dir DIR --num-digits 0`", ["sample.py", "--model", str(tmp / "ldm"), "--out-dir", str(tmp / "sh"),
                                                    "--num-digits", "0"])
    cli("`sample.py --out-dir` a file", ["sample.py", "--model", str(tmp / "ldm"), "--out-dir", str(tmp / "afile"),
                                         "--num-digits", "5"])
    (tmp / "sh_bad").mkdir()
    (tmp / "sh_bad" / "job.json").write_text('{"trunc')
    cli("`sample.py --out-dir` a folder whose job.json is corrupt", ["sample.py", "--model", str(tmp / "ldm"), "--out-dir",
                                                                      str(tmp / "sh_bad"), "--num-digits", "5"])
    from latentdiff.shards import ShardDataset  # noqa: E402

    (tmp / "sh_bad" / "job.json").write_text("{}")
    api("`ShardDataset` of a folder whose job has not finished (no index.json)", lambda: ShardDataset(tmp / "sh_bad"))
    api("`ShardDataset` of a folder that does not exist", lambda: ShardDataset(tmp / "nope"))

    print("| bad input | result | message |")
    print("|---|---|---|")
    for what, kind, msg in ROWS:
        msg = msg.replace(str(tmp), "<tmp>").replace(f"pid {os.getpid()} on host {socket.gethostname()}", "pid P on host H")
        msg = re.sub(r", since [^)]*\)", ", since T)", msg).replace("|", "\\|")  # the lock holder's start time
        print(f"| {what} | {kind} | {msg} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
