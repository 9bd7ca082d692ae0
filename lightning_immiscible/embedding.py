"""Embedding conditions (text, attributes): the condition cost, its weight and the condition leak.

A `(B, E)` float condition (a text embedding, a vector of attributes) gives almost every item a
condition of its own, so there are no blocks to couple within (as with labels,
[conditional][lightning_immiscible.conditional]). Instead the assignment minimises the data-noise
cost plus a condition term, after C²OT (Cheng and Schwing, "The Curse of Conditions: Analyzing and
Improving Optimal Transport for Conditional Flow-Based Generation", ICCV 2025):

    K[i, j] = M[i, j] + w * C[i, j]

- `M[i, j]`: the data-noise cost of the coupling's metric, row `i` = item `i`, column `j` = pool
  noise `j`;
- `C[i, j]`: the distance between the condition of item `i` and the condition of item `j`, the item
  pool noise `j` was drawn with (so `C[i, i] = 0`: keeping the drawn pair costs no condition);
- `w`: chosen per coupled pool by the candidate-pair rule
  ([search_weight][lightning_immiscible.embedding.search_weight]).

The pieces here are pure (NumPy, float64 on the CPU, and torch for the diagnostic):
[couple][lightning_immiscible.coupling.couple] and
[couple_in_group][lightning_immiscible.distributed.couple_in_group] call them.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from lightning_immiscible.solvers import SolverSpec, solve

#: The distance between two conditions: squared Euclidean, or one minus the cosine similarity.
ConditionMetric = Literal["sqeuclidean", "cosine"]
CONDITION_METRICS: tuple[ConditionMetric, ...] = get_args(ConditionMetric)

#: The weight search stops once the achieved share is this close to the target.
SHARE_TOLERANCE = 1e-3
#: Steps of the bisection at most.
MAX_ITERATIONS = 40
#: The doubling stops at this multiple of the starting weight.
MAX_WEIGHT_FACTOR = 1e8


def is_embedding(condition: object) -> bool:
    """Whether `condition` is an embedding (a 2-D floating tensor) rather than labels."""
    return isinstance(condition, Tensor) and condition.ndim == 2 and condition.is_floating_point()


def check_share(share: object) -> float:
    """`share` as a float, or a `ValueError` naming `candidate_share` and its range."""
    ok = isinstance(share, int | float) and not isinstance(share, bool) and 0 < share < 1
    if not ok:
        raise ValueError(
            f"candidate_share={share!r}: the target share of candidate pairs must be a number "
            "strictly between 0 and 1 (C²OT uses 0.2; lower keeps each noise closer to its own "
            "condition, higher gives the data-noise distance more room)."
        )
    return float(share)  # type: ignore[arg-type]


def embedding_problem(condition: Tensor, batch_size: int, metric: str) -> tuple[str, str] | None:
    """Checks a `(B, E)` embedding locally (shape, dtype, values), before any communication.

    Args:
        condition: A 2-D tensor or one of more dimensions (refused: flatten it).
        batch_size: `B`, the batch's item count.
        metric: The condition metric (`"cosine"` refuses zero vectors).

    Returns:
        `None` when usable, else `(message, reason)` with `reason` one of `"dtype"`, `"shape"`,
        `"non_finite"`, `"invalid"`.
    """
    shape = tuple(condition.shape)
    if condition.ndim != 2:
        return (
            f"condition has shape {shape}; an embedding condition is `(B, E)`: flatten it "
            "(`condition.flatten(1)`), or pass `(B,)` integer class ids for labels.",
            "shape",
        )
    if not condition.is_floating_point():
        return (
            f"condition has shape {shape} and dtype {condition.dtype}: a 2-D condition is an "
            "embedding and must be floating (`condition.float()`); labels are `(B,)` integer class ids.",
            "dtype",
        )
    if shape[0] != batch_size or shape[1] == 0:
        return (
            f"condition has shape {shape} but the batch has {batch_size} items; an embedding "
            "condition is `(B, E)`, E >= 1, one row per item of immiscible_data(batch).",
            "shape",
        )
    bad = condition.numel() - int(torch.isfinite(condition).sum())
    if bad:
        return (
            f"condition contains {bad} NaN/Inf value(s) (shape {shape}); fix the encoder or the "
            "data that produced the embedding before coupling.",
            "non_finite",
        )
    if metric == "cosine" and condition.numel() and bool((condition.abs().amax(1) == 0).any()):
        return (
            "condition has an all-zero row: the cosine distance needs nonzero vectors. Give every "
            "item a nonzero embedding, or use condition_metric='sqeuclidean'.",
            "invalid",
        )
    return None


def condition_costs(z: np.ndarray, metric: str) -> np.ndarray:
    """`(B, B)` float64 distances between the conditions: `C[i, j] = d(z[i], z[j])`, `C[i, i] = 0`.

    One matrix product (the Gram form). Entries within the product's rounding error of 0 are set to
    0, so that items with identical conditions cost nothing to swap, as with an exact difference.

    Args:
        z: `(B, E)` float64 conditions.
        metric: `"sqeuclidean"` or `"cosine"` (`1 - cos`, as C²OT uses for CLIP text embeddings).
    """
    e = max(z.shape[1], 1)
    if metric == "cosine":
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        c = 1.0 - unit @ unit.T
        rounding = np.full_like(c, 4 * e * np.finfo(np.float64).eps)
    else:
        z = z - z.mean(0)  # distances do not move; the Gram form loses less to cancellation
        sq = np.einsum("ij,ij->i", z, z)
        c = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
        rounding = 4 * e * np.finfo(np.float64).eps * (sq[:, None] + sq[None, :])
    c[c <= rounding] = 0.0
    np.fill_diagonal(c, 0.0)
    return c


def candidate_share(cost: np.ndarray, c: np.ndarray, weight: float) -> float:
    """`r(w)`: the share of all `B x B` entries with `M[i, j] + w C[i, j] <= M[i, i]`.

    Noise `j` is a candidate for item `i` when, with the condition term, it costs item `i` no more
    than the noise drawn with item `i`. (C²OT writes the transpose, noise by data: `M[i, j] + w C[i, j]
    <= M[j, j]`; the entries counted are the same.) The diagonal always counts.

    Args:
        cost: `(B, B)` data-noise costs `M`, row = item, column = pool noise.
        c: `(B, B)` condition costs.
        weight: `w >= 0`.
    """
    diag = np.diagonal(cost)[:, None]
    within = cost <= diag if weight == 0 else cost + weight * c <= diag
    return float(np.count_nonzero(within) / cost.size)  # a Python float: results and logs


def search_weight(cost: np.ndarray, c: np.ndarray, share: float) -> tuple[float, float]:
    """The condition weight `w` whose candidate share `r(w)` is within `SHARE_TOLERANCE` of `share`.

    C²OT's rule (`search_for_w` in its `c2ot/ot.py`), searched afresh for each pool:

    1. if `r(0) <= share`, `w = 0` (also when every condition is the same: nothing to weigh);
    2. else start from the scale-free `w0 = mean |M[i, j] - M[i, i]| / mean C[i, j]` over `i != j`
       (the typical cost gap a condition term must bridge), and double `w` until `r(w) <= share`;
       past `MAX_WEIGHT_FACTOR * w0` the search stops there (the share then stays above the target:
       many pairs with identical conditions);
    3. bisect between the last two weights until `|r - share| <= SHARE_TOLERANCE`, at most
       `MAX_ITERATIONS` steps; without reaching it (a small pool: `r` moves in steps of `1 / B^2`),
       the weight whose share came closest (the first of equals).

    `r` counts entries, so it is unchanged when `M` is rescaled, and `w` rescales with `M`.

    Args:
        cost: `(B, B)` float64 data-noise costs `M` (row = item, column = pool noise).
        c: `(B, B)` float64 condition costs (`C[i, i] = 0`).
        share: The target share, `0 < share < 1`.

    Returns:
        `(w, r(w))`.
    """
    found = candidate_share(cost, c, 0.0)
    off = ~np.eye(cost.shape[0], dtype=bool)
    spread = float(c[off].mean()) if off.any() else 0.0
    if found <= share or not spread > 0:
        return 0.0, found
    w0 = float(np.abs(cost - np.diagonal(cost)[:, None])[off].mean()) / spread
    w0 = w0 if w0 > 0 else 1.0 / spread
    low, high = 0.0, w0
    found = candidate_share(cost, c, high)
    while found > share:
        low, high = high, 2 * high
        if high > MAX_WEIGHT_FACTOR * w0:
            high = MAX_WEIGHT_FACTOR * w0
            return high, candidate_share(cost, c, high)
        found = candidate_share(cost, c, high)
    best = (high, found)  # invariant: r(low) > share >= r(high)
    for _ in range(MAX_ITERATIONS):
        if abs(best[1] - share) <= SHARE_TOLERANCE:
            break
        mid = (low + high) / 2
        got = candidate_share(cost, c, mid)
        low, high = (mid, high) if got > share else (low, mid)
        if abs(got - share) < abs(best[1] - share):
            best = (mid, got)
    return best


def solve_with_embedding(
    cost: np.ndarray, z: np.ndarray, *, share: float, metric: str, solver: str | SolverSpec, dim: int | None
) -> tuple[np.ndarray, float, float]:
    """Solves `M + w C`, with `w` from [search_weight][lightning_immiscible.embedding.search_weight].

    Deterministic (float64 NumPy on the CPU): the ranks of a group, each solving the same gathered
    matrix, find the same `w` and the same pairing.

    Args:
        cost: `(B, B)` data-noise costs (row = item, column = pool noise).
        z: `(B, E)` the items' conditions in pool order (pool noise `j` was drawn with item `j`).
        share: The target candidate share.
        metric: The condition metric.
        solver: The assignment solver.
        dim: Values per item (lets `solver="auto"` choose).

    Returns:
        `(col, w, r)`: `col` `(B,)` int64, item `i` gets pool noise `col[i]`; the weight and the
        candidate share it reached.
    """
    cost = np.asarray(cost, dtype=np.float64)
    c = condition_costs(np.asarray(z, dtype=np.float64), metric)
    weight, reached = search_weight(cost, c, share)
    total = cost + weight * c if weight else cost
    return solve(total, solver, dim=dim), weight, reached


def fit_basis(z: Tensor) -> Tensor:
    """`(B, k)` float64 orthonormal basis of the centred conditions' column space (`k` = their rank).

    Singular values below `max(B, E) * eps` times the larger of the largest one and the conditions'
    own scale (`sqrt(B) * max |z|`) count as 0, so a constant condition (whose centring leaves only
    rounding error) has rank 0.
    """
    z = z.detach().to("cpu", torch.float64)
    centred = z - z.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    if s.numel() == 0:
        return u[:, :0]
    scale = max(float(s[0]), math.sqrt(z.shape[0]) * float(z.abs().max()))
    keep = s > max(z.shape) * torch.finfo(torch.float64).eps * scale
    return u[:, keep]


def condition_leak(x0: Tensor, condition: Tensor, noise: Tensor) -> float | None:
    """How much the coupled noise leans toward the data its condition predicts: N(0, 1) per batch if not.

    Centre the batch's data `X` `(B, D)` and conditions `Z` `(B, E)`; `V = Z (Z^T Z)^+ Z^T X` is the
    least-squares fit of the data on the conditions (row `i`: the part of item `i`'s data its
    condition predicts). With `N` `(B, D)` the coupled noise (`N[i]` paired with item `i`):

        leak = <N, V>_F / ||V||_F

    Null: when `N` is i.i.d. `N(0, I)` and independent of `X` and `Z` (independent pairs; noise
    moved only between items with identical conditions), `<N, V>_F ~ N(0, ||V||_F^2)` given `X` and
    `Z`, so the leak is exactly `N(0, 1)` per batch and its mean over `T` batches has standard error
    `1 / sqrt(T)`. Under a leak it grows like `sqrt(B)` times the per-item lean of the noise along
    `V`. For one-hot class labels it is a weighted form of
    [prior_skew][lightning_immiscible.conditional.prior_skew]. With `E >= B - 1` distinct
    conditions the fit is exact (`V = X` centred): any lean of the noise toward its own item's data
    then counts, since the condition identifies the item.

    Computed as `<U^T N, U^T X> / ||U^T X||` with `U` the orthonormal basis of the centred
    conditions ([fit_basis][lightning_immiscible.embedding.fit_basis]), in float64 (float32 on MPS).

    Args:
        x0: `(B, *dims)` the data.
        condition: `(B, E)` the conditions.
        noise: `(B, *dims)` the coupled noise.

    Returns:
        The statistic, or `None` when `V = 0` (fewer than two items, a constant condition, or data
        the conditions do not predict at all).
    """
    b = x0.shape[0]
    if b < 2:
        return None
    basis = fit_basis(condition)
    if basis.shape[1] == 0:
        return None
    dtype = torch.float32 if x0.device.type == "mps" else torch.float64
    u = basis.to(x0.device, dtype)
    x = x0.detach().reshape(b, -1).to(dtype)
    x = x - x.mean(0)
    fit = u.T @ x  # (k, D): V = u @ fit, and ||V|| = ||fit|| (orthonormal columns)
    size = torch.linalg.vector_norm(fit)
    if not float(size) > 1e-12 * float(torch.linalg.vector_norm(x)):
        return None
    return float((u.T @ noise.detach().reshape(b, -1).to(dtype) * fit).sum() / size)
