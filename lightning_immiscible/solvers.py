"""Linear-assignment solvers for dense square cost matrices.

Every solver takes a ``(B, B)`` float64 NumPy cost matrix and returns ``col`` of shape ``(B,)``
(int64) such that row ``i`` is assigned column ``col[i]``, i.e. a permutation that minimises
``cost[arange(B), col].sum()`` (exactly for exact solvers, approximately otherwise).

Solvers are looked up by name in `SOLVERS`;
[register_solver][lightning_immiscible.solvers.register_solver] adds one, so
``couple(..., solver="my_solver")`` works for user-supplied solvers too.

Built-in solvers (measured side by side in ``benchmarks/assignment.py``; the figures are in
``docs/performance.md``):

- ``lapjv`` (exact, optional ``pip install lapjv``, MIT): dense Jonker-Volgenant in C++; the fixed
  rule's choice for items of more than 64 values. It compares costs with an absolute tolerance,
  so ``auto`` does not use it on D <= 64 (on 2-D points it may stop slightly above the optimum).
- ``lapjvr`` (exact, optional ``pip install lapx``, MIT): lapx's Rust Jonker-Volgenant
  (``lap.lapjvr``); the fixed rule's choice for items of at most 64 values.
- ``lapx`` (exact, optional ``pip install lapx``, MIT): ``lap.lapjv``; kept for users who name it.
- ``pot`` (exact, optional ``pip install pot``, MIT): POT's network simplex (``ot.emd``,
  [solve_pot][lightning_immiscible.solvers.solve_pot]); the fixed rule's choice for points (at
  most 3 values) in pools of 256 and more; imported on first use.
- ``scipy`` (exact, always available): ``scipy.optimize.linear_sum_assignment`` on the centred cost.
- ``greedy`` (approximate): candidate greedy on the centred cost
  ([solve_greedy][lightning_immiscible.solvers_approx.solve_greedy]).

``solver="auto"`` here follows a fixed rule of the pool size and the item dimension D
([choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]). Where no fixed rule picks
the faster exact solver (D > 64), the callback, [couple][lightning_immiscible.coupling.couple] and
[CouplingCollate][lightning_immiscible.workers.CouplingCollate] refine it with one race
([RaceBook][lightning_immiscible.solver_race.RaceBook]).

Every exact backend's answer is checked to be a permutation
([CheckedBackend][lightning_immiscible.solvers.CheckedBackend]); a malformed answer (some ``lapjv``
builds return other tuple layouts) or an error falls back to SciPy instead of pairing silently wrong.

No backend ever sees a NaN or an infinity: [solve][lightning_immiscible.solvers.solve], which every
coupling path (and greedy's exact finish) calls before a backend, raises a
[CouplingInputError][lightning_immiscible.checks.CouplingInputError] for such a cost (``lapjv``
corrupts memory on one and aborts the process).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.solvers_approx import solve_greedy

SolverFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: Name used in ``couple(..., solver=name)``.
        fn: ``(B, B) float64 cost -> (B,) int64`` column index per row.
        exact: Whether the solver returns an optimal assignment.
        priority: Order in which ``solver="auto"`` prefers exact solvers (lower first) for items
            of more than ``LOW_DIM_MAX`` values, or of unknown size.
        low_dim_priority: The same order for items of at most ``LOW_DIM_MAX`` values (2-D points,
            small vectors); ``None``: ``priority``.
        points_priority: The same order for items of at most ``POINTS_DIM_MAX`` values (points in
            the plane or in space); ``None``: ``low_dim_priority``.
        min_batch: ``solver="auto"`` considers the solver only for costs of at least this many rows.

    """

    name: str
    fn: SolverFn
    exact: bool
    priority: int = 100
    low_dim_priority: int | None = None
    points_priority: int | None = None
    min_batch: int = 0


SOLVERS: dict[str, SolverSpec] = {}


def register_solver(
    name: str,
    fn: SolverFn,
    *,
    exact: bool,
    priority: int = 100,
    low_dim_priority: int | None = None,
    points_priority: int | None = None,
    min_batch: int = 0,
) -> None:
    """Registers ``fn`` under ``name`` (replacing an existing entry of that name).

    An exact solver registered with ``priority`` (and ``low_dim_priority``) below 1 becomes
    ``solver="auto"``'s choice for every item dimension.
    """
    SOLVERS[name] = SolverSpec(name, fn, exact, priority, low_dim_priority, points_priority, min_batch)


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


# On 2-D points SciPy beats lapjv and lap.lapjv at B <= 512 and is exact: next after lapjvr there.
register_solver("scipy", solve_scipy, exact=True, priority=50, low_dim_priority=30)


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


class CheckedBackend:
    """An optional exact backend, checked: errors, bad layouts or non-permutations fall back to SciPy.

    Calling it solves like any registered solver (SciPy answers where the backend failed);
    [attempt][lightning_immiscible.solvers.CheckedBackend.attempt] returns the backend's own answer
    or `None`, so that a caller can tell which solver answered
    ([own_answer][lightning_immiscible.solvers.own_answer]).

    Attributes:
        backend: The raw backend (its return value may have any tuple layout).
    """

    def __init__(self, backend: Callable[[np.ndarray], object]) -> None:
        self.backend = backend

    def attempt(self, cost: np.ndarray) -> np.ndarray | None:
        """The backend's permutation for `cost`, or `None` when it raised or returned none."""
        try:
            return permutation_in(self.backend(cost), cost.shape[0])
        except (ValueError, RuntimeError, TypeError, MemoryError):
            return None

    def __call__(self, cost: np.ndarray) -> np.ndarray:
        """The backend's answer to `cost`, or SciPy's where it failed."""
        col = self.attempt(cost)
        return col if col is not None else solve_scipy(cost)


def checked_backend(backend: Callable[[np.ndarray], object]) -> SolverFn:
    """Wraps an optional exact backend in a [CheckedBackend][lightning_immiscible.solvers.CheckedBackend]."""
    return CheckedBackend(backend)


def own_answer(spec: SolverSpec, cost: np.ndarray) -> np.ndarray | None:
    """`spec`'s own answer to `cost`: `None` where its checked backend failed (SciPy would answer).

    Args:
        spec: A registered solver.
        cost: A prepared ``(B, B)`` float64 cost (as `solve` hands it to the solver).

    Returns:
        The column per row; `None` when `spec.fn` is a
        [CheckedBackend][lightning_immiscible.solvers.CheckedBackend] whose backend failed.
    """
    fn = spec.fn
    return fn.attempt(cost) if isinstance(fn, CheckedBackend) else np.asarray(fn(cost), dtype=np.int64)


def _shift_rows(cost: np.ndarray) -> np.ndarray:
    """Subtracts each row's minimum (same optimum).

    ``lapjv`` compares costs with an absolute tolerance, so a large common offset can make it stop
    short of the optimum; shifted costs are solved exactly (``tests/test_solvers.py``).
    """
    return cost - cost.min(axis=1, keepdims=True)


def _columns_of_aligned(out: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """``cols`` of an aligned ``(rows, cols)`` answer whose ``rows`` are ``0..B-1`` (else ``None``).

    Reading it with [permutation_in][lightning_immiscible.solvers.permutation_in] would take ``rows``
    (itself a permutation).
    """
    rows, cols = out
    return np.asarray(cols) if np.array_equal(rows, np.arange(len(rows))) else None


def _register_optional() -> None:
    """Registers the optional exact backends that import (a missing package is not an error)."""
    try:
        import lapjv as _lapjv  # MIT; the fastest dense exact solver measured on high-D costs

        fn = checked_backend(lambda c: _lapjv.lapjv(_shift_rows(c)))
        register_solver("lapjv", fn, exact=True, priority=10, low_dim_priority=40)
    except ImportError:
        pass
    try:
        import lap as _lap  # lapx, MIT
    except ImportError:
        return
    fn = checked_backend(lambda c: _lap.lapjv(c, return_cost=False))
    register_solver("lapx", fn, exact=True, priority=20, low_dim_priority=45)
    if hasattr(_lap, "lapjvr"):  # lapx's Rust solver; the fastest measured on low-dimensional costs
        fn = checked_backend(lambda c: _columns_of_aligned(_lap.lapjvr(c, return_cost=False)))
        register_solver("lapjvr", fn, exact=True, priority=15, low_dim_priority=5)


def solve_pot(cost: np.ndarray) -> np.ndarray | None:
    """Exact assignment with POT's network simplex (``ot.emd``, MIT), or ``None`` if it did not converge.

    With unit marginals the optimal plan it returns is a vertex of the assignment polytope, a
    permutation matrix; a plan that is not (or a run stopped at the iteration limit) gives
    ``None``, and the registered wrapper then asks SciPy. POT is imported on the first call (about
    2 s here, most of it scikit-learn, which POT imports when it is installed).
    """
    import ot  # MIT; imported here: importing POT takes seconds

    ones = np.ones(cost.shape[0])
    plan, log = ot.emd(ones, ones, cost, numItermax=10_000_000, log=True)
    if log.get("result_code") != 1 or not np.all(plan.max(axis=1) > 0.5):
        return None
    return plan.argmax(axis=1).astype(np.int64)


_register_optional()
if importlib.util.find_spec("ot") is not None:  # POT: found, not imported (see solve_pot)
    # auto's choice for points only (POINTS_DIM_MAX), from pools of 256: see docs/performance.md, "POT".
    register_solver("pot", checked_backend(solve_pot), exact=True, priority=60, low_dim_priority=50,
                    points_priority=1, min_batch=256)  # fmt: skip


def _exact_leftovers(cost: np.ndarray) -> np.ndarray:
    """Exact solve of greedy's last (at most 64) rows, in the low-dimensional order (lapjvr first).

    The low-dimensional order because the leftovers' costs behave like low-dimensional ones.
    Through [solve][lightning_immiscible.solvers.solve]: greedy's float32 centring of a cost it was handed
    directly (not through `solve`) can make NaN, which the exact backend must never see.
    """
    return solve(cost, choose_exact_solver(cost.shape[0], dim=1), in_float32_range=True)


register_solver("greedy", lambda c: solve_greedy(c, exact=_exact_leftovers), exact=False, priority=100)


def available_solvers() -> list[str]:
    """Names of the registered solvers, exact ones first in ``auto`` order."""
    return [s.name for s in sorted(SOLVERS.values(), key=lambda s: (not s.exact, s.priority))]


#: Items of at most this many values count as low-dimensional for ``solver="auto"`` (the
#: ``low_dim_priority`` order; measured per data family in ``docs/performance.md``). Every solver
#: on either side is exact, so the boundary costs speed at most, never optimality.
LOW_DIM_MAX = 64

#: Items of at most this many values count as points for ``solver="auto"`` (``pot`` first there,
#: when installed, for pools of at least 256; ``docs/performance.md``, "POT").
POINTS_DIM_MAX = 3


def choose_exact_solver(b: int, dim: int | None = None, among: Collection[str] | None = None) -> str:
    """The exact solver ``solver="auto"`` uses for a ``(b, b)`` cost between items of ``dim`` values.

    A fixed rule, identical on every rank (no timing): among the registered exact solvers whose
    ``min_batch`` is at most ``b``, the one with the lowest ``points_priority`` when
    ``dim <= POINTS_DIM_MAX``, the lowest ``low_dim_priority`` when ``dim <= LOW_DIM_MAX``, else the
    lowest ``priority``. With every optional package installed: ``pot`` for ``dim <= 3`` and
    ``b >= 256``, ``lapjvr`` for the rest of ``dim <= 64``, ``lapjv`` above (or when ``dim`` is
    unknown); the fallbacks follow the measured order (``docs/performance.md``). Above 64 values
    no fixed rule picks the faster of ``lapjv`` and ``lapjvr`` (which one wins depends on the data
    and the pool size), so ``solver="auto"`` races them there
    ([race_candidates][lightning_immiscible.solver_race.race_candidates]).

    Args:
        b: Items per side of the cost matrix.
        dim: Values per item (``x0[0].numel()``); ``None`` when unknown.
        among: Only these registered solvers (e.g. those a benchmark run measured); ``None``: all.

    Returns:
        The name of a registered exact solver.

    Examples:
        ```python
        from lightning_immiscible.solvers import choose_exact_solver

        name = choose_exact_solver(1024, dim=2)  # "pot" when POT is installed, else "lapjvr" with lapx
        ```
    """
    low = dim is not None and dim <= LOW_DIM_MAX
    points = dim is not None and dim <= POINTS_DIM_MAX
    usable = SOLVERS if among is None else {n: s for n, s in SOLVERS.items() if n in among}
    exact = [s for s in usable.values() if s.exact and b >= s.min_batch]

    def rank(s: SolverSpec) -> int:
        if points and s.points_priority is not None:
            return s.points_priority
        return s.low_dim_priority if low and s.low_dim_priority is not None else s.priority

    return min(exact, key=rank).name


def resolve_solver(name: str | SolverSpec, b: int = 0, dim: int | None = None) -> SolverSpec:
    """Returns the solver for ``name``; ``"auto"`` is the solver ``choose_exact_solver(b, dim)`` names.

    A [SolverSpec][lightning_immiscible.solvers.SolverSpec] is returned as it is (an unregistered
    solver for one call, e.g. the callback's timing race).

    Raises:
        ValueError: If ``name`` is not registered.

    """
    if isinstance(name, SolverSpec):
        return name
    if name == "auto":
        return SOLVERS[choose_exact_solver(b, dim)]
    if name not in SOLVERS:
        raise ValueError(
            f"Unknown solver {name!r}. Available: {['auto', *available_solvers()]}; "
            "add your own with lightning_immiscible.solvers.register_solver()."
        )
    return SOLVERS[name]


def solve(
    cost: np.ndarray,
    solver: str | SolverSpec = "auto",
    *,
    dim: int | None = None,
    in_float32_range: bool = False,
) -> np.ndarray:
    """Solves the assignment for a square ``(B, B)`` cost matrix.

    The one gate before every backend: a cost with a NaN or an infinity raises here (no backend
    sees it), and a cost beyond float32's range is scaled into it (by a power of two: exact, same
    optimum), since several backends solve in float32.

    Args:
        cost: ``(B, B)`` cost matrix (any float dtype; converted to float64).
        solver: A name from [available_solvers][lightning_immiscible.solvers.available_solvers],
            ``"auto"``, or an unregistered [SolverSpec][lightning_immiscible.solvers.SolverSpec].
        dim: Values per item the cost was computed from; lets ``"auto"`` pick the solver measured
            fastest for that dimension
            ([choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]).
        in_float32_range: The caller knows every entry fits float32 (e.g. the cost was computed in
            float32): the finiteness check is one sum instead of the pass that finds the largest
            entry (a wrong claim costs that pass, never a wrong answer).

    Returns:
        ``(B,)`` int64 array ``col`` with row ``i`` assigned to column ``col[i]``.

    Raises:
        CouplingInputError: If the cost holds NaN or Inf (reason ``"non_finite"``).
        ValueError: If the cost is not a square matrix.
    """
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"solve() needs a square (B, B) cost matrix, got shape {cost.shape}.")
    if cost.shape[0] == 0:
        return np.arange(0, dtype=np.int64)
    cost = _finite_within_float32(cost, in_float32_range)
    if cost.shape[0] == 1:
        return np.arange(1, dtype=np.int64)
    return np.asarray(resolve_solver(solver, cost.shape[0], dim).fn(cost), dtype=np.int64)


def _finite_within_float32(cost: np.ndarray, in_float32_range: bool) -> np.ndarray:
    """`cost`, checked for NaN/Inf and scaled into float32's range: what a backend may be given.

    One pass over the cost: its sum when the caller vouches that every entry fits float32 (then the
    sum of the ``B * B`` entries is finite exactly when every entry is), else its largest magnitude
    (NaN propagates through ``max``/``min``). Entries above 1e30 are scaled by a power of two
    (exact, same optimum): several backends (``lapjv``, ``greedy``) solve in float32, where entries
    above 3.4e38 (e.g. squared distances of data scaled by 1e20) would become ``inf``, and ``lapjv``
    then corrupts memory.

    Raises:
        CouplingInputError: If an entry is NaN or Inf.
    """
    if in_float32_range and math.isfinite(float(cost.sum())):
        return cost
    top = max(float(cost.max()), -float(cost.min()))  # no |cost| temporary
    if not math.isfinite(top):
        raise CouplingInputError(_non_finite_message(cost), "non_finite")
    return np.ldexp(cost, -int(np.frexp(top)[1])) if top > 1e30 else cost


def _non_finite_message(cost: np.ndarray) -> str:
    """Says how many NaN and Inf entries the cost holds, where they come from and what to do."""
    nan = int(np.isnan(cost).sum())
    inf = int(np.isinf(cost).sum())
    return (
        f"The {cost.shape[0]}x{cost.shape[1]} assignment cost holds {nan} NaN and {inf} Inf "
        "entries, which no solver can assign. They come from NaN/Inf in x0 or the noise, or from "
        "values so large that their distances overflow float64: fix the data pipeline or the model "
        "output (e.g. the encoder) that produced them, or rescale huge data, before coupling."
    )
