"""Exact 2-Wasserstein distance and path straightness for low-dimensional samples.

Both are plain functions of tensors (no model, no Lightning), so sweeps can reuse them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def w2_exact(a: Tensor, b: Tensor) -> float:
    """Exact 2-Wasserstein distance between two equal-size empirical samples.

    With ``n`` points each, the optimal coupling of two uniform empirical measures is a
    permutation (Birkhoff), so ``W2 = sqrt(min_perm mean_i ||a_i - b_perm(i)||^2)``, solved
    exactly with SciPy's ``linear_sum_assignment`` on the squared-distance matrix (float64).

    Args:
        a: ``(n, d)`` points (e.g. generated samples).
        b: ``(n, d)`` points (e.g. a fixed target sample).

    Returns:
        The distance, in the units of the points.

    Examples:
        ```python
        w2_exact(torch.zeros(3, 2), torch.ones(3, 2))  # sqrt(2)
        ```
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"w2_exact needs two (n, d) samples of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}."
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")  # a diverged sampler: no matching to compute
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    cost = torch.cdist(a64, b64).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def path_straightness(path: Tensor) -> float:
    """Rectified flow's straightness ``S`` of sampled paths (Liu et al. 2023, Eq. 7), discretised.

    ``S = mean_k mean_i ||(x_end - x_start) - (x_{k+1} - x_k) * K||^2`` over ``K`` uniform steps:
    how far each step's velocity is from the straight line between the path's ends. ``0`` for
    straight paths traversed at constant speed; larger is more curved.

    Args:
        path: ``(K + 1, n, *dims)`` points along the paths, e.g. from
            ``integrate(..., return_path=True)``.

    Returns:
        The mean squared deviation (units of the points squared).
    """
    if path.shape[0] < 2:
        raise ValueError(f"A path needs at least 2 points in time, got shape {tuple(path.shape)}.")
    k = path.shape[0] - 1
    chord = (path[-1] - path[0]).flatten(1)
    steps = (path[1:] - path[:-1]).flatten(2) * k
    return float((steps - chord).square().sum(-1).mean())


def length_ratio(path: Tensor) -> float:
    """Mean ratio of end-to-end distance to path length, in ``(0, 1]``: 1 for straight paths.

    Args:
        path: ``(K + 1, n, *dims)`` points along the paths.
    """
    chord = (path[-1] - path[0]).flatten(1).norm(dim=-1)
    length = (path[1:] - path[:-1]).flatten(2).norm(dim=-1).sum(0)
    return float((chord / length.clamp_min(1e-12)).mean())
