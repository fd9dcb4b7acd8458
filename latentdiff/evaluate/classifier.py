"""The judging classifier: a small CNN trained on the MNIST train split, cached as a model folder.

Its penultimate layer is the feature space of FLD and precision/recall (see metrics.py); its logits
give the conditional accuracy. Trained once (~3 min on a CPU) into ~/.cache/latentdiff/classifier.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import batch_indices, load_mnist
from ..errors import ModelLoadError
from ..serialization import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, load_model, save_model
from .metrics import class_accuracy

CLASSIFIER_ENV = "LATENTDIFF_CLASSIFIER"
DEFAULT_CLASSIFIER = Path("~/.cache/latentdiff/classifier")
TRAIN_INFO = "train_info.json"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set, on [0, 1]


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
    # A folder holding another model (a VAE, a UNet, a checkpoint: weights with no train_info.json beside them) is never
    # trained into: that would overwrite its weights.
    other = path.is_dir() and not (path / TRAIN_INFO).is_file() and any((path / f).is_file()
                                                                         for f in (CONFIG_NAME, WEIGHTS_NAME))
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"--classifier {path} is a file; pass a classifier folder (trained there if missing)")
    if retrain or not (path / CONFIG_NAME).is_file():
        if other:
            raise ModelLoadError(f"--classifier {path} holds another model's weights, not an evaluation classifier's "
                                 f"(no {TRAIN_INFO}); not training over them: pass a classifier folder, or a new one")
        print(f"training the evaluation classifier into {path} (a few minutes on a CPU, once)", file=sys.stderr)
        _, info = train_classifier(data_root, path, device)
        print(f"classifier test accuracy {info['test_accuracy']:.4%} in {info['train_wall_s']:.0f} s", file=sys.stderr)
    try:
        return load_model(Classifier, ClassifierConfig, path, device)
    except ModelLoadError as e:
        if other:  # --retrain would overwrite that model: name the mistake instead
            raise ModelLoadError(f"--classifier {path} is not an evaluation classifier (no {TRAIN_INFO}; {e}); pass a "
                                 "classifier folder, or a new one to train it there") from e
        raise ModelLoadError(f"{e}\n(an evaluation classifier from an older version? retrain it with --retrain)") from e


def classifier_info(path: str | Path | None = None) -> dict:
    """The train_info.json written beside a trained classifier ({} if absent)."""
    path = Path(path).expanduser() if path is not None else default_classifier_path()
    f = path / TRAIN_INFO
    return json.loads(f.read_text()) if f.is_file() else {}

