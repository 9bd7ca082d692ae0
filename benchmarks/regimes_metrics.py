"""Sample-quality metrics of the regimes sweep: exact W2 (2-D), sliced W2, energy distance, classifier FD.

The classifier behind the Fréchet distance is a small MLP trained once per dataset on the dataset's
own labels with a fixed generator and cached as a file, so every arm and seed is scored by the same
frozen features.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from example_projects.flow_matching.metrics2d import path_straightness, w2_exact

__all__ = [
    "classifier_features",
    "energy_distance",
    "frechet",
    "gaussian_stats",
    "path_straightness",
    "sliced_w2",
    "w2_exact",
]


def sliced_w2(a: Tensor, b: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size `(n, D)` samples over fixed random directions."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs equal-size samples, got {tuple(a.shape)} and {tuple(b.shape)}.")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return float((pa - pb).square().mean().sqrt())


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Energy distance `2 E|X-Y| - E|X-X'| - E|Y-Y'|` between `(n, D)` and `(m, D)` samples (V-statistic)."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def gaussian_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(F,)` and covariance `(F, F)` of `(n, F)` features, in float64."""
    f = features.double()
    centred = f - f.mean(0)
    return f.mean(0).numpy(), (centred.T @ centred / (f.shape[0] - 1)).numpy()


def frechet(f1: Tensor, ref: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between a Gaussian fitted to `(n, F)` features and reference `(mean, cov)`.

    `tr sqrt(C1 C2)` is computed as the sum of square roots of the eigenvalues of the symmetric
    `sqrt(C1) C2 sqrt(C1)`: exact, and much faster and steadier than a general matrix square root.
    """
    (mu1, c1), (mu2, c2) = gaussian_stats(f1), ref
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ c2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


class FeatureClassifier(nn.Module):
    """`(B, D)` -> `(B, 10)` logits; `features` gives the `(B, 64)` penultimate activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_classifier(x: Tensor, y: Tensor, epochs: int = 30, seed: int = 0) -> FeatureClassifier:
    """Trains the feature classifier with its own generator (data order and initial weights)."""
    g = torch.Generator().manual_seed(seed)
    model = FeatureClassifier(x.shape[1])
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1 / math.sqrt(p.shape[-1]), 1 / math.sqrt(p.shape[-1]), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def classifier_features(name: str, x: Tensor, y: Tensor, cache: Path, epochs: int = 30) -> FeatureClassifier:
    """The frozen feature classifier: loaded from `cache/classifier-<name>.pt`, trained once if absent."""
    path = cache / f"classifier-{name}.pt"
    model = FeatureClassifier(x.shape[1])
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval().requires_grad_(False)
    model = train_classifier(x, y, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.requires_grad_(False)
