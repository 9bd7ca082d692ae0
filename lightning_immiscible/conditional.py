"""Coupling within each condition (class labels): the noise each class trains on stays Gaussian.

Plain minibatch coupling pairs noise with data across the whole batch, so the noises that end up
with class `y` lean toward class `y`'s data; at sampling time the noise is drawn independently of
the class, so a conditional model meets a prior it was not trained on. Coupling within each
condition removes that lean and keeps the shorter data-noise distances:

1. the pool of `B` noise vectors is split into one block per distinct label (labels in ascending
   order, each block as large as that label's count): block `c` is the pool positions
   `[start_c, start_c + n_c)`;
2. the assignment is solved within each block: the rows are the items of label `c` (in batch
   order), the columns are block `c`'s pool positions.

The split uses the pool's own order, which is independent of the data: the pool is i.i.d. Gaussian
(drawn from a generator seeded by the run, or `torch.randn` by the caller), so any data-independent
choice of `n_c` positions is a set of `n_c` i.i.d. Gaussian vectors, and shuffling the pool first
would not change that distribution. A fixed split needs no extra random stream, is identical on
every rank and lets [couple][lightning_immiscible.coupling.couple] stay free of global RNG. The set
of noises class `c` trains on is therefore exactly i.i.d. `N(0, I)` given the labels: a uniformly
chosen item of class `c` gets a uniformly chosen member of that set.

This module is pure (torch + NumPy/SciPy): [couple][lightning_immiscible.coupling.couple] and
[couple_in_group][lightning_immiscible.distributed.couple_in_group] call it, as does the
[prior_skew][lightning_immiscible.conditional.prior_skew] diagnostic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from lightning_immiscible.costs import cost_matrix
from lightning_immiscible.embedding import embedding_problem, is_embedding
from lightning_immiscible.solvers import SolverSpec, solve

#: Integer label dtypes accepted as a condition; the header carries `1 + index` (0: no condition).
LABEL_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

#: Labels at or above this are not exact in float32 cost rows: the group then gathers float64 rows.
FLOAT32_EXACT = 2**24

#: Labels must stay below this (exact as float64 in the gathered cost rows).
LABEL_LIMIT = 2**53


def condition_problem(
    condition: object, batch_size: int, metric: str = "sqeuclidean"
) -> tuple[str, str] | None:
    """Checks a condition tensor locally, before any communication.

    Args:
        condition: The batch's condition: `(B,)` integer labels, a `(B, E)` float embedding
            ([embedding_problem][lightning_immiscible.embedding.embedding_problem] checks it), or
            `None` (unconditional).
        batch_size: `B`, the batch's item count.
        metric: The condition metric an embedding is compared with.

    Returns:
        `None` when the condition is usable (or absent), else `(message, reason)` with `reason` one
        of the coupling's input-error reasons (`"dtype"`, `"shape"`, `"invalid"`, `"non_finite"`).
    """
    if condition is None:
        return None
    fix = "pass `(B,)` integer class ids (e.g. `labels.long()`) or a `(B, E)` float embedding"
    if not isinstance(condition, Tensor):
        return f"condition must be a torch.Tensor, got {type(condition).__name__}; {fix}.", "dtype"
    if condition.ndim >= 2:
        return embedding_problem(condition, batch_size, metric)
    if condition.is_floating_point():
        return (
            f"condition has dtype {condition.dtype} and shape {tuple(condition.shape)}: pass `(B,)` "
            "integer class ids for labels (e.g. `labels.long()`), or a `(B, 1)` float tensor for a "
            "scalar condition (`condition[:, None]`).",
            "dtype",
        )
    if condition.dtype not in LABEL_DTYPES:
        return f"condition has dtype {condition.dtype}; {fix}.", "dtype"
    if condition.ndim != 1 or condition.shape[0] != batch_size:
        return (
            f"condition has shape {tuple(condition.shape)} but the batch has {batch_size} items; {fix}.",
            "shape",
        )
    if condition.numel() and int(condition.min()) < 0:
        return f"condition has negative labels (min {int(condition.min())}); {fix} >= 0.", "invalid"
    if condition.numel() and int(condition.max()) >= LABEL_LIMIT:
        return f"condition has labels >= 2**53 (max {int(condition.max())}); renumber them from 0.", "invalid"
    return None


def needs_wide_rows(condition: Tensor | None) -> bool:
    """Whether the condition needs float64 rows to travel exactly (labels `>= 2**24`, float64 embeddings)."""
    if is_embedding(condition):
        return condition.dtype == torch.float64  # type: ignore[union-attr]
    return condition is not None and condition.numel() > 0 and int(condition.max()) >= FLOAT32_EXACT


def pool_blocks(labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The blocks of the split: for each distinct label in ascending order, its rows and pool columns.

    Args:
        labels: `(B,)` integer labels of the whole coupled batch (a group's: all ranks, rank order).

    Returns:
        One `(rows, cols)` pair of int64 CPU tensors per distinct label: `rows` are the items with
        that label in batch order, `cols` the block's contiguous pool positions (same length).
    """
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1].tolist()
    blocks, start = [], 0
    for n in counts:
        blocks.append((order[start : start + n], torch.arange(start, start + n)))
        start += n
    return blocks


def solve_blocks(full: np.ndarray, labels: Tensor, solver: str | SolverSpec, dim: int | None) -> np.ndarray:
    """Solves the assignment within each condition's block of a full `(B, B)` cost.

    Args:
        full: `(B, B)` costs, row `i` = item `i`, column `j` = pool item `j`.
        labels: `(B,)` labels of the rows.
        solver: The solver (name or spec) for every block.
        dim: Values per item (lets `solver="auto"` choose).

    Returns:
        `(B,)` int64 `col`: item `i` gets pool item `col[i]`, always inside its label's block.
    """
    col = np.empty(full.shape[0], dtype=np.int64)
    for rows, cols in pool_blocks(labels):
        r, c = rows.numpy(), cols.numpy()
        col[r] = c[solve(full[np.ix_(r, c)], solver, dim=dim)]
    return col


def assign_within(
    x0: Tensor,
    noise: Tensor,
    labels: Tensor,
    *,
    metric: str,
    precision: str,
    solver: str | SolverSpec,
    flip: bool,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, float, float]:
    """Single-process coupling within conditions, costing only the blocks (`sum n_c^2` entries).

    The costs are computed from the inputs detached (no autograd graph), and
    every block goes through [solve][lightning_immiscible.solvers.solve]'s NaN/Inf check.

    Args:
        x0: `(B, *dims)` data.
        noise: `(B, *dims)` i.i.d. noise (the pool).
        labels: `(B,)` labels.
        metric: Cost metric.
        precision: Matmul precision of the costs.
        solver: The solver for each block.
        flip: Cost against `-noise` (the `"flip"` ablation).
        dtype: The costs' dtype, when the caller's input check chose it
            ([cost_inputs][lightning_immiscible.checks.cost_inputs]); `None`: chosen per block
            ([cost_dtype][lightning_immiscible.costs.cost_dtype]).

    Returns:
        `(index, cost_ms, solve_ms)`: `index` `(B,)` int64 on `x0`'s device into `noise`.
    """
    dim = math.prod(noise.shape[1:])
    target = -noise if flip else noise
    index = torch.empty(x0.shape[0], dtype=torch.int64)
    cost_ms = solve_ms = 0.0
    for rows, cols in pool_blocks(labels):
        start = time.perf_counter()
        cost = cost_matrix(x0[rows.to(x0.device)], target[cols.to(x0.device)], metric, precision, dtype).cpu()
        mid = time.perf_counter()
        index[rows] = cols[torch.from_numpy(solve(cost.double().numpy(), solver, dim=dim))]
        cost_ms += (mid - start) * 1e3
        solve_ms += (time.perf_counter() - mid) * 1e3
    return index.to(x0.device), cost_ms, solve_ms


def class_noise_means(noise: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per distinct label: the label, its mean noise and its count (on the noise's device).

    Args:
        noise: `(B, *dims)` the coupled noise, `noise[i]` paired with item `i`.
        labels: `(B,)` the items' labels.

    Returns:
        `(classes (C,), means (C, D) float32, counts (C,))`, classes ascending.
    """
    classes, inverse, counts = torch.unique(labels.to(noise.device), return_inverse=True, return_counts=True)
    flat = noise.detach().reshape(noise.shape[0], -1).float()
    return classes, _class_sums(inverse, classes.shape[0], flat) / counts[:, None], counts


def _class_sums(inverse: Tensor, num: int, flat: Tensor) -> Tensor:
    """`(num, D)` sums of the rows of `flat` per class index (one matmul: fast on CPU and GPU)."""
    onehot = torch.zeros(num, flat.shape[0], dtype=flat.dtype, device=flat.device)
    onehot[inverse, torch.arange(flat.shape[0], device=flat.device)] = 1.0
    return onehot @ flat


def prior_skew(
    x0: Tensor, labels: Tensor, classes: Tensor, noise_means: Tensor, counts: Tensor
) -> float | None:
    """How much the noise of each class leans toward that class's data: a z-score, ~N(0, 1) per batch if none.

    For each class `c` with `n_c` items in the coupled batch and mean coupled noise `m_c`, let
    `u_c` be the unit vector along `mean(x0 of class c) - mean(x0)` (this process's items; the
    part of the data mean shared by every class cannot tell classes apart, so it is removed). The
    statistic is `sum_c sqrt(n_c) <m_c, u_c> / sqrt(C)` over the `C` classes with a nonzero `u_c`.

    Null: when the noise given each class is i.i.d. `N(0, I)` and independent of the data (coupling
    within conditions, or no coupling), `m_c ~ N(0, I / n_c)` is independent of `u_c`, so each term
    is `N(0, 1)`, the terms are independent (disjoint noise), and the statistic is `N(0, 1)`: mean 0,
    and its average over `T` logged batches has standard error `1 / sqrt(T)`. Under cross-class
    coupling `m_c` leans toward class `c`'s data and the statistic grows like `sqrt(B)` times the
    per-dimension lean. In a group of several ranks the means `m_c` are the group's (the whole
    coupled pool), while `u_c` comes from this rank's items: still independent under the null.

    Args:
        x0: `(b, *dims)` this process's data.
        labels: `(b,)` its labels.
        classes: `(C,)` the coupled batch's classes (from
            [class_noise_means][lightning_immiscible.conditional.class_noise_means]).
        noise_means: `(C, D)` the mean coupled noise of each class over the coupled batch.
        counts: `(C,)` each class's item count in the coupled batch.

    Returns:
        The statistic, or `None` when no class has a direction (fewer than two classes here).
    """
    flat = x0.detach().reshape(x0.shape[0], -1).float()
    classes, labels = classes.to(flat.device), labels.to(flat.device)
    member = (classes[:, None] == labels[None, :]).to(flat.dtype)  # (C, b): this rank's items per class
    here = member.sum(1)
    total = flat.mean(0)
    u = (member @ flat) / here.clamp_min(1)[:, None] - total
    norm = u.norm(dim=1)
    # A class that is all of this rank's items has no direction (u is rounding error only).
    spread = (flat - total).norm(dim=1).mean()
    ok = (here > 0) & (norm > 1e-4 * spread)
    terms = counts.to(flat.device).float().sqrt() * (noise_means.to(flat.device).float() * u).sum(1)
    used = int(ok.sum())
    return float((terms[ok] / norm[ok]).double().sum()) / math.sqrt(used) if used else None


def assign_gathered(
    x: Tensor,
    noise: Tensor,
    labels: Tensor,
    gather_rows: Callable[[Tensor], Tensor],
    *,
    metric: str,
    precision: str,
    solver: str | SolverSpec,
    flip: bool,
    within: bool,
    dtype: torch.dtype,
) -> tuple[np.ndarray, Tensor, float, float]:
    """A group's coupling with labels: the labels ride as one extra column of the gathered cost rows.

    Args:
        x: `(b, *dims)` this rank's data.
        noise: `(B, *dims)` the group's pool.
        labels: `(b,)` this rank's labels.
        gather_rows: Maps `(b, B + 1)` local rows to the `(B, B + 1)` rows of the group, rank order.
        metric: Cost metric.
        precision: Matmul precision of the costs.
        solver: The solver (the whole matrix, or each block).
        flip: Cost against `-noise`.
        within: Solve within each label's block (`False`: one assignment across labels).
        dtype: The group's agreed cost dtype (float64 when a label is `>= 2**24`).

    Returns:
        `(col, all_labels, cost_ms, solve_ms)`: `col` `(B,)` the pool item of every item of the
        group, `all_labels` `(B,)` int64 the group's labels in rank order.
    """
    start = time.perf_counter()
    rows = cost_matrix(x, -noise if flip else noise, metric, precision, dtype)
    rows = torch.cat([rows, labels.to(rows.device, rows.dtype)[:, None]], 1)
    full = gather_rows(rows).cpu()
    all_labels = full[:, -1].round().long()
    cost = full[:, :-1].double().numpy()
    mid = time.perf_counter()
    dim = math.prod(noise.shape[1:])
    col = solve_blocks(cost, all_labels, solver, dim) if within else solve(cost, solver, dim=dim)
    return col, all_labels, (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3
