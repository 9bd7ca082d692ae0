"""``solver="auto"`` in one process: `couple()`'s race (``AUTO_RACE``) and each collate's.

The race's rules, state and bounds are [RaceBook][lightning_immiscible.solver_race.RaceBook]'s; a
[ProcessRace][lightning_immiscible.process_race.ProcessRace] only says how a race batch's times
reach them: each call of a race batch's solver is one round, counted when it returns, and its
report is kept so that a DataLoader worker can send it back to the training process
([CouplingCollate][lightning_immiscible.workers.CouplingCollate]).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import numpy as np

from lightning_immiscible.costs import METRICS
from lightning_immiscible.solver_race import NO_TIME, RaceBatch, RaceBook
from lightning_immiscible.solvers import SolverSpec


def code_of(text: str) -> int:
    """A stable int for a name (CRC-32), for reports that travel as integers."""
    return zlib.crc32(text.encode())


def race_report(batch: RaceBatch) -> list[int]:
    """A race batch as ints: ``[pool, D, metric code, candidates code, warm-up, µs per candidate (2)]``."""
    pool, dim, metric = batch.key
    us = [*batch.times_us(), NO_TIME, NO_TIME][:2]
    return [pool, dim, code_of(metric), code_of(",".join(batch.candidates)), int(batch.warmup), *us]


class ProcessRace(RaceBook):
    """``solver="auto"`` of one process (``AUTO_RACE``, for `couple()`) or of one collate.

    [solver][lightning_immiscible.process_race.ProcessRace.solver] hands out a race batch's solver
    whose every call is one round, counted when the call returns. Each race call's report is kept
    (at most ``max_batches`` until ``reset``) for
    [pop_reports][lightning_immiscible.process_race.ProcessRace.pop_reports]: a DataLoader worker
    sends them to the training process, where the collate's race there (the copy that workers
    started later inherit) [credit][lightning_immiscible.process_race.ProcessRace.credit]s them.
    """

    def reset(self) -> None:
        """Forgets every race, decision, note and report."""
        super().reset()
        self._reports: list[list[int]] = []

    def solver(self, pool: int, dim: int, metric: str) -> str | SolverSpec:
        """The solver for one ``(pool, pool)`` cost of this shape (a race batch: every candidate, timed)."""
        choice = self.choose(pool, dim, metric)
        if isinstance(choice, str):
            return choice
        return SolverSpec(choice.spec().name, functools.partial(self._run, choice), exact=True)

    def _run(self, batch: RaceBatch, cost: np.ndarray) -> np.ndarray:
        col = batch.solve(cost)
        with self._lock:
            self._reports.append(race_report(batch))
            self._count(batch.key, batch.candidates, [batch.times_us()])
        return col

    def pop_reports(self) -> list[list[int]]:
        """The reports of the race calls since the last call (see `race_report`)."""
        with self._lock:
            reports, self._reports = self._reports, []
        return reports

    def credit(self, report: Sequence[int]) -> None:
        """Counts a race batch that a copy of this race ran in another process (a worker's report).

        A report of another metric or other candidates than this race's (a dropped candidate, other
        installs) counts nothing.
        """
        pool, dim, metric_code, candidates_code, warmup, *us = (int(v) for v in report)
        metric = next((m for m in METRICS if code_of(m) == metric_code), None)
        key = (pool, dim, str(metric))
        with self._lock:
            if metric is None or key in self.decided:
                return
            race = self.races.get(key) or self._start(key)
            if race is None or code_of(",".join(race.candidates)) != candidates_code:
                return
            self.raced += 1
            race.issued += 0 if warmup else 1
            self._count(key, race.candidates, [us[: len(race.candidates)]])


#: The process's race, used by [couple][lightning_immiscible.coupling.couple] for ``solver="auto"``.
AUTO_RACE = ProcessRace(label="couple()")
