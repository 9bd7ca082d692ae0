"""Approximate linear-assignment solvers (registered in `lightning_immiscible.solvers`).

``greedy`` ([solve_greedy][lightning_immiscible.solvers_approx.solve_greedy])
trades a little of the distance reduction for a large speed-up of
the solver on large pools; what it keeps and what it saves, measured per data family, is on the
Performance page (``docs/performance.md``, "Choosing a solver").

It has no worst-case optimality guarantee: on adversarial costs (e.g. a cost whose k nearest
columns are the same for every row) it degrades towards plain row-greedy. Use an exact solver where
the assignment must be optimal (tests, small batches where ``lapjv`` costs milliseconds anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _centred(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-centred fp32 cost ``(B, B)`` and its row means ``(B,)``.

    ``cost - colmean - rowmean`` has the same optimum as ``cost``. Column centring must happen
    before the per-row candidate search (without it every row's nearest columns are the same
    short noise vectors); the row means only matter for the global edge order, so they are
    subtracted from the selected candidates alone. fp32 halves the memory traffic.
    """
    # NumPy (single-threaded) for the elementwise passes: torch's 2-thread kernels stall on a
    # loaded 2-core machine (measured 3-10x slower), while these passes are memory-bound anyway.
    c = np.asarray(cost).astype(np.float32)
    np.subtract(c, c.mean(axis=0, keepdims=True), out=c)
    return c, c.mean(axis=1)


def _k_smallest(cost: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` cheapest columns of each row, ``(values, columns)``, both ``(b, k)``.

    ``k`` passes of ``argmin`` (single-threaded NumPy): measured 2-3x faster than ``torch.topk``
    here and immune to stalled threads on a loaded machine. ``cost`` is masked in place and
    restored before returning.
    """
    rows = np.arange(cost.shape[0])
    idx = np.empty((cost.shape[0], k), dtype=np.int64)
    vals = np.empty((cost.shape[0], k), dtype=cost.dtype)
    for j in range(k):
        idx[:, j] = cost.argmin(axis=1)
        vals[:, j] = cost[rows, idx[:, j]]
        cost[rows, idx[:, j]] = np.inf
    for j in range(k):
        cost[rows, idx[:, j]] = vals[:, j]
    return vals, idx


def _greedy_round(cost: np.ndarray, row_mean: np.ndarray, k: int) -> np.ndarray:
    """One global greedy pass over every row's ``k`` cheapest columns.

    Args:
        cost: ``(b, b)`` column-centred cost of the still free sub-problem.
        row_mean: ``(b,)`` row offsets subtracted before the global sort.
        k: Candidates per row.

    Returns:
        ``(b,)`` int64: the column of each row, or ``-1`` where all its candidates were taken.
    """
    b = cost.shape[0]
    vals, idx = _k_smallest(cost, min(k, b))
    vals = vals - row_mean[:, None]
    order = np.argsort(vals, axis=None, kind="stable")
    rows, cols = np.divmod(order, vals.shape[1])
    col = np.full(b, -1, dtype=np.int64)
    taken = np.zeros(b, dtype=bool)
    for r, c in zip(rows.tolist(), idx[rows, cols].tolist(), strict=True):
        if col[r] < 0 and not taken[c]:
            col[r] = c
            taken[c] = True
    return col


def solve_greedy(
    cost: np.ndarray,
    *,
    k: int = 4,
    fixup: int = 64,
    exact: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Candidate greedy assignment on the row/column-centred cost.

    1. Subtract column then row means (same optimum as the input; removes the per-item offsets
       ``||x_i||`` / ``||n_j||`` that would otherwise dominate a greedy order).
    2. Keep each row's ``k`` cheapest columns, sort these ``b * k`` edges, accept an edge when its
       row and column are both free (a global greedy matching on the candidate graph).
    3. Repeat on the rows and columns left free; once at most ``fixup`` remain (or a round makes no
       progress), finish them with an exact solver.

    Args:
        cost: ``(B, B)`` float cost matrix.
        k: Candidate columns per row. 4 was the best measured trade-off (8 and 16 were slower and
            no better).
        fixup: Size below which the leftover sub-problem is solved exactly.
        exact: Exact solver for the leftovers, ``(b, b) -> (b,)`` int64 (the registry passes the
            exact solver of the low-dimensional order).

    Returns:
        ``(B,)`` int64 permutation: row ``i`` is assigned column ``col[i]``.
    """
    b = cost.shape[0]
    full, row_mean = _centred(cost)
    col = np.full(b, -1, dtype=np.int64)
    free_r, free_c = np.arange(b), np.arange(b)
    while free_r.size > fixup:
        sub_cost = full if free_r.size == b else full[np.ix_(free_r, free_c)]
        sub = _greedy_round(sub_cost, row_mean[free_r], k)
        done = sub >= 0
        if not done.any():
            break
        col[free_r[done]] = free_c[sub[done]]
        free_c = np.setdiff1d(free_c, free_c[sub[done]], assume_unique=True)
        free_r = free_r[~done]
    if free_r.size:
        sub = exact(full[np.ix_(free_r, free_c)].astype(np.float64))
        col[free_r] = free_c[sub]
    return col
