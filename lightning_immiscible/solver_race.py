"""``solver="auto"`` in training: a short race between the exact solvers that measure close.

On costs between high-dimensional items (D > ``LOW_DIM_MAX``: MNIST, latents, images) neither
``lapjv`` nor ``lapjvr`` is the faster one for a whole family: which one wins depends on the data
and the pool size (``docs/performance.md``, "Choosing a solver"), and even differs from one batch
to the next of the same data. A fixed rule of (B, D) therefore misses the faster solver by up to
1.5x there. [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] instead races
the candidates on the first coupled batches of a fit: batch ``i`` of the race is solved by
candidate ``i mod n`` (every call is a real, exact solve, so the race costs only the difference
between the candidates on those few batches), then the candidate with the lowest median solver time
is used for the rest of the run. On low-dimensional items the fixed rule is already the fastest by a
wide margin, so there is nothing to race.

The schedule is a function of the race's step counter only, so every rank of a DDP group solves a
given batch with the same solver; the decision is taken on rank 0 and broadcast by the callback.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_immiscible.solvers import LOW_DIM_MAX, SOLVERS, choose_exact_solver

#: Timed batches per candidate before ``solver="auto"`` decides.
RACE_ROUNDS = 3


def race_candidates(b: int, dim: int, n: int = 2) -> tuple[str, ...]:
    """The exact solvers ``solver="auto"`` races for a ``(b, b)`` cost between items of ``dim`` values.

    Args:
        b: Items per side of the cost matrix (the coupling pool).
        dim: Values per item.
        n: Most candidates to race.

    Returns:
        For ``dim > LOW_DIM_MAX``: up to ``n`` installed exact solvers, in the rule's order
        (``lapjv``, ``lapjvr`` with every optional package installed). Otherwise (and when only one
        exact solver is installed): the rule's choice alone, i.e. no race.

    Examples:
        ```python
        from lightning_immiscible.solver_race import race_candidates

        race_candidates(256, dim=784)  # ("lapjv", "lapjvr") with the `fast` extra installed
        race_candidates(256, dim=2)  # ("lapjvr",): nothing to race
        ```
    """
    first = choose_exact_solver(b, dim)
    if dim <= LOW_DIM_MAX:
        return (first,)
    exact = sorted((s for s in SOLVERS.values() if s.exact), key=lambda s: s.priority)
    return (first, *[s.name for s in exact if s.name != first])[:n]


@dataclass
class SolverRace:
    """The state of one race: which candidate solves which batch, and the solver times seen.

    Attributes:
        candidates: Solvers raced, in the rule's order (ties go to the earlier one).
        batch: Local batch size whose times count; other batches are solved in turn but not
            timed (e.g. a short last batch).
        ranks: Ranks in the coupling group.
        dim: Values per item.
        rounds: Timed batches per candidate.
        step: Race batches so far (equal on every rank: it advances once per coupled batch).
        times_ms: Solver times per candidate, ms.
    """

    candidates: tuple[str, ...]
    batch: int
    ranks: int
    dim: int
    rounds: int = RACE_ROUNDS
    step: int = 0
    times_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """``(ranks, dim)``: what the decision applies to."""
        return (self.ranks, self.dim)

    @property
    def done(self) -> bool:
        """Whether every candidate had its turns (``rounds`` batches each)."""
        return self.step >= self.rounds * len(self.candidates)

    def next_solver(self) -> str:
        """The solver for the next race batch (round robin by ``step``)."""
        return self.candidates[self.step % len(self.candidates)]

    def record(self, solver: str, batch: int, solve_ms: float) -> None:
        """Counts one race batch of ``batch`` local items, solved by ``solver`` in ``solve_ms``."""
        self.step += 1
        if batch == self.batch:
            self.times_ms.setdefault(solver, []).append(solve_ms)

    def winner(self) -> str:
        """The candidate with the lowest median time (untimed ones last; ties: the rule's order)."""

        def key(name: str) -> tuple[float, int]:
            times = self.times_ms.get(name)
            return (statistics.median(times) if times else float("inf"), self.candidates.index(name))

        return min(self.candidates, key=key)

    def describe(self, chosen: str) -> str:
        """One log line: each candidate's median time and the choice."""
        raced = ", ".join(
            f"{n} {statistics.median(self.times_ms[n]):.2f} ms" if n in self.times_ms else f"{n} untimed"
            for n in self.candidates
        )
        return (
            f"ImmiscibleCoupling: solver='auto' raced {raced} (median solver time over {self.rounds} "
            f"batches each, pools of {self.batch * self.ranks} items of {self.dim} values); using {chosen!r}."
        )


class AutoSolver:
    """``solver="auto"`` over a fit: the decided solver per (group size, D), or the race deciding it.

    Keyed by the coupling group's size and the item dimension, both equal on every rank (a group
    that grows, as with ``scope="auto"``, races again for its larger pools). The caller solves each
    batch with [solver_for][lightning_immiscible.solver_race.AutoSolver.solver_for], reports the
    solver time with ``record`` and calls ``finish`` after each batch with a broadcast from rank 0.
    """

    def __init__(self, rounds: int = RACE_ROUNDS) -> None:
        self.rounds = rounds
        self.decided: dict[tuple[int, int], str] = {}
        self.race: SolverRace | None = None
        self._racing = False  # whether solver_for's last answer was a race batch

    def solver_for(self, batch: int, ranks: int, dim: int) -> tuple[str, str | None]:
        """The solver for a batch of ``batch`` local items of ``dim`` values in a group of ``ranks``.

        Returns:
            ``(solver, note)``: ``note`` is a log line the first time a key is decided without a
            race (a single candidate), else ``None``.
        """
        key = (ranks, dim)
        self._racing = False
        if key in self.decided:
            return self.decided[key], None
        if self.race is None or self.race.key != key:
            candidates = race_candidates(batch * ranks, dim)
            if len(candidates) == 1:
                self.decided[key] = candidates[0]
                return candidates[0], (
                    f"ImmiscibleCoupling: solver='auto' uses {candidates[0]!r} for pools of {batch * ranks} "
                    f"items of {dim} values (no race: the fastest measured for D <= {LOW_DIM_MAX}, or the "
                    "only exact solver installed)."
                )
            self.race = SolverRace(candidates, batch, ranks, dim, self.rounds)
        self._racing = True
        return self.race.next_solver(), None

    def record(self, solver: str, batch: int, solve_ms: float) -> None:
        """Reports the solver time of the batch ``solver_for`` was last asked about (counted if racing)."""
        if self._racing and self.race is not None:
            self.race.record(solver, batch, solve_ms)
        self._racing = False

    def finish(self, broadcast: Callable[[int], int]) -> str | None:
        """Ends a finished race with rank 0's winner: ``broadcast(index)`` returns rank 0's index.

        Call on every rank after every batch (a collective only when a race just ended, at the same
        batch on every rank). Returns the log line of a decision, else ``None``.
        """
        race = self.race
        if race is None or not race.done:
            return None
        chosen = race.candidates[int(broadcast(race.candidates.index(race.winner())))]
        self.decided[race.key] = chosen
        self.race = None
        return race.describe(chosen)

    def state_dict(self) -> dict[str, Any]:
        """The decisions, as ``[[ranks, dim, solver], ...]`` (a race in progress starts over)."""
        return {"decided": [[r, d, n] for (r, d), n in self.decided.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores decisions (those of solvers not registered here are dropped: raced again)."""
        self.decided = {(int(r), int(d)): str(n) for r, d, n in state.get("decided", []) if n in SOLVERS}
