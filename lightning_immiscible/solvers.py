"""Linear-assignment solvers for dense square cost matrices.

Every solver takes a ``(B, B)`` float64 NumPy cost matrix and returns ``col`` of shape ``(B,)``
(int64) such that row ``i`` is assigned column ``col[i]``, i.e. a permutation that minimises
``cost[arange(B), col].sum()`` (exactly for exact solvers, approximately otherwise).

Solvers are looked up by name in `SOLVERS`;
[register_solver][lightning_immiscible.solvers.register_solver] adds one, so
``couple(..., solver="my_solver")`` works for user-supplied solvers too.

Built-in solvers (measured side by side in ``benchmarks/assignment.py``, see ``docs/performance.md``):

- ``lapjv`` (exact, optional ``pip install lapjv``, MIT): dense Jonker-Volgenant in C++; at
  B = 1024-2048 on this project's costs 2.5-4x faster than ``scipy`` (centred cost) and 8-17x
  faster than SciPy on the raw cost. ``auto`` prefers it when installed.
- ``lapx`` (exact, optional ``pip install lapx``, MIT): ``lap.lapjv``, used by ``auto`` when only it
  is installed.
- ``scipy`` (exact, always available): ``scipy.optimize.linear_sum_assignment``, the paper's solver.
- ``greedy`` (approximate): candidate greedy on the centred cost
  ([solve_greedy][lightning_immiscible.solvers_approx.solve_greedy]); at B = 2048 it needs 12-20 % of
  ``lapjv``'s solver time and keeps about 98 % of the exact distance reduction.

Every exact backend's answer is checked to be a permutation; a malformed answer (some ``lapjv``
builds return other tuple layouts) falls back to SciPy instead of pairing silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from lightning_immiscible.solvers_approx import solve_greedy

SolverFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: Name used in ``couple(..., solver=name)``.
        fn: ``(B, B) float64 cost -> (B,) int64`` column index per row.
        exact: Whether the solver returns an optimal assignment.
        priority: Order in which ``solver="auto"`` tries exact solvers (lower first).

    """

    name: str
    fn: SolverFn
    exact: bool
    priority: int = 100


SOLVERS: dict[str, SolverSpec] = {}


def register_solver(name: str, fn: SolverFn, *, exact: bool, priority: int = 100) -> None:
    """Registers ``fn`` under ``name`` (replacing an existing entry of that name)."""
    SOLVERS[name] = SolverSpec(name=name, fn=fn, exact=exact, priority=priority)


def _center(cost: np.ndarray) -> np.ndarray:
    """Subtracts row then column means: same optimum, and scipy converges 3-5x faster."""
    cost = cost - cost.mean(axis=1, keepdims=True)
    return cost - cost.mean(axis=0, keepdims=True)


def solve_scipy(cost: np.ndarray) -> np.ndarray:
    """Exact assignment with ``scipy.optimize.linear_sum_assignment`` (the paper's solver)."""
    rows, cols = linear_sum_assignment(_center(cost))
    col = np.empty(cost.shape[0], dtype=np.int64)
    col[rows] = cols
    return col


register_solver("scipy", solve_scipy, exact=True, priority=50)


def _is_permutation(col: np.ndarray, b: int) -> bool:
    if col.shape != (b,):
        return False
    seen = np.zeros(b, dtype=bool)
    valid = (col >= 0) & (col < b)
    if not valid.all():
        return False
    seen[col] = True
    return bool(seen.all())


def permutation_in(out: object, b: int) -> np.ndarray | None:
    """Finds the row-to-column array in a backend's return value, whatever its tuple layout.

    ``lapjv`` >= 1.3 returns ``(x, y, (cost, u, v))``; older builds and ``lapx`` return
    ``(cost, x, y)`` or ``(x, y)``. ``x`` (row -> column) is the first length-``b`` permutation.
    """
    items = out if isinstance(out, tuple | list) else (out,)
    for item in items:
        arr = np.asarray(item)
        if arr.ndim == 1 and arr.shape[0] == b and np.issubdtype(arr.dtype, np.integer):
            return arr.astype(np.int64) if _is_permutation(arr, b) else None
    return None


def checked_backend(backend: Callable[[np.ndarray], object]) -> SolverFn:
    """Wraps an optional exact backend: bad layouts, errors or non-permutations fall back to SciPy."""

    def fn(cost: np.ndarray) -> np.ndarray:
        try:
            col = permutation_in(backend(cost), cost.shape[0])
        except (ValueError, RuntimeError, TypeError, MemoryError):
            col = None
        return col if col is not None else solve_scipy(cost)

    return fn


def _shift_rows(cost: np.ndarray) -> np.ndarray:
    """Subtracts each row's minimum (same optimum).

    ``lapjv`` compares costs with an absolute tolerance: with a large common offset (measured:
    values 1e12 + [0, 1e3)) it returned a non-optimal assignment; shifted costs are solved exactly.
    """
    return cost - cost.min(axis=1, keepdims=True)


def _register_optional() -> None:
    """Registers the optional exact backends that import (a missing package is not an error)."""
    try:
        import lapjv as _lapjv  # MIT; the fastest dense exact solver measured here

        register_solver(
            "lapjv", checked_backend(lambda c: _lapjv.lapjv(_shift_rows(c))), exact=True, priority=10
        )
    except ImportError:
        pass
    try:
        import lap as _lap  # lapx, MIT

        register_solver(
            "lapx", checked_backend(lambda c: _lap.lapjv(c, return_cost=False)), exact=True, priority=20
        )
    except ImportError:
        pass


_register_optional()


def _exact_auto(cost: np.ndarray) -> np.ndarray:
    return resolve_solver("auto").fn(cost)


register_solver("greedy", lambda c: solve_greedy(c, exact=_exact_auto), exact=False, priority=100)


def available_solvers() -> list[str]:
    """Names of the registered solvers, exact ones first in ``auto`` order."""
    return [s.name for s in sorted(SOLVERS.values(), key=lambda s: (not s.exact, s.priority))]


def resolve_solver(name: str) -> SolverSpec:
    """Returns the solver for ``name``; ``"auto"`` picks the fastest installed exact solver.

    Raises:
        ValueError: If ``name`` is not registered.

    """
    if name == "auto":
        exact = [s for s in SOLVERS.values() if s.exact]
        return min(exact, key=lambda s: s.priority)
    if name not in SOLVERS:
        raise ValueError(
            f"Unknown solver {name!r}. Available: {['auto', *available_solvers()]}; "
            "add your own with lightning_immiscible.solvers.register_solver()."
        )
    return SOLVERS[name]


def solve(cost: np.ndarray, solver: str = "auto") -> np.ndarray:
    """Solves the assignment for a square ``(B, B)`` cost matrix.

    Args:
        cost: ``(B, B)`` cost matrix (any float dtype; converted to float64).
        solver: A name from [available_solvers][lightning_immiscible.solvers.available_solvers] or ``"auto"``.

    Returns:
        ``(B,)`` int64 array ``col`` with row ``i`` assigned to column ``col[i]``.

    """
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"solve() needs a square (B, B) cost matrix, got shape {cost.shape}.")
    if cost.shape[0] <= 1:
        return np.arange(cost.shape[0], dtype=np.int64)
    return np.asarray(resolve_solver(solver).fn(cost), dtype=np.int64)
