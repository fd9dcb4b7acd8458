"""Pure metric functions on tensors: accuracy, PSNR, Frechet distance, k-NN precision/recall.

Nothing here loads data or models; every function takes features/labels and returns numbers, so
each can be checked against a closed form (tests/test_evaluate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

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


def balanced_subset(labels: torch.Tensor, n_per_class: int | Sequence[int], seed: int = 0,
                    num_classes: int = 10) -> torch.Tensor:
    """Indices of ``n_per_class`` random examples of each class (fewer if a class has fewer).

    ``n_per_class`` is one count for every class, or a count per class (to match an unbalanced sample set).
    """
    counts = [n_per_class] * num_classes if isinstance(n_per_class, int) else list(n_per_class)
    if len(counts) != num_classes:
        raise ValueError(f"need one count per class ({num_classes}), got {len(counts)}")
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c, n in enumerate(counts):
        where = (labels == c).nonzero().squeeze(1)
        idx.append(where[torch.randperm(len(where), generator=g)[:n]])
    return torch.cat(idx)

