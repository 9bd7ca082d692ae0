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
the lowest total time over the counted batches solves every later batch (from the one after next:
the times of a batch are counted when the next batch's header arrives, so one more batch is raced).
The race costs the other candidates' solves on those few batches.

On low-dimensional items the fixed rule is the fastest by a wide margin, so there is nothing to
race.

Under DDP the race needs no collective of its own: each rank sends its times of a race batch in
the next step's header (the small per-step exchange every rank of the group, or the world for
one-rank groups, makes anyway: [HeaderPeer][lightning_immiscible.distributed.HeaderPeer]), and the
race advances only from the group's gathered header rows, which are the same on every rank of the
group. So every rank of a group counts the same rounds and takes the same decision at the same
step (a candidate's time in a round is the slowest rank's: the group waits for it). A race is kept
per ``(group size, D)`` while batches of other sizes come and go (resolution buckets), it ends
after at most ``2 x (RACE_WARMUP + RACE_ROUNDS)`` race batches, and at most
``MAX_RACE_BATCHES`` race batches run per group size in a fit: after that, undecided pools use the
fixed rule. The ranks of a group also send their solver's identity in the header, and a group
whose ranks would solve with different solvers fails on every rank with a message naming them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_immiscible.solvers import LOW_DIM_MAX, SOLVERS, SolverSpec, choose_exact_solver

#: Batches on which every candidate solves the same cost and its time counts.
RACE_ROUNDS = 3
#: Race batches before those whose times do not count (first-call costs).
RACE_WARMUP = 1
#: Most race batches per coupling-group size in a fit (all pool shapes together); then the fixed rule.
MAX_RACE_BATCHES = 24


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
class OneRace:
    """One race: every candidate solves each race batch; the group's times, per candidate.

    Attributes:
        candidates: Solvers raced (at most two), the fixed rule's choice first (its assignment is
            used; ties of the total time go to the earlier candidate).
        batch: This rank's local batch size whose times count; a race batch of another size (e.g.
            a short last batch) is reported without times, so the round is not counted.
        ranks: Ranks in the coupling group.
        dim: Values per item.
        rounds: Counted rounds needed for a decision.
        warmup: Reported rounds before them that do not count (first-call costs).
        step: Race batches this rank ran (equal on every rank of the group: the state that decides
            whether a batch is a race batch advances only from the group's header rows).
        reports: Rounds the group reported (from the header rows).
        times_us: Per candidate, the group's time on each counted round (slowest rank), µs.
        pending_ms: Times measured on the current batch, not yet reported.
    """

    candidates: tuple[str, ...]
    batch: int
    ranks: int
    dim: int
    rounds: int = RACE_ROUNDS
    warmup: int = RACE_WARMUP
    step: int = 0
    reports: int = 0
    times_us: dict[str, list[int]] = field(default_factory=dict)
    pending_ms: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """``(ranks, dim)``: what the decision applies to."""
        return (self.ranks, self.dim)

    @property
    def counted(self) -> int:
        """Rounds whose times count."""
        return len(self.times_us.get(self.candidates[0], []))

    @property
    def done(self) -> bool:
        """Whether enough rounds were counted for a decision."""
        return self.counted >= self.rounds

    @property
    def exhausted(self) -> bool:
        """Whether the race ran out of batches (rounds kept failing to count): decide with what there is."""
        return self.step >= 2 * (self.warmup + self.rounds)

    def solver(self) -> SolverSpec:
        """An exact solver for one race batch: every candidate solves and is timed; the first's answer."""

        def race(cost: np.ndarray) -> np.ndarray:
            answers = []
            for name in self.candidates:
                start = time.perf_counter()
                answers.append(SOLVERS[name].fn(cost))
                # summed: a conditional batch solves one block per label
                self.pending_ms[name] = self.pending_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3
            return answers[0]

        return SolverSpec(f"race of {', '.join(self.candidates)}", race, exact=True)

    def report(self, batch: int) -> dict[str, int]:
        """This rank's header fields for the race batch just solved (``race_us* = -1``: not counted)."""
        times = [self.pending_ms.get(n) for n in self.candidates]
        self.pending_ms = {}
        ok = batch == self.batch and all(t is not None for t in times)
        us = [round(1e3 * t) if ok and t is not None else -1 for t in times] + [-1, -1]
        return {"race_ranks": self.ranks, "race_dim": self.dim, "race_us0": us[0], "race_us1": us[1]}

    def count(self, us_per_rank: list[list[int]]) -> None:
        """Counts one reported round: per candidate, each rank's µs (``-1`` anywhere: not counted)."""
        self.reports += 1
        if self.reports <= self.warmup or any(t < 0 for ts in us_per_rank for t in ts):
            return
        for i, name in enumerate(self.candidates):
            self.times_us.setdefault(name, []).append(max(ts[i] for ts in us_per_rank))

    def winner(self) -> str:
        """The candidate with the lowest total time over the counted rounds (ties, none: the earlier)."""
        return min(self.candidates, key=lambda n: (sum(self.times_us.get(n, [])), self.candidates.index(n)))

    def describe(self, chosen: str) -> str:
        """One log line: each candidate's total time over the same batches, and the choice."""
        raced = ", ".join(f"{n} {sum(self.times_us.get(n, [])) / 1e3:.2f} ms" for n in self.candidates)
        slowest = ", the slowest rank's" if self.ranks > 1 else ""
        return (
            f"ImmiscibleCoupling: solver='auto' raced {raced} (solver time on the same {self.counted} "
            f"batches{slowest}, pools of {self.batch * self.ranks} items of {self.dim} values); "
            f"using {chosen!r}."
        )


class AutoSolver:
    """``solver="auto"`` over a fit: the decided solver per (group size, D), or the race deciding it.

    Keyed by the coupling group's size and the item dimension, both equal on every rank of a group
    (a group that grows, as with ``scope="auto"``, races again for its larger pools). Per batch the
    caller solves with [solver_for][lightning_immiscible.solver_race.AutoSolver.solver_for]'s
    answer, passes this object as the ``peer`` of
    [couple_in_group][lightning_immiscible.distributed.couple_in_group] (which sends
    ``header_fields`` and hands the group's rows to ``receive_headers``, where races are decided),
    then calls ``record``. No collective of its own.

    Attributes:
        decided: The solver per ``(group size, D)``.
        races: Races in progress per ``(group size, D)``.
        raced: Race batches run per group size (bounded by ``max_batches``).
        notes: Log lines of decisions not yet logged (the caller pops them).
    """

    def __init__(
        self, rounds: int = RACE_ROUNDS, warmup: int = RACE_WARMUP, max_batches: int = MAX_RACE_BATCHES
    ) -> None:
        self.rounds = rounds
        self.warmup = warmup
        self.max_batches = max_batches
        self.decided: dict[tuple[int, int], str] = {}
        self.races: dict[tuple[int, int], OneRace] = {}
        self.raced: dict[int, int] = {}
        self.notes: list[str] = []
        self._racing: OneRace | None = None  # the race of the batch solver_for last answered
        self._report: dict[str, int] = {}

    def solver_for(self, batch: int, ranks: int, dim: int) -> str | SolverSpec:
        """The solver for a batch of ``batch`` local items of ``dim`` values in a group of ``ranks``.

        Returns:
            A registered name, or the race's solver during a race (a decision without a race is
            added to ``notes``).
        """
        key = (ranks, dim)
        self._racing = None
        if key in self.decided:
            return self.decided[key]
        race = self.races.get(key)
        if race is None:
            candidates = race_candidates(batch * ranks, dim)
            if len(candidates) == 1:
                return self._decide(key, candidates[0], self._no_race_note(candidates[0], batch * ranks, dim))
            race = self.races[key] = OneRace(candidates, batch, ranks, dim, self.rounds, self.warmup)
        if race.exhausted or self.raced.get(ranks, 0) >= self.max_batches:
            why = (
                "the race ran out of batches" if race.exhausted else "race batches for this group size spent"
            )
            return self._decide(key, race.winner(), f"{race.describe(race.winner())} ({why})")
        race.step += 1
        self.raced[ranks] = self.raced.get(ranks, 0) + 1
        self._racing = race
        return race.solver()

    @property
    def racing(self) -> OneRace | None:
        """The race of the batch ``solver_for`` last answered (``None``: not a race batch)."""
        return self._racing

    def record(self, batch: int) -> None:
        """Ends the batch ``solver_for`` was last asked about: a race batch's times go in the next header."""
        if self._racing is not None:
            self._report = self._racing.report(batch)
        self._racing = None

    def header_fields(self) -> dict[str, int]:
        """The last race batch's report, sent once (zeros when there is none)."""
        report, self._report = self._report, {}
        return report

    def receive_headers(self, rows: dict[str, list[int]]) -> None:
        """Counts the group's reported race round (identical rows on every rank: identical decisions)."""
        keys = set(zip(rows["race_ranks"], rows["race_dim"], strict=True))
        if len(keys) != 1:
            return  # ranks that report different races (or some none) count nothing
        key = next(iter(keys))
        race = self.races.get(key)
        if race is None or key in self.decided:
            return
        race.count([[a, b] for a, b in zip(rows["race_us0"], rows["race_us1"], strict=True)])
        if race.done:
            self._decide(key, race.winner(), race.describe(race.winner()))

    def _decide(self, key: tuple[int, int], name: str, note: str) -> str:
        self.decided[key] = name
        self.races.pop(key, None)
        self.notes.append(note)
        return name

    @staticmethod
    def _no_race_note(name: str, pool: int, dim: int) -> str:
        return (
            f"ImmiscibleCoupling: solver='auto' uses {name!r} for pools of {pool} items of {dim} values "
            f"(no race: the fastest measured for D <= {LOW_DIM_MAX}, or the only exact solver installed)."
        )

    def extra_ms(self) -> float:
        """Solver time of the race's other candidates on the batch being solved (not the used one's), ms."""
        race = self._racing
        return 0.0 if race is None else sum(race.pending_ms.get(n, 0.0) for n in race.candidates[1:])

    def state_dict(self) -> dict[str, Any]:
        """The decisions, as ``[[ranks, dim, solver], ...]``, and race batches per group size."""
        return {
            "decided": [[r, d, n] for (r, d), n in self.decided.items()],
            "raced": [[r, n] for r, n in self.raced.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores decisions (those of solvers not registered here are dropped: raced again)."""
        self.decided = {(int(r), int(d)): str(n) for r, d, n in state.get("decided", []) if n in SOLVERS}
        self.raced = {int(r): int(n) for r, n in state.get("raced", [])}


class SolverRace(AutoSolver):
    """Interim adapter of `AutoSolver` to the group coupling's race interface (pool-size keyed)."""

    def solver_for(self, pool: int, dim: int, metric: str = "l2") -> str | SolverSpec:  # type: ignore[override]
        """The solver for a pool of `pool` items (the group's agreed total) of `dim` values."""
        return super().solver_for(pool, 1, dim)

    def record(self) -> None:  # type: ignore[override]
        """Ends the batch just solved."""
        if self._racing is not None:
            super().record(self._racing.batch)

    def header_fields(self) -> dict[str, int]:
        """The race fields of this step's header."""
        report = super().header_fields()
        return {("race_pool" if k == "race_ranks" else k): v for k, v in report.items()}

    def receive_headers(self, rows: dict[str, list[int]]) -> None:
        """Counts the group's reported round."""
        pools = rows["race_pool"]
        super().receive_headers({**rows, "race_ranks": [1] * len(pools), "race_dim": rows["race_dim"]})

    def pop_notes(self) -> list[str]:
        """Decisions made since the last call."""
        notes, self.notes = self.notes, []
        return notes
