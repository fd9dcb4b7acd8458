"""Evaluation: an MNIST classifier as the feature extractor, and metrics for the LDM and the VAE.

    python -m latentdiff.evaluate classifier --data-dir DIR            # train/check it, print real-data floors
    python -m latentdiff.evaluate ldm --model runs/ldm --data-dir DIR   # accuracy, FLD, precision/recall
    python -m latentdiff.evaluate vae --model runs/vae --data-dir DIR   # MSE, PSNR, recon accuracy, latent stats
    python -m latentdiff.evaluate sweep --model runs/ldm --guidance 1 2 3 --samplers dpm++:10 ddim:20 --plot sweep.png

FLD ("Frechet LeNet distance") is FID with Inception swapped for this classifier's penultimate layer.
Frechet distances and k-NN radii are biased by the sample size N, so every number carries its N and
sits next to a real-data floor computed at the same N: train digits scored against test digits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .data import batch_indices, load_mnist
from .errors import ModelLoadError
from .serialization import CONFIG_NAME, atomic_write_bytes, load_model, save_model

CLASSIFIER_ENV = "LATENTDIFF_CLASSIFIER"
DEFAULT_CLASSIFIER = Path("~/.cache/latentdiff/classifier")
TRAIN_INFO = "train_info.json"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set, on [0, 1]


# ============================================================================ classifier
@dataclass(frozen=True)
class ClassifierConfig:
    """A small VGG-style CNN: per stage, a few conv3x3-BN-ReLU, with a 2x2 max-pool after the stage's last conv."""

    channels: tuple[int, ...] = (32, 64, 128)  # width per stage; 28 -> 14 -> 7 -> 3
    convs_per_stage: tuple[int, ...] = (1, 2, 2)  # one conv at 28x28 keeps training cheap on a CPU
    feature_dim: int = 128  # penultimate width: the FLD / precision-recall feature space
    dropout: float = 0.3  # before the last linear layer
    num_classes: int = 10

    def validate(self) -> None:
        if not self.channels or min(self.channels + self.convs_per_stage) < 1 or self.feature_dim < 1:
            raise ValueError("classifier channels, convs_per_stage and feature_dim must be >= 1")
        if len(self.convs_per_stage) != len(self.channels):
            raise ValueError("classifier convs_per_stage needs one entry per channels entry")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("classifier dropout must be in [0, 1)")


class Classifier(nn.Module):
    """``clf(images)`` -> logits; ``clf.features(images)`` -> (penultimate features, logits).

    Images are float (N, 1, 28, 28) in [0, 1]; the MNIST normalisation happens inside.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        config.validate()
        self.config = config
        layers, prev, size = [], 1, 28
        for c, n_convs in zip(config.channels, config.convs_per_stage):
            for j in range(n_convs):
                layers.append(nn.Conv2d(prev, c, 3, padding=1, bias=False))
                if j == n_convs - 1:  # pool before BN/ReLU: 4x less BN/ReLU work (same as after, for BN scale > 0)
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                prev = c
        self.conv = nn.Sequential(*layers)
        # (N, C, s, s) -> (N, C*s*s) -> (N, feature_dim): keeps where strokes are, which matters for digits.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(prev * size * size, config.feature_dim, bias=False),
                                   nn.BatchNorm1d(config.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes))
        self.to(memory_format=torch.channels_last)  # NHWC convolutions: ~1.5x faster on a CPU (oneDNN)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, 28, 28) in [0, 1] -> (features (N, feature_dim), logits (N, num_classes))."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or not images.is_floating_point():
            raise ValueError(f"classifier expects float images (N, 1, 28, 28) in [0, 1]; got {images.dtype} {tuple(images.shape)}")
        x = ((images - MNIST_MEAN) / MNIST_STD).contiguous(memory_format=torch.channels_last)
        h = self.embed(self.conv(x))
        return h, self.head(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)[1]


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                  shift_px: float = 2.0) -> torch.Tensor:
    """Per-image random rotation (+-degrees), zoom (1 +- scale) and shift (+-shift_px pixels) of (N, 1, H, W)."""
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator).mul(2).sub(1).to(x.device)  # (N, 4) uniform in [-1, 1]
    angle, zoom = u[:, 0] * math.radians(degrees), 1 + u[:, 1] * scale
    tx, ty = u[:, 2] * shift_px * 2 / w, u[:, 3] * shift_px * 2 / h  # affine_grid coordinates span [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)  # zero padding = MNIST's black background


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return images_u8.float().div(255).unsqueeze(1)


@torch.no_grad()
def extract(clf: Classifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``clf.features`` in eval mode -> (features, logits) float on the CPU."""
    device = next(clf.parameters()).device
    clf.eval()
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = clf.features(images[i:i + batch_size].to(device).float())
        feats.append(f.cpu())
        logits.append(lg.cpu())
    return torch.cat(feats), torch.cat(logits)


def train_classifier(data_root: str | Path | None, out: str | Path | None = None, device: str | torch.device = "cpu",
                     epochs: float = 4, batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 5e-4,
                     seed: int = 0, max_steps: int | None = None, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True) -> tuple[Classifier, dict]:
    """Train on the MNIST train split only (random affine augmentation, AdamW + OneCycle); save to ``out``.

    Returns (classifier in eval mode, info) where info holds the test accuracy and the wall time.
    """
    t0 = time.perf_counter()
    images_u8, labels = load_mnist(data_root, "train")
    x, labels = to_unit(images_u8).to(device), labels.to(device)
    steps = max_steps if max_steps is not None else int(epochs * (len(x) // batch_size))
    torch.manual_seed(seed)  # weight init and dropout; augmentation uses explicit generators
    clf = Classifier(config).to(device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    bar = tqdm(range(steps), desc="classifier", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = batch_indices(len(x), batch_size, step, seed).to(device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = F.cross_entropy(clf(random_affine(x[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    clf.eval()
    test_u8, test_labels = load_mnist(data_root, "test")
    _, logits = extract(clf, to_unit(test_u8))
    acc = class_accuracy(logits.argmax(1), test_labels, config.num_classes)
    info = {"test_accuracy": acc["accuracy"], "test_worst_class_accuracy": acc["worst_class_accuracy"],
            "train_wall_s": time.perf_counter() - t0, "steps": steps, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "seed": seed, "device": str(device), "n_test": len(test_labels)}
    if out is not None:
        save_model(clf, config, out)
        atomic_write_bytes(Path(out) / TRAIN_INFO, (json.dumps(info, indent=2) + "\n").encode())
    return clf, info


def default_classifier_path() -> Path:
    """$LATENTDIFF_CLASSIFIER, else ~/.cache/latentdiff/classifier."""
    return Path(os.environ.get(CLASSIFIER_ENV) or DEFAULT_CLASSIFIER).expanduser()


def load_or_train_classifier(path: str | Path | None = None, data_root: str | Path | None = None,
                             device: str | torch.device = "cpu", retrain: bool = False) -> Classifier:
    """Load the classifier folder at ``path`` (default: see default_classifier_path); train it there if missing."""
    path = Path(path).expanduser() if path is not None else default_classifier_path()
    if retrain or not (path / CONFIG_NAME).is_file():
        print(f"training the evaluation classifier into {path} (a few minutes on a CPU, once)", file=sys.stderr)
        _, info = train_classifier(data_root, path, device)
        print(f"classifier test accuracy {info['test_accuracy']:.4%} in {info['train_wall_s']:.0f} s", file=sys.stderr)
    try:
        return load_model(Classifier, ClassifierConfig, path, device)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}\n(an evaluation classifier from an older version? retrain it with --retrain)") from e


def classifier_info(path: str | Path | None = None) -> dict:
    """The train_info.json written beside a trained classifier ({} if absent)."""
    path = Path(path).expanduser() if path is not None else default_classifier_path()
    f = path / TRAIN_INFO
    return json.loads(f.read_text()) if f.is_file() else {}


# ============================================================================ metrics
def class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> dict:
    """Overall accuracy, per-class accuracy (NaN for absent classes), and the worst class."""
    pred, labels = pred.cpu().long(), labels.cpu().long()
    correct = (pred == labels).double()
    per_class = []
    for c in range(num_classes):
        m = labels == c
        per_class.append(correct[m].mean().item() if m.any() else float("nan"))
    present = [(a, c) for c, a in enumerate(per_class) if not math.isnan(a)]
    worst_acc, worst = min(present) if present else (float("nan"), -1)
    return {"accuracy": correct.mean().item() if len(correct) else float("nan"), "per_class_accuracy": per_class,
            "worst_class_accuracy": worst_acc, "worst_class": worst}


def psnr(mse: float | torch.Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(max^2 / MSE)."""
    mse = float(mse)
    return float("inf") if mse == 0 else 10.0 * math.log10(max_value**2 / mse)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Dowson & Landau 1982; FID, Heusel et al. 2017).

    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2: the second matrix is symmetric PSD, so eigh suffices
    (no scipy, no complex round-off).
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrtm_psd(s1)
    mid = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).clamp(min=0).item()


def frechet_distance_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(features)}")
    f = features.float()
    out = [torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), chunk)]  # +1: self at 0
    return torch.cat(out)


def manifold_coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Fraction of ``query`` points inside some ball B(support_j, radii_j)."""
    q, s = query.float(), support.float()
    inside = [(torch.cdist(q[i:i + chunk], s) <= radii[None]).any(1) for i in range(0, len(q), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls approximate each manifold.

    precision: fraction of fake points inside the real manifold; recall: real points inside the fake one.
    """
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


@dataclass
class Reference:
    """Features and labels of the reference set (the 10,000 MNIST test digits)."""

    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    logits: torch.Tensor  # (N, num_classes)


def reference_set(clf: Classifier, data_root: str | Path | None) -> Reference:
    """Classifier features of the MNIST test split."""
    images, labels = load_mnist(data_root, "test")
    feats, logits = extract(clf, to_unit(images))
    return Reference(feats, labels, logits)


def sample_metrics(feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ref: Reference,
                   k: int = 3, num_classes: int = 10) -> dict:
    """All metrics of a labelled sample set vs the reference, from classifier outputs."""
    labels = labels.cpu().long()
    acc = class_accuracy(logits.argmax(1), labels, num_classes)
    per_class = []
    for c in range(num_classes):
        m, mr = labels == c, ref.labels == c
        per_class.append(frechet_distance_features(feats[m], ref.features[mr]) if m.sum() > 1 else float("nan"))
    valid = [v for v in per_class if not math.isnan(v)]
    precision, recall = precision_recall(ref.features, feats, k)
    return {**acc, "fld": frechet_distance_features(feats, ref.features),
            "fld_per_class_mean": sum(valid) / len(valid) if valid else float("nan"), "fld_per_class": per_class,
            "precision": precision, "recall": recall, "n": len(labels), "n_ref": len(ref.labels), "k": k}


def balanced_subset(labels: torch.Tensor, n_per_class: int, seed: int = 0, num_classes: int = 10) -> torch.Tensor:
    """Indices of ``n_per_class`` random examples of each class (fewer if a class has fewer)."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(num_classes):
        where = (labels == c).nonzero().squeeze(1)
        idx.append(where[torch.randperm(len(where), generator=g)[:n_per_class]])
    return torch.cat(idx)


def real_floor(clf: Classifier, data_root: str | Path | None, ref: Reference, n_per_class: int = 1000,
               seed: int = 0, k: int = 3) -> dict:
    """The metrics for real digits: ``n_per_class`` train digits per class vs the test reference.

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


# ============================================================================ LDM / VAE evaluation
def generate_balanced(pipe, n_per_class: int, guidance: float | None = None, sampler: str | None = None,
                      steps: int | None = None, seed: int = 0, batch_size: int = 500,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` digits of every class -> (images (N, 1, 28, 28) in [0, 1] on the CPU, labels (N,)).

    Sample i uses seed + i whatever the batching, so runs at different guidance scales share their noise.
    """
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    out = []
    with tqdm(total=len(labels), desc=f"generate g={guidance} {sampler}:{steps}", disable=not progress,
              unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size]
            out.append(pipe.generate(y, guidance_scale=guidance, steps=steps, sampler=sampler, seed=seed + start,
                                     batch_size=batch_size).cpu())
            bar.update(len(y))
    return torch.cat(out), labels


def evaluate_ldm(pipe, clf: Classifier, ref: Reference, n_per_class: int = 1000, guidance: float | None = None,
                 sampler: str | None = None, steps: int | None = None, seed: int = 0, batch_size: int = 500,
                 progress: bool = True) -> dict:
    """Generate a class-balanced set and score it; returns settings, metrics and timings."""
    sc = pipe.config.sample
    settings = {"guidance_scale": sc.guidance_scale if guidance is None else float(guidance),
                "sampler": sampler or sc.sampler, "steps": sc.steps if steps is None else steps,
                "seed": seed, "n_per_class": n_per_class}
    t0 = time.perf_counter()
    images, labels = generate_balanced(pipe, n_per_class, settings["guidance_scale"], settings["sampler"],
                                       settings["steps"], seed, batch_size, progress)
    t1 = time.perf_counter()
    feats, logits = extract(clf, images)
    metrics = sample_metrics(feats, logits, labels, ref, num_classes=clf.config.num_classes)
    t2 = time.perf_counter()
    return {**settings, "metrics": metrics, "generate_s": t1 - t0, "metrics_s": t2 - t1, "images": images}


@torch.no_grad()
def evaluate_vae(vae, clf: Classifier, ref: Reference, data_root: str | Path | None, batch_size: int = 500) -> dict:
    """Reconstruction metrics on the test split (posterior means, no sampling) and scaled-latent statistics."""
    device = next(vae.parameters()).device
    images, labels = load_mnist(data_root, "test")
    x = to_unit(images)
    recon, latents = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        posterior = vae.encode(xb * 2 - 1)
        latents.append(vae.scale_latents(posterior.mean).cpu())
        recon.append(((vae.decode(posterior.mean) + 1) / 2).cpu())  # [-1, 1] -> [0, 1]
    recon, z = torch.cat(recon), torch.cat(latents)  # (N, 1, 28, 28), (N, C, h, w)
    mse_per_image = (recon.double() - x.double()).square().mean((1, 2, 3))
    feats, logits = extract(clf, recon)
    acc = class_accuracy(logits.argmax(1), labels, clf.config.num_classes)
    precision, recall = precision_recall(ref.features, feats)
    zc = z.transpose(0, 1).flatten(1).double()  # (C, N*h*w)
    return {"mse": mse_per_image.mean().item(), "psnr": psnr(mse_per_image.mean()),
            "psnr_mean_per_image": sum(psnr(m) for m in mse_per_image.tolist()) / len(mse_per_image),
            "accuracy": acc["accuracy"], "worst_class_accuracy": acc["worst_class_accuracy"],
            "worst_class": acc["worst_class"], "accuracy_originals": class_accuracy(ref.logits.argmax(1), ref.labels)["accuracy"],
            "fld": frechet_distance_features(feats, ref.features), "precision": precision, "recall": recall,
            "n": len(x), "latent_mean": zc.mean(1).tolist(), "latent_std": zc.std(1).tolist(),
            "latent_mean_all": zc.mean().item(), "latent_std_all": zc.std().item(),
            "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}


def parse_sampler(spec: str) -> tuple[str, int]:
    """'dpm++:20' -> ('dpm++', 20)."""
    from .sampling import SAMPLERS

    name, _, steps = spec.rpartition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler spec {spec!r} must look like NAME:STEPS with NAME in {sorted(SAMPLERS)}, e.g. dpm++:20")
    return name, int(steps)


def choose_default(sweep: dict, min_accuracy: float = 0.98, fld_tolerance: float = 0.05, max_steps: int = 50) -> dict:
    """Pick default sampling settings from a sweep's results.

    Guidance: lowest FLD among scales whose accuracy >= min_accuracy (accuracy alone would pick the
    largest scale, which trades diversity for legibility); if none qualifies, the most accurate one.
    Sampler: among qualifying runs with at most ``max_steps`` steps (ddpm:1000 is a reference, too slow
    for a default), the fewest steps whose FLD is within ``fld_tolerance`` (relative) of their best.
    """
    def pick_guidance(runs: list[dict]) -> tuple[dict | None, str]:
        ok = [r for r in runs if r["metrics"]["accuracy"] >= min_accuracy]
        if ok:
            return min(ok, key=lambda r: r["metrics"]["fld"]), f"lowest FLD with accuracy >= {min_accuracy:.1%}"
        if runs:
            return max(runs, key=lambda r: r["metrics"]["accuracy"]), f"no scale reached {min_accuracy:.1%}: most accurate"
        return None, "no guidance runs"

    out: dict = {"min_accuracy": min_accuracy}
    best_g, out["guidance_reason"] = pick_guidance(sweep.get("guidance", []))
    if best_g is not None:
        out["guidance_scale"] = best_g["guidance_scale"]
    runs = [r for r in sweep.get("sampler", []) if r["steps"] <= max_steps]
    runs = [r for r in runs if r["metrics"]["accuracy"] >= min_accuracy] or runs
    if runs:
        best = min(r["metrics"]["fld"] for r in runs)
        near = [r for r in runs if r["metrics"]["fld"] <= best * (1 + fld_tolerance)]
        pick = min(near, key=lambda r: (r["steps"], r["metrics"]["fld"]))
        out.update(sampler=pick["sampler"], steps=pick["steps"],
                   sampler_reason=f"fewest steps (<= {max_steps}) with FLD within {fld_tolerance:.0%} of their best ({best:.3g})")
    return out


def run_sweep(pipe, clf: Classifier, ref: Reference, guidances: Sequence[float], samplers: Sequence[tuple[str, int]],
              n_per_class: int, seed: int = 0, batch_size: int = 500, sampler_guidance: float | None = None,
              progress: bool = True) -> dict:
    """Guidance sweep at the model's default sampler, then sampler x steps sweep at one guidance scale."""
    sc = pipe.config.sample
    g0 = sc.guidance_scale if sampler_guidance is None else sampler_guidance
    out: dict = {"default_sampler": f"{sc.sampler}:{sc.steps}", "sampler_guidance": g0, "guidance": [], "sampler": []}
    for g in guidances:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, g, sc.sampler, sc.steps, seed, batch_size, progress)
        r.pop("images")
        out["guidance"].append(r)
        print(summary_line(r), file=sys.stderr)
    for name, steps in samplers:
        r = evaluate_ldm(pipe, clf, ref, n_per_class, g0, name, steps, seed, batch_size, progress)
        r.pop("images")
        out["sampler"].append(r)
        print(summary_line(r), file=sys.stderr)
    return out


# ============================================================================ reporting
def summary_line(r: dict) -> str:
    m = r["metrics"]
    return (f"g={r['guidance_scale']:g} {r['sampler']}:{r['steps']}  acc {m['accuracy']:.2%} (worst {m['worst_class_accuracy']:.2%})"
            f"  FLD {m['fld']:.3f} (N={m['n']})  class-FLD {m['fld_per_class_mean']:.3f}  P {m['precision']:.3f}"
            f"  R {m['recall']:.3f}  [{r['generate_s']:.0f} s]")


def format_table(rows: list[tuple[str, str, str]], header: tuple[str, str, str] = ("metric", "model", "real floor")) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{v:.2%}"


def metric_rows(m: dict, floor: dict | None) -> list[tuple[str, str, str]]:
    f = floor or {}
    spec = [("accuracy", "accuracy", _pct), ("worst-class accuracy", "worst_class_accuracy", _pct),
            (f"FLD (N={m['n']} vs {m['n_ref']} test)", "fld", "{:.3f}".format),
            ("mean per-class FLD", "fld_per_class_mean", "{:.3f}".format),
            (f"precision (k={m['k']})", "precision", "{:.3f}".format), (f"recall (k={m['k']})", "recall", "{:.3f}".format)]
    rows = [(name, fmt(m[key]), fmt(f[key]) if key in f else "") for name, key, fmt in spec]
    rows[1] = (rows[1][0], f"{rows[1][1]} (class {m['worst_class']})", rows[1][2] + (f" (class {f['worst_class']})" if f else ""))
    return rows


def sweep_plot(sweep: dict, floor: dict, path: str | Path) -> None:
    """2x2 PNG: guidance sweep (FLDs; accuracy/precision/recall) and sampler sweep (FLD; accuracy) vs log2 steps."""
    from .plot import line_plot

    g = sweep["guidance"]
    gx = [r["guidance_scale"] for r in g]
    by_sampler: dict[str, list[dict]] = {}
    for r in sweep["sampler"]:
        by_sampler.setdefault(r["sampler"], []).append(r)

    def series(runs: list[dict], key: str, x=lambda r: math.log2(r["steps"])):
        runs = sorted(runs, key=x)
        return [x(r) for r in runs], [r["metrics"][key] for r in runs]

    sx = [math.log2(r["steps"]) for r in sweep["sampler"]]

    def flat(xs: list[float], v: float):
        return [min(xs), max(xs)] if xs else [0, 1], [v, v]

    panels = [
        ({"FLD": (gx, [r["metrics"]["fld"] for r in g]), "per-class FLD": (gx, [r["metrics"]["fld_per_class_mean"] for r in g]),
          "FLD floor": flat(gx, floor["fld"]), "per-class floor": flat(gx, floor["fld_per_class_mean"])},
         f"guidance sweep ({sweep['default_sampler']}): FLD (log)", "guidance scale", True),
        ({"accuracy": (gx, [r["metrics"]["accuracy"] for r in g]), "worst class": (gx, [r["metrics"]["worst_class_accuracy"] for r in g]),
          "precision": (gx, [r["metrics"]["precision"] for r in g]), "recall": (gx, [r["metrics"]["recall"] for r in g])},
         "guidance sweep: accuracy, precision, recall", "guidance scale", False),
        ({**{name: series(runs, "fld") for name, runs in by_sampler.items()}, "FLD floor": flat(sx, floor["fld"])},
         f"sampler sweep (g={sweep['sampler_guidance']:g}): FLD (log)", "log2(steps)", True),
        ({**{name: series(runs, "accuracy") for name, runs in by_sampler.items()},
          "accuracy floor (test)": flat(sx, floor["accuracy"])}, "sampler sweep: accuracy", "log2(steps)", False),
    ]
    size = (640, 400)
    canvas = Image.new("RGB", (2 * size[0], 2 * size[1]), "white")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ser, title, xlabel, logy) in enumerate(panels):
            p = Path(tmp) / f"{i}.png"
            line_plot(ser, p, title=title, xlabel=xlabel, logy=logy, size=size)
            with Image.open(p) as im:
                canvas.paste(im.copy(), ((i % 2) * size[0], (i // 2) * size[1]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ============================================================================ command line
def _setup(args) -> tuple[Classifier, Reference, dict]:
    clf = load_or_train_classifier(args.classifier, args.data_dir, args.device, getattr(args, "retrain", False))
    ref = reference_set(clf, args.data_dir)
    info = {"path": str(Path(args.classifier).expanduser() if args.classifier else default_classifier_path()),
            **classifier_info(args.classifier)}
    return clf, ref, info


def cmd_classifier(args) -> dict:
    clf, ref, info = _setup(args)
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    print(f"classifier {info['path']}: test accuracy {_pct(info.get('test_accuracy', float('nan')))}, "
          f"trained in {info.get('train_wall_s', float('nan')):.0f} s")
    print(format_table([(n, v, "") for n, v, _ in metric_rows(floor, None)], ("real-data floor", "train vs test", "")))
    return {"classifier": info, "floor": floor}


def cmd_ldm(args) -> dict:
    from .pipeline import LatentDiffusion

    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)  # fail fast, before the classifier
    clf, ref, info = _setup(args)
    r = evaluate_ldm(pipe, clf, ref, args.n_per_class, args.guidance, args.sampler, args.steps, args.seed, args.batch_size)
    images = r.pop("images")
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    print(f"{args.model}: guidance {r['guidance_scale']:g}, {r['sampler']}:{r['steps']}, {len(images)} samples "
          f"in {r['generate_s']:.1f} s (+ {r['metrics_s']:.1f} s metrics)")
    print(format_table(metric_rows(r["metrics"], floor)))
    if args.samples:
        from .pipeline import make_grid

        make_grid(images.view(pipe.num_classes, args.n_per_class, 1, 28, 28)[:, :10].flatten(0, 1), nrow=min(10, args.n_per_class)).save(args.samples)
    return {"model": str(args.model), **r, "floor": floor, "classifier": info}


def cmd_vae(args) -> dict:
    from .vae import VAE

    model = Path(args.model)
    vae = VAE.from_pretrained(model / "vae" if (model / "vae" / CONFIG_NAME).is_file() else model, args.device)
    clf, ref, info = _setup(args)
    r = evaluate_vae(vae, clf, ref, args.data_dir, args.batch_size)
    rows = [("MSE ([0,1] pixels)", f"{r['mse']:.5f}"), ("PSNR (dB, of the mean MSE)", f"{r['psnr']:.2f}"),
            ("PSNR (dB, mean per image)", f"{r['psnr_mean_per_image']:.2f}"),
            ("recon accuracy", f"{_pct(r['accuracy'])} (originals {_pct(r['accuracy_originals'])})"),
            ("recon worst-class accuracy", f"{_pct(r['worst_class_accuracy'])} (class {r['worst_class']})"),
            (f"FLD recon vs test (N={r['n']})", f"{r['fld']:.3f}"), ("precision / recall", f"{r['precision']:.3f} / {r['recall']:.3f}"),
            ("scaled latent mean per channel", " ".join(f"{v:+.3f}" for v in r["latent_mean"])),
            ("scaled latent std per channel", " ".join(f"{v:.3f}" for v in r["latent_std"]))]
    print(f"{args.model} on the {r['n']} test digits")
    print(format_table([(a, b, "") for a, b in rows], ("metric", "value", "")))
    return {"model": str(args.model), **r, "classifier": info}


def cmd_sweep(args) -> dict:
    from .pipeline import LatentDiffusion

    samplers = [parse_sampler(s) for s in args.samplers]  # fail fast on a typo, before any work
    pipe = LatentDiffusion.from_pretrained(args.model, device=args.device)
    clf, ref, info = _setup(args)
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    sweep = run_sweep(pipe, clf, ref, args.guidance, samplers, args.n_per_class, args.seed, args.batch_size,
                      args.sampler_guidance)
    sweep["choice"] = choose_default(sweep, args.min_accuracy)
    rows = [(f"g={r['guidance_scale']:g} {r['sampler']}:{r['steps']}", r["metrics"]) for r in sweep["guidance"] + sweep["sampler"]]
    header = ("setting", "acc", "worst", "FLD", "class-FLD", "precision", "recall", "gen s")
    table = [(name, _pct(m["accuracy"]), _pct(m["worst_class_accuracy"]), f"{m['fld']:.3f}", f"{m['fld_per_class_mean']:.3f}",
              f"{m['precision']:.3f}", f"{m['recall']:.3f}", "") for name, m in rows]
    table = [t[:-1] + (f"{r['generate_s']:.0f}",) for t, r in zip(table, sweep["guidance"] + sweep["sampler"])]
    table.append(("real floor", _pct(floor["accuracy"]), _pct(floor["worst_class_accuracy"]), f"{floor['fld']:.3f}",
                  f"{floor['fld_per_class_mean']:.3f}", f"{floor['precision']:.3f}", f"{floor['recall']:.3f}", ""))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"{args.model}: N = {args.n_per_class * pipe.num_classes} samples per setting, seed {args.seed}")
    for r in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"choice: {sweep['choice']}")
    if args.plot:
        sweep_plot(sweep, floor, args.plot)
        print(f"wrote {args.plot}")
    return {"model": str(args.model), "n_per_class": args.n_per_class, "seed": args.seed, **sweep, "floor": floor,
            "classifier": info}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m latentdiff.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, n_default: int = 1000) -> None:
        sp.add_argument("--data-dir", help="folder with the MNIST IDX files (default: $LATENTDIFF_DATA, else download)")
        sp.add_argument("--classifier", help=f"classifier folder, trained there if missing (default: ${CLASSIFIER_ENV} "
                                             f"or {DEFAULT_CLASSIFIER})")
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--batch-size", type=int, default=500)
        sp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also seeds the real-floor subset")
        sp.add_argument("--n-per-class", type=int, default=n_default, help=f"samples per class (default {n_default})")
        sp.add_argument("--out", help="write the results as JSON here")
        sp.add_argument("--threads", type=int, help="torch CPU threads (1 is often faster on a busy shared CPU)")

    sp = sub.add_parser("classifier", help="train (if missing) the classifier and print the real-data floors")
    common(sp)
    sp.add_argument("--retrain", action="store_true", help="train again even if the folder exists")
    sp.set_defaults(fn=cmd_classifier)

    sp = sub.add_parser("ldm", help="score samples of one LDM setting")
    common(sp)
    sp.add_argument("--model", required=True, help="LDM run folder")
    sp.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    sp.add_argument("--sampler", help="dpm++ | ddim | ddpm (default: the model's)")
    sp.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    sp.add_argument("--samples", help="also save a PNG grid of the first 10 samples of each class")
    sp.set_defaults(fn=cmd_ldm)

    sp = sub.add_parser("vae", help="reconstruction metrics on the test split")
    common(sp)
    sp.add_argument("--model", required=True, help="VAE folder (or an LDM run folder, whose vae/ is used)")
    sp.set_defaults(fn=cmd_vae)

    sp = sub.add_parser("sweep", help="guidance sweep, then sampler x steps sweep")
    common(sp)
    sp.add_argument("--model", required=True, help="LDM run folder")
    sp.add_argument("--guidance", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 6])
    sp.add_argument("--samplers", nargs="+", default=["dpm++:5", "dpm++:10", "dpm++:20", "ddim:10", "ddim:20", "ddim:50"],
                    help="NAME:STEPS specs, e.g. dpm++:20 ddim:50 ddpm:1000")
    sp.add_argument("--sampler-guidance", type=float, help="guidance for the sampler sweep (default: the model's)")
    sp.add_argument("--min-accuracy", type=float, default=0.98, help="accuracy bar for choose_default (default 0.98)")
    sp.add_argument("--plot", help="write a PNG of the sweep here")
    sp.set_defaults(fn=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.n_per_class < 2:
        raise ValueError(f"--n-per-class must be >= 2 (covariances and k-NN radii need several samples), got {args.n_per_class}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = args.fn(args)
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)
