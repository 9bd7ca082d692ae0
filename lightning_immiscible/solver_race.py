"""``solver="auto"`` in training: a short, paired race between the exact solvers that measure close.

On costs between high-dimensional items (D > ``LOW_DIM_MAX``: MNIST, latents, images) neither
``lapjv`` nor ``lapjvr`` is the faster one for a whole family: which one wins depends on the data
and the pool size (``docs/performance.md``, "Choosing a solver"), and the ratio of their times
changes from one batch of the same data to the next (0.5-2x at B = 256-512). So no fixed rule of
(B, D) picks the faster one, and neither does a race that gives each solver different batches.
[ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] therefore races the
candidates *on the same batches*: on each of the first ``RACE_WARMUP + RACE_ROUNDS`` coupled batches
of a fit, every candidate solves the same cost and is timed, and the first candidate's (the fixed
rule's) assignment is used; all are exact, so the pairing is the rule's. The first batch's times do
not count (a solver's first call in a process carries one-off costs: about 16 ms for ``lapjv`` in
the latent-diffusion example, more than its whole solve at B = 128-256). Then the candidate with
the lowest total time over the counted batches solves every later batch. The race costs the other
candidates' solves on those few batches.

On low-dimensional items the fixed rule is the fastest by a wide margin, so there is nothing to
race. Under DDP the race's batches are the same on every rank (its first batches), each rank uses
the first candidate's assignment during the race, and the decision is taken on rank 0 and
broadcast by the callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_immiscible.solvers import LOW_DIM_MAX, SOLVERS, SolverSpec, choose_exact_solver

#: Batches on which every candidate solves the same cost and its time counts.
RACE_ROUNDS = 3
#: Race batches before those whose times do not count (first-call costs).
RACE_WARMUP = 1


def race_candidates(b: int, dim: int, n: int = 2) -> tuple[str, ...]:
    """The exact solvers ``solver="auto"`` races for a ``(b, b)`` cost between items of ``dim`` values.

    Args:
        b: Items per side of the cost matrix (the coupling pool).
        dim: Values per item.
        n: Most candidates to race.

    Returns:
        For ``dim > LOW_DIM_MAX``: up to ``n`` installed exact solvers, the fixed rule's choice
        first, then by ``priority`` (``lapjv``, ``lapjvr`` with every optional package installed).
        Otherwise (and when only one exact solver is installed): the rule's choice alone, i.e. no
        race.

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
    """One race: every candidate solves each race batch; the times it took, per candidate.

    Attributes:
        candidates: Solvers raced, the fixed rule's choice first (its assignment is used; ties of
            the total time go to the earlier candidate).
        batch: Local batch size whose times count; a race batch of another size (e.g. a short
            last batch) counts as a round but not in the times.
        ranks: Ranks in the coupling group.
        dim: Values per item.
        rounds: Race batches whose times count.
        warmup: Race batches before them, solved by every candidate but not counted.
        step: Race batches so far (equal on every rank: one per coupled batch).
        times_ms: Per candidate, its solver time on each counted race batch, ms (aligned lists).
        pending_ms: Times measured on the current batch, not yet counted.
    """

    candidates: tuple[str, ...]
    batch: int
    ranks: int
    dim: int
    rounds: int = RACE_ROUNDS
    warmup: int = RACE_WARMUP
    step: int = 0
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    pending_ms: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """``(ranks, dim)``: what the decision applies to."""
        return (self.ranks, self.dim)

    @property
    def done(self) -> bool:
        """Whether all race batches were solved."""
        return self.step >= self.warmup + self.rounds

    def solver(self) -> SolverSpec:
        """An exact solver for one race batch: every candidate solves and is timed; the first's answer."""

        def race(cost: np.ndarray) -> np.ndarray:
            answers = []
            for name in self.candidates:
                start = time.perf_counter()
                answers.append(SOLVERS[name].fn(cost))
                self.pending_ms[name] = (time.perf_counter() - start) * 1e3
            return answers[0]

        return SolverSpec(f"race of {', '.join(self.candidates)}", race, exact=True)

    def record(self, batch: int) -> None:
        """Ends one race batch of ``batch`` local items (counted past the warm-up, at the race's size)."""
        self.step += 1
        counted = self.step > self.warmup and batch == self.batch
        if counted and len(self.pending_ms) == len(self.candidates):
            for name, ms in self.pending_ms.items():
                self.times_ms.setdefault(name, []).append(ms)
        self.pending_ms = {}

    def winner(self) -> str:
        """The candidate with the lowest total time over the counted batches (ties: the earlier)."""
        return min(self.candidates, key=lambda n: (sum(self.times_ms.get(n, [])), self.candidates.index(n)))

    def describe(self, chosen: str) -> str:
        """One log line: each candidate's total time over the same batches, and the choice."""
        raced = ", ".join(f"{n} {sum(self.times_ms.get(n, [])):.2f} ms" for n in self.candidates)
        counted = len(self.times_ms.get(self.candidates[0], []))
        return (
            f"ImmiscibleCoupling: solver='auto' raced {raced} (solver time on the same {counted} "
            f"batches, pools of {self.batch * self.ranks} items of {self.dim} values); using {chosen!r}."
        )


class AutoSolver:
    """``solver="auto"`` over a fit: the decided solver per (group size, D), or the race deciding it.

    Keyed by the coupling group's size and the item dimension, both equal on every rank (a group
    that grows, as with ``scope="auto"``, races again for its larger pools). Per batch, the caller
    solves with [solver_for][lightning_immiscible.solver_race.AutoSolver.solver_for]'s answer, then
    calls ``record`` and, on every rank, ``finish`` with a broadcast from rank 0.
    """

    def __init__(self, rounds: int = RACE_ROUNDS, warmup: int = RACE_WARMUP) -> None:
        self.rounds = rounds
        self.warmup = warmup
        self.decided: dict[tuple[int, int], str] = {}
        self.race: SolverRace | None = None
        self._racing = False  # whether solver_for's last answer was a race batch

    def solver_for(self, batch: int, ranks: int, dim: int) -> tuple[str | SolverSpec, str | None]:
        """The solver for a batch of ``batch`` local items of ``dim`` values in a group of ``ranks``.

        Returns:
            ``(solver, note)``: a registered name, or the race's solver during a race; ``note`` is
            a log line the first time a key is decided without a race, else ``None``.
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
            self.race = SolverRace(candidates, batch, ranks, dim, self.rounds, self.warmup)
        self._racing = True
        return self.race.solver(), None

    def record(self, batch: int) -> None:
        """Ends the batch ``solver_for`` was last asked about (counted if it was a race batch)."""
        if self._racing and self.race is not None:
            self.race.record(batch)
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
