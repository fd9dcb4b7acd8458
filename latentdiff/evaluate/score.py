"""Scoring against the MNIST test digits: the reference set, the real-data floor, LDM and VAE evaluation.

Frechet distances and k-NN radii are biased by the sample size N, so every score carries its N and
sits next to a real-data floor computed at the same N (and the same class counts): train digits
scored against test digits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import load_mnist
from ..sampling import unet_rows
from ..timesteps import make_timesteps
from .classifier import Classifier, extract, to_unit
from .metrics import (Reference, balanced_subset, class_accuracy, frechet_distance_features, precision_recall, psnr,
                      sample_metrics)


def reference_set(clf: Classifier, data_root: str | Path | None) -> Reference:
    """Classifier features of the MNIST test split."""
    images, labels = load_mnist(data_root, "test")
    feats, logits = extract(clf, to_unit(images))
    return Reference(feats, labels, logits)


def real_floor(clf: Classifier, data_root: str | Path | None, ref: Reference, n_per_class: int | Sequence[int] = 1000,
               seed: int = 0, k: int = 3) -> dict:
    """The metrics for real digits: ``n_per_class`` train digits per class (or one count per class) vs the test reference.

    This is what a perfect generator would score at the same N. Accuracy is the exception: the classifier
    has seen the train digits, so the accuracy floor is its accuracy on the (unseen) test digits.
    """
    images, labels = load_mnist(data_root, "train")
    idx = balanced_subset(labels, n_per_class, seed, clf.config.num_classes)
    feats, logits = extract(clf, to_unit(images[idx]))
    out = sample_metrics(feats, logits, labels[idx], ref, k, clf.config.num_classes)
    out.update(class_accuracy(ref.logits.argmax(1), ref.labels, clf.config.num_classes))
    out["accuracy_on"] = "test split (the classifier trained on train)"
    return out


def score_images(clf: Classifier, ref: Reference, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> dict:
    """Metrics of any labelled image set: float images (N, 1, 28, 28) in [0, 1], labels (N,)."""
    t0 = time.perf_counter()
    feats, logits = extract(clf, images, batch_size)
    metrics = sample_metrics(feats, logits, labels, ref, num_classes=clf.config.num_classes)
    return {"metrics": metrics, "metrics_s": time.perf_counter() - t0}


def generate_balanced(pipe, n_per_class: int, guidance: float | None = None, sampler: str | None = None,
                      steps: int | None = None, seed: int = 0, batch_size: int = 500, progress: bool = True, *,
                      guidance_interval: Sequence[int] | None = None, spacing: str | None = None,
                      **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` digits of every class -> (images (N, 1, 28, 28) in [0, 1] on the CPU, labels (N,)).

    Sample i uses seed + i whatever the batching, so runs at different guidance scales share their noise.
    guidance_interval / spacing / any other ``generate_kwargs``: as in ``LatentDiffusion.generate``.
    """
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    out = []
    desc = f"generate g={guidance} {sampler}:{steps}" + ("" if guidance_interval is None else f" t{list(guidance_interval)}")
    with tqdm(total=len(labels), desc=desc, disable=not progress, unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size]
            out.append(pipe.generate(y, guidance_scale=guidance, steps=steps, sampler=sampler, seed=seed + start,
                                     batch_size=batch_size, guidance_interval=guidance_interval, spacing=spacing,
                                     **generate_kwargs).cpu())
            bar.update(len(y))
    return torch.cat(out), labels


def run_settings(pipe, guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_interval: Sequence[int] | None = None, spacing: str | None = None,
                 eta: float | None = None, autoguidance_scale: float | None = None) -> dict:
    """The sampling settings a run uses, the model's defaults filled in (and checked) by ``pipe.settings``.

    The interval is always explicit: the model's "every step" (None) is recorded as [0, T-1].
    """
    s = pipe.settings(guidance_scale=guidance, steps=steps, sampler=sampler, eta=eta, guidance_interval=guidance_interval,
                      spacing=spacing, autoguidance_scale=autoguidance_scale)
    interval = s.guidance_interval or (0, pipe.config.diffusion.num_timesteps - 1)
    return {"guidance_scale": s.guidance_scale, "sampler": s.sampler, "steps": s.steps,
            "guidance_interval": list(interval), "spacing": s.spacing, "eta": s.eta,
            "autoguidance_scale": s.autoguidance_scale}


def rows_per_digit(pipe, settings: dict) -> int:
    """UNet batch rows per digit at resolved ``settings``: 2 at a guided step of a teacher (``sampling.unet_rows``),
    1 per step for a distilled student, which takes the guidance scale as an input."""
    timesteps = make_timesteps(pipe.alphas_cumprod, settings["steps"], settings["spacing"])
    if pipe.unet.config.guidance_input:
        return len(timesteps)
    return unet_rows(timesteps, settings["guidance_scale"], settings["guidance_interval"], settings["autoguidance_scale"])


def evaluate_ldm(pipe, clf: Classifier, ref: Reference, n_per_class: int = 1000, guidance: float | None = None,
                 sampler: str | None = None, steps: int | None = None, seed: int = 0, batch_size: int = 500,
                 progress: bool = True, *, guidance_interval: Sequence[int] | None = None,
                 spacing: str | None = None, **generate_kwargs) -> dict:
    """Generate a class-balanced set and score it; returns settings (defaults resolved), metrics and timings.

    ``generate_kwargs`` (``eta`` and any other ``LatentDiffusion.generate`` keyword) go to generate as given;
    the record holds them at the top level and, with the resolved settings, in ``setting``: the keyword
    arguments that reproduce the run with ``pipe.generate``. ``unet_rows`` is the cost: UNet batch rows
    per digit (a guided step runs two; a distilled student, which takes w as an input, one per step).
    """
    if pipe.num_classes != clf.config.num_classes:  # a taught model (teach.py): the judge has no class for the new ones
        extra_names = list(getattr(pipe, "class_names", []))[clf.config.num_classes:]
        raise ValueError(f"the model has {pipe.num_classes} classes (taught: {extra_names}) and the judge reads "
                         f"{clf.config.num_classes}; its scores would count every taught digit as wrong: evaluate the "
                         "base model (the taught folder's base), and the taught class with docs/teaching.md's protocol")
    extra = dict(generate_kwargs)
    settings = run_settings(pipe, guidance, sampler, steps, guidance_interval, spacing, extra.pop("eta", None),
                            extra.pop("autoguidance_scale", None))
    rows = rows_per_digit(pipe, settings)
    record = {**settings, **extra, "setting": {**settings, **extra}, "unet_rows": rows, "seed": seed,
              "n_per_class": n_per_class}
    t0 = time.perf_counter()
    images, labels = generate_balanced(pipe, n_per_class, settings["guidance_scale"], settings["sampler"],
                                       settings["steps"], seed, batch_size, progress,
                                       guidance_interval=settings["guidance_interval"], spacing=settings["spacing"],
                                       eta=settings["eta"], autoguidance_scale=settings["autoguidance_scale"], **extra)
    generate_s = time.perf_counter() - t0
    return {**record, **score_images(clf, ref, images, labels), "generate_s": generate_s, "images": images}


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) in [0, 1] -> (reconstructions in [0, 1], scaled latents), from posterior means."""
    device = next(vae.parameters()).device
    recon, latents = [], []
    for i in range(0, len(x), batch_size):
        posterior = vae.encode(x[i:i + batch_size].to(device) * 2 - 1)
        latents.append(vae.scale_latents(posterior.mean).cpu())
        recon.append(((vae.decode(posterior.mean) + 1) / 2).cpu())  # [-1, 1] -> [0, 1]
    return torch.cat(recon), torch.cat(latents)


@torch.no_grad()
def evaluate_vae(vae, clf: Classifier, ref: Reference, data_root: str | Path | None, batch_size: int = 500,
                 n_per_class: int = 1000, seed: int = 0) -> dict:
    """Reconstruction metrics on the test split (posterior means, no sampling) and scaled-latent statistics.

    Also the distribution distance a diffusion model on these latents cannot beat: the FLD of the
    reconstructions of ``n_per_class`` train digits per class against the test reference, next to the FLD of
    those real train digits (the floor at the same N).
    """
    images, labels = load_mnist(data_root, "test")
    x = to_unit(images)
    recon, z = reconstruct(vae, x, batch_size)  # (N, 1, 28, 28), (N, C, h, w)
    mse_per_image = (recon.double() - x.double()).square().mean((1, 2, 3))
    feats, logits = extract(clf, recon)
    acc = class_accuracy(logits.argmax(1), labels, clf.config.num_classes)
    precision, recall = precision_recall(ref.features, feats)
    zc = z.transpose(0, 1).flatten(1).double()  # (C, N*h*w)
    train_u8, train_labels = load_mnist(data_root, "train")
    real = to_unit(train_u8[balanced_subset(train_labels, n_per_class, seed, clf.config.num_classes)])
    train_fld = frechet_distance_features(extract(clf, reconstruct(vae, real, batch_size)[0])[0], ref.features)
    real_fld = frechet_distance_features(extract(clf, real)[0], ref.features)
    return {"mse": mse_per_image.mean().item(), "psnr": psnr(mse_per_image.mean()),
            "psnr_mean_per_image": sum(psnr(m) for m in mse_per_image.tolist()) / len(mse_per_image),
            "accuracy": acc["accuracy"], "worst_class_accuracy": acc["worst_class_accuracy"],
            "worst_class": acc["worst_class"], "accuracy_originals": class_accuracy(ref.logits.argmax(1), ref.labels)["accuracy"],
            "fld": frechet_distance_features(feats, ref.features), "precision": precision, "recall": recall,
            "n": len(x), "latent_mean": zc.mean(1).tolist(), "latent_std": zc.std(1).tolist(),
            "latent_mean_all": zc.mean().item(), "latent_std_all": zc.std().item(),
            "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
            "train_recon_fld": train_fld, "train_real_fld": real_fld, "train_n": len(real),
            "train_recon_fld_ratio": train_fld / real_fld}
