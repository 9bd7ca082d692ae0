"""``solver="auto"``'s one race: where no fixed rule picks the faster exact solver, measure on the same costs.

For items of more than ``LOW_DIM_MAX`` values, which of ``lapjv`` and ``lapjvr`` is faster depends
on the data and the pool size and changes from batch to batch (``docs/performance.md``, "Choosing a
solver"). So ``solver="auto"`` races them per cost shape ``(pool, D, metric)``, with one set of rules:

- **Candidates** ([race_candidates][lightning_immiscible.solver_race.race_candidates]): for D >
  ``LOW_DIM_MAX`` and pools of at least ``RACE_MIN_POOL``, the fixed rule's choice and the next
  installed exact solver other than SciPy; elsewhere the rule alone (no race).
- **A race batch**: every candidate solves the same cost, timed (who goes first alternates); the
  first candidate's (the rule's) answer is used: every candidate is exact, timings never pick a pairing.
- **Counting**: the first ``RACE_WARMUP`` race batches of a shape in each process do not count
  (first-call costs). A round's time is the slowest reporter's (a group waits for its slowest
  rank). After ``RACE_ROUNDS`` counted rounds the lowest total wins (ties: the rule's choice).
- **Fallbacks**: a candidate whose backend failed on a race batch (SciPy answered for it, see
  [CheckedBackend][lightning_immiscible.solvers.CheckedBackend]) is dropped from that race; neither
  its time nor SciPy's is credited to it. The last candidate left wins.
- **Bounds**: a race decides on what it has after ``2 x RACE_ROUNDS`` race batches that should have
  counted; an owner runs at most ``MAX_RACE_BATCHES`` race batches (then undecided shapes take their
  leader, new shapes the rule).

Owners: [AutoSolver][lightning_immiscible.solver_race.AutoSolver] for the callback's group coupling
(times travel in the per-step header; every rank counts the same rows and decides alike, with no
collective of its own) and [ProcessRace][lightning_immiscible.process_race.ProcessRace] for
[couple][lightning_immiscible.coupling.couple] (``AUTO_RACE``, per process) and for each
[CouplingCollate][lightning_immiscible.workers.CouplingCollate] (workers' reports travel back in the
batches).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_immiscible.solvers import (
    LOW_DIM_MAX,
    SOLVERS,
    SolverSpec,
    choose_exact_solver,
    own_answer,
    solve_scipy,
)

#: Race batches of a shape whose times count (after the warm-up).
RACE_ROUNDS = 3
#: Race batches of a shape in each process before those, solved by every candidate but not counted.
RACE_WARMUP = 1
#: Smallest pool raced: below it the exact solvers' times differ little (``docs/performance.md``).
RACE_MIN_POOL = 256
#: Most race batches per owner: per fit for the callback, per collate, per process for `couple()`.
MAX_RACE_BATCHES = 24
#: A reported time: none (a warm-up batch, or not measured): the round is not counted.
NO_TIME = -1
#: A reported time: the candidate's backend failed and SciPy answered: the candidate is dropped.
FELL_BACK = -2

Key = tuple[int, int, str]
"""``(pool, D, metric)``: the cost shape a race and its decision belong to."""


def race_candidates(
    pool: int, dim: int, among: Collection[str] | None = None, min_pool: int | None = None
) -> tuple[str, ...]:
    """The exact solvers ``solver="auto"`` races for a ``(pool, pool)`` cost between items of ``dim`` values.

    Args:
        pool: Items per side of the cost matrix (a group's agreed pool).
        dim: Values per item.
        among: Only these registered solvers; ``None``: all.
        min_pool: Smallest pool raced; ``None``: ``RACE_MIN_POOL``.

    Returns:
        The fixed rule's choice, then (for ``dim > LOW_DIM_MAX`` and ``pool >= min_pool``) the next
        installed exact solver by ``priority`` other than SciPy (``("lapjv", "lapjvr")`` with the
        ``fast`` extra). A single name: no race.
    """
    first = choose_exact_solver(pool, dim, among)
    if dim <= LOW_DIM_MAX or pool < (RACE_MIN_POOL if min_pool is None else min_pool):
        return (first,)
    skip = ("scipy", first)  # SciPy was never the fastest on these costs
    exact = [s for s in SOLVERS.values() if s.exact and pool >= s.min_batch and s.name not in skip]
    rest = [s.name for s in sorted(exact, key=lambda s: s.priority) if among is None or s.name in among]
    return (first, *rest)[:2]


@dataclass
class SolverRace:
    """The race of one cost shape.

    Attributes:
        key: ``(pool, D, metric)``.
        candidates: The candidates still in the race, the fixed rule's choice first.
        rounds: Counted rounds needed for a decision.
        issued: Race batches that should have counted (warm-ups excluded): bounds the race.
        reporters: Most reporters of a counted round (ranks of a group).
        times_us: Per candidate, its time on each counted round (the slowest reporter's), µs.
    """

    key: Key
    candidates: tuple[str, ...]
    rounds: int = RACE_ROUNDS
    issued: int = 0
    reporters: int = 1
    times_us: dict[str, list[int]] = field(default_factory=dict)

    @property
    def counted(self) -> int:
        """Rounds counted so far."""
        return len(self.times_us.get(self.candidates[0], []))

    @property
    def done(self) -> bool:
        """Whether the race can decide: enough counted rounds, or one candidate left."""
        return self.counted >= self.rounds or len(self.candidates) == 1

    @property
    def exhausted(self) -> bool:
        """Whether the race ran out of batches (rounds kept failing to count): decide with what there is."""
        return self.issued >= 2 * self.rounds

    def count(self, us_per_reporter: Sequence[Sequence[int]]) -> list[str]:
        """Counts one round: per reporter, per candidate, µs (``NO_TIME`` anywhere: not counted).

        Returns:
            The candidates dropped because some reporter's backend fell back (``FELL_BACK``).
        """
        failed = {i for ts in us_per_reporter for i, t in enumerate(ts) if t == FELL_BACK}
        dropped = [self.candidates[i] for i in sorted(failed)]
        if dropped:
            self.candidates = tuple(n for n in self.candidates if n not in dropped) or self.candidates[:1]
            self.times_us = {n: t for n, t in self.times_us.items() if n in self.candidates}
        elif all(t >= 0 for ts in us_per_reporter for t in ts):
            for i, name in enumerate(self.candidates):
                self.times_us.setdefault(name, []).append(max(ts[i] for ts in us_per_reporter))
            self.reporters = max(self.reporters, len(us_per_reporter))
        return dropped

    def winner(self) -> str:
        """The candidate with the lowest total over the counted rounds (ties, none: the earlier)."""
        return min(self.candidates, key=lambda n: (sum(self.times_us.get(n, [])), self.candidates.index(n)))

    def describe(self, chosen: str) -> str:
        """Each candidate's total time over the same batches, and the choice (one log line's end)."""
        shape = f"pools of {self.key[0]} items of {self.key[1]} values"
        if not self.counted:
            return f"solver='auto' uses {chosen!r} for {shape} (no race batch counted)."
        raced = ", ".join(f"{n} {sum(self.times_us.get(n, [])) / 1e3:.2f} ms" for n in self.candidates)
        slowest = ", the slowest rank's" if self.reporters > 1 else ""
        return (
            f"solver='auto' raced {raced} (solver time on the same {self.counted} batches{slowest}, "
            f"{shape}); using {chosen!r}."
        )


@dataclass
class RaceBatch:
    """One race batch: every candidate solves each cost given to its solver, timed.

    Attributes:
        key: The race's cost shape.
        candidates: The candidates, the fixed rule's first (whose answer is used).
        order: The order they run in.
        warmup: Whether its times do not count (a warm-up batch of this process).
        times_ms: Per candidate, its time on the costs solved so far, ms.
        fell_back: The candidates whose backend failed on one of them.
    """

    key: Key
    candidates: tuple[str, ...]
    order: tuple[str, ...]
    warmup: bool
    times_ms: dict[str, float] = field(default_factory=dict)
    fell_back: set[str] = field(default_factory=set)

    def solve(self, cost: np.ndarray) -> np.ndarray:
        """Every candidate solves `cost`; the first candidate's answer (SciPy's where it fell back)."""
        answers = {}
        for name in self.order:
            start = time.perf_counter()
            answers[name] = own_answer(SOLVERS[name], cost)
            self.times_ms[name] = self.times_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3
            if answers[name] is None:
                self.fell_back.add(name)
        first = answers[self.candidates[0]]
        return first if first is not None else solve_scipy(cost)

    def spec(self) -> SolverSpec:
        """The batch's solver (unregistered, exact)."""
        return SolverSpec(f"race of {', '.join(self.candidates)}", self.solve, exact=True)

    def times_us(self) -> list[int]:
        """Per candidate: ``FELL_BACK`` (even on a warm-up), ``NO_TIME`` (a warm-up, not solved) or µs."""
        return [FELL_BACK if n in self.fell_back else NO_TIME if self.warmup or n not in self.times_ms
                else round(1e3 * self.times_ms[n]) for n in self.candidates]  # fmt: skip

    def extra_ms(self) -> float:
        """Time of the candidates whose answer was not used, ms."""
        return sum(self.times_ms.get(n, 0.0) for n in self.candidates[1:])


class RaceBook:
    """Races and decisions per cost shape ``(pool, D, metric)``, with the bounds: what every owner shares.

    Thread-safe. Picklable: a copy in another process (a spawned or forked DataLoader worker) keeps
    the races and decisions; its warm-ups start again there.

    Args:
        rounds: Counted rounds per race.
        warmup: Race batches of a shape per process that do not count.
        max_batches: Most race batches run or credited until the next ``reset``.
        min_pool: Smallest pool raced; ``None``: ``RACE_MIN_POOL`` at each call.
        label: Names the owner in the log lines (``pop_notes``).

    Attributes:
        decided: The solver per decided shape.
        races: The races in progress per shape.
        raced: Race batches run or credited since the last ``reset``.
        among: Only these registered solvers (a benchmark replaying a saved run); ``None``: all.
    """

    def __init__(
        self,
        rounds: int = RACE_ROUNDS,
        warmup: int = RACE_WARMUP,
        max_batches: int = MAX_RACE_BATCHES,
        min_pool: int | None = None,
        label: str = "ImmiscibleCoupling",
    ) -> None:
        self.rounds, self.warmup, self.max_batches = rounds, warmup, max_batches
        self.min_pool, self.label = min_pool, label
        self.among: Collection[str] | None = None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forgets every race, decision and note (a new fit)."""
        self.decided: dict[Key, str] = {}
        self.races: dict[Key, SolverRace] = {}
        self.raced = 0
        self._notes: list[str] = []
        self._warm: dict[Key, int] = {}  # race batches per shape in this process
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def choose(self, pool: int, dim: int, metric: str) -> str | RaceBatch:
        """The solver for the next cost of this shape: the decided one, the rule's, or a race batch."""
        key = (pool, dim, metric)
        with self._lock:
            if key in self.decided:
                return self.decided[key]
            race = self.races.get(key)
            if race is None:
                race = self._start(key)
            if race is None:
                return self._rule(key)
            if race.exhausted or self.raced >= self.max_batches:
                why = "the race ran out of batches" if race.exhausted else "race batches spent"
                return self._decide(race, why)
            return self._issue(race)

    def _start(self, key: Key) -> SolverRace | None:
        candidates = race_candidates(key[0], key[1], self.among, self.min_pool)
        if len(candidates) == 1 or self.raced >= self.max_batches:
            return None
        race = self.races[key] = SolverRace(key, candidates, self.rounds)
        return race

    def _rule(self, key: Key) -> str:
        """The fixed rule's solver for a shape that is not raced."""
        return choose_exact_solver(key[0], key[1], self.among)

    def _issue(self, race: SolverRace) -> RaceBatch:
        if self._pid != os.getpid():  # a copy in a new process: its warm-ups start again
            self._warm, self._pid = {}, os.getpid()
        n = self._warm.get(race.key, 0)
        self._warm[race.key] = n + 1
        warmup = n < self.warmup
        race.issued += 0 if warmup else 1
        self.raced += 1
        k = n % len(race.candidates)  # alternate who goes first: the cost may still be in the cache
        return RaceBatch(race.key, race.candidates, race.candidates[k:] + race.candidates[:k], warmup)

    def _count(self, key: Key, candidates: Sequence[str], us_per_reporter: Sequence[Sequence[int]]) -> None:
        """Counts a round of `key`'s race run with `candidates` (a stale report counts nothing). Locked."""
        race = self.races.get(key)
        if race is None or race.candidates != tuple(candidates):
            return
        for name in race.count(us_per_reporter):
            self._notes.append(
                f"{self.label}: solver='auto' dropped {name!r} from its race for pools of {key[0]} items "
                f"of {key[1]} values: its backend failed and SciPy answered for it (not credited to it)."
            )
        if race.done:
            self._decide(race)

    def _decide(self, race: SolverRace, why: str = "") -> str:
        name = race.winner()
        self.decided[race.key] = name
        self.races.pop(race.key, None)
        self._notes.append(f"{self.label}: {race.describe(name)}" + (f" ({why})" if why else ""))
        return name

    def pop_notes(self) -> list[str]:
        """Log lines of the decisions (and dropped candidates) since the last call."""
        with self._lock:
            notes, self._notes = self._notes, []
        return notes

    def state_dict(self) -> dict[str, Any]:
        """The decisions, as ``[[pool, D, metric, solver], ...]``, and the race batches run."""
        with self._lock:
            return {"decided": [[*key, name] for key, name in self.decided.items()], "raced": self.raced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores decisions (those of solvers not registered here, or of another format, are dropped)."""
        decided = [d for d in state.get("decided", []) if len(d) == 4 and d[3] in SOLVERS]
        raced = state.get("raced", 0)
        with self._lock:
            self.decided = {(int(p), int(d), str(m)): str(n) for p, d, m, n in decided}
            self.raced = int(raced) if isinstance(raced, int) else 0


class AutoSolver(RaceBook):
    """The callback's ``solver="auto"``: the race over the per-step header, alike on every rank of a group.

    Per step: the header exchange sends ``header_fields`` (this rank's times of the previous race
    batch) and hands the group's rows to ``receive_headers`` (which counts that round, the slowest
    rank's time per candidate, and may decide); then ``solver_for`` answers for the group's agreed
    pool, the batch is solved, and ``record`` keeps its times for the next header. The state
    advances only from the rows and the agreed pools, which are the same on every rank of a group,
    so every rank counts the same rounds and solves each batch with the same solver.
    """

    def reset(self) -> None:
        """Forgets every race, decision and note (called at each fit's setup)."""
        super().reset()
        self._last: RaceBatch | None = None  # the race batch solver_for last answered
        self._report: tuple[Key, list[int]] | None = None
        self._noted: set[Key] = set()

    def solver_for(self, pool: int, dim: int, metric: str) -> str | SolverSpec:
        """The solver for a group's pool of `pool` items of `dim` values (the same on every rank).

        Returns:
            A registered name, or during a race an unregistered solver that runs every candidate.
        """
        choice = self.choose(pool, dim, metric)
        self._last = choice if isinstance(choice, RaceBatch) else None
        return choice.spec() if isinstance(choice, RaceBatch) else choice

    @property
    def racing(self) -> RaceBatch | None:
        """The race batch ``solver_for`` last handed out in this step (``None``: not a race batch)."""
        return self._last

    def record(self) -> None:
        """Ends the batch just solved: a race batch's times become the next header's report."""
        if self._last is not None:
            self._report = (self._last.key, self._last.times_us())

    def header_fields(self) -> dict[str, int]:
        """The last race batch's report, sent once (all 0: nothing to report; ``-1``: no time).

        A new step begins: ``record`` and ``extra_ms`` refer to no race batch until ``solver_for``
        hands out one.
        """
        report, self._report, self._last = self._report, None, None
        if report is None:
            return {"race_pool": 0, "race_dim": 0, "race_us0": 0, "race_us1": 0}
        (pool, dim, _), us = report
        us = [*us, NO_TIME, NO_TIME]
        return {"race_pool": pool, "race_dim": dim, "race_us0": us[0], "race_us1": us[1]}

    def receive_headers(self, rows: dict[str, list[int]]) -> None:
        """Counts the group's reported round (the same rows on every rank: the same decisions)."""
        shapes = set(zip(rows["race_pool"], rows["race_dim"], strict=True))
        if len(shapes) != 1:
            return  # ranks that report different races (or some none) count nothing
        pool, dim = shapes.pop()
        us = list(zip(rows["race_us0"], rows["race_us1"], strict=True))
        with self._lock:
            for key, race in list(self.races.items()):
                if key[:2] == (pool, dim):
                    self._count(key, race.candidates, [u[: len(race.candidates)] for u in us])

    def extra_ms(self) -> float:
        """Solver time of the race's other candidates on the batch just solved, ms (0: no race batch)."""
        return 0.0 if self._last is None else self._last.extra_ms()

    def _rule(self, key: Key) -> str:
        name = super()._rule(key)
        if key not in self._noted:
            self._noted.add(key)
            self._notes.append(
                f"{self.label}: solver='auto' uses {name!r} for pools of {key[0]} items of {key[1]} "
                f"values (no race: {self._why_no_race(key)})."
            )
        return name

    def _why_no_race(self, key: Key) -> str:
        least = RACE_MIN_POOL if self.min_pool is None else self.min_pool
        if key[1] <= LOW_DIM_MAX:
            return f"the fastest measured for D <= {LOW_DIM_MAX}"
        if key[0] < least:
            return f"pools under {least} items"
        if self.raced >= self.max_batches:
            return "the fit's race batches are spent"
        return "the only exact solver installed"
