"""``solver="auto"`` for [couple][lightning_immiscible.coupling.couple]: a per-process race per cost shape.

For costs between high-dimensional items (D > ``LOW_DIM_MAX``) no fixed rule picks the faster of
the exact solvers (``lapjv`` and ``lapjvr`` trade places with the data and the pool size; see
``docs/performance.md``), so [couple][lightning_immiscible.coupling.couple] (and with it
[CouplingSpec][lightning_immiscible.coupling.CouplingSpec] and
[CouplingCollate][lightning_immiscible.workers.CouplingCollate]) races them once per process and
cost shape ``(B, D, metric)``: on the first ``RACE_WARMUP + RACE_CALLS`` calls of a shape every
candidate solves the same cost and is timed, and the fixed rule's answer
([choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]) is returned; later calls
of that shape use the candidate with the lowest total time over the counted calls. The pairing of
a race call never depends on timing, and every candidate is exact, so every call returns an
optimal assignment; timings only pick the solver of later calls.

Nothing here is shared between processes: each process (each DataLoader worker, each rank) races
on its own. So the group coupling of several ranks
([couple_in_group][lightning_immiscible.distributed.couple_in_group]), where all ranks must solve
with the same solver, does not use it: it keeps the fixed rule, and the callback passes it the
solver its own rank-0 race decided.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from lightning_immiscible.solvers import LOW_DIM_MAX, SOLVERS, SolverFn, SolverSpec, choose_exact_solver

#: Calls per cost shape whose solver times count.
RACE_CALLS = 3
#: Race calls before those, solved by every candidate but not counted (first-call costs).
RACE_WARMUP = 1
#: Smallest pool raced: below it every exact solver takes about a millisecond on these costs.
RACE_MIN_BATCH = 256
#: Most cost shapes raced per process (later shapes use the fixed rule).
RACE_MAX_SHAPES = 64


@dataclass
class ShapeRace:
    """The race of one cost shape: per candidate, its solver times on the counted calls.

    Attributes:
        candidates: Exact solvers raced, the fixed rule's choice first (its answer is returned
            during the race; a tie of the totals goes to the earlier candidate).
        calls: Race calls so far.
        times_ms: Per candidate, its time on each counted call, ms.
        rounds: Calls whose times count.
        warmup: Calls before those whose times do not count.
    """

    candidates: tuple[str, ...]
    calls: int = 0
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    rounds: int = RACE_CALLS
    warmup: int = RACE_WARMUP

    @property
    def done(self) -> bool:
        """Whether every race call was made."""
        return self.calls >= self.warmup + self.rounds

    def record(self, times_ms: dict[str, float]) -> None:
        """Counts one race call's times (`{candidate: ms}`), unless it is a warm-up call."""
        if self.calls >= self.warmup:
            for name in self.candidates:
                self.times_ms.setdefault(name, []).append(times_ms[name])
        self.calls += 1

    def winner(self) -> str:
        """The candidate with the lowest total over the counted calls (the rule's before any)."""
        if not self.times_ms:
            return self.candidates[0]
        return min(self.candidates, key=lambda n: (sum(self.times_ms[n]), self.candidates.index(n)))


def shape_candidates(
    b: int, dim: int, min_batch: int = RACE_MIN_BATCH, among: Collection[str] | None = None
) -> tuple[str, ...]:
    """The exact solvers raced for a ``(b, b)`` cost between items of ``dim`` values.

    The fixed rule's choice, then (for ``dim > LOW_DIM_MAX`` and ``b >= min_batch``) the
    next installed exact solver by ``priority`` other than SciPy, which was never the fastest on
    these costs. A single name means no race. ``among`` limits both to those solvers.
    """
    first = choose_exact_solver(b, dim, among)
    if dim <= LOW_DIM_MAX or b < min_batch:
        return (first,)
    exact = sorted((s for s in SOLVERS.values() if s.exact and s.name != "scipy"), key=lambda s: s.priority)
    return (first, *[s.name for s in exact if s.name != first and (among is None or s.name in among)])[:2]


class SolverCache:
    """Per-process ``solver="auto"`` of the pure coupling: one short paired race per cost shape.

    Thread-safe; the module-level instance ``AUTO_SOLVERS`` is the one
    [couple][lightning_immiscible.coupling.couple] uses.

    Examples:
        ```python
        import torch
        from lightning_immiscible import couple
        from lightning_immiscible.solver_cache import AUTO_SOLVERS

        x0 = torch.rand(300, 3, 8, 8) * 2 - 1
        for _ in range(5):
            couple(x0, torch.randn_like(x0))
        AUTO_SOLVERS.decisions()  # e.g. {(300, 192, "l2"): "lapjv"} with the `fast` extra
        ```
    """

    def __init__(self, min_batch: int = RACE_MIN_BATCH, max_shapes: int = RACE_MAX_SHAPES) -> None:
        self.min_batch, self.max_shapes = min_batch, max_shapes
        self._races: dict[tuple[int, int, str], ShapeRace] = {}
        self._lock = threading.Lock()

    def solver(self, b: int, dim: int, metric: str) -> SolverSpec:
        """The solver for the next ``(b, b)`` cost of this shape: a race call's, or the decided one."""
        key = (b, dim, metric)
        with self._lock:
            race = self._races.get(key)
            if race is None:
                candidates = shape_candidates(b, dim, self.min_batch)
                if len(candidates) == 1 or len(self._races) >= self.max_shapes:
                    return SOLVERS[candidates[0]]
                race = self._races[key] = ShapeRace(candidates)
            if race.done:
                return SOLVERS[race.winner()]
        return SolverSpec(f"race of {', '.join(race.candidates)}", self._racer(race), exact=True)

    def _racer(self, race: ShapeRace) -> SolverFn:
        def run(cost: np.ndarray) -> np.ndarray:
            answers, times = {}, {}
            order = race.candidates[race.calls % 2 :] + race.candidates[: race.calls % 2]
            for name in order:  # alternate who goes first: the cost may still be in the cache
                start = time.perf_counter()
                answers[name] = SOLVERS[name].fn(cost)
                times[name] = (time.perf_counter() - start) * 1e3
            with self._lock:
                if not race.done:
                    race.record(times)
            return answers[race.candidates[0]]

        return run

    def decisions(self) -> dict[tuple[int, int, str], str]:
        """``{(B, D, metric): solver}`` for every shape whose race has ended."""
        with self._lock:
            return {key: race.winner() for key, race in self._races.items() if race.done}

    def clear(self) -> None:
        """Forgets every race (the next calls of each shape race again)."""
        with self._lock:
            self._races.clear()


#: The process's cache, used by [couple][lightning_immiscible.coupling.couple] for ``solver="auto"``.
AUTO_SOLVERS = SolverCache()
