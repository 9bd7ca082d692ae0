"""solver="auto" in training: which solvers race, the schedule, the decision, and the callback's use."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.distributed import draw_pool
from lightning_immiscible.solver_race import AutoSolver, SolverRace, race_candidates
from lightning_immiscible.solvers import SOLVERS, SolverSpec, choose_exact_solver, solve, solve_scipy
from tests.helpers import ToyDiffusion, trainer


def _fake(monkeypatch, name: str, priority: int, sleep_s: float = 0.0, calls: list | None = None) -> None:
    """Registers an exact solver (SciPy underneath) that sleeps first and records its calls."""

    def fn(cost, name=name):
        if calls is not None:
            calls.append(name)
        time.sleep(sleep_s)
        return solve_scipy(cost)

    spec = SolverSpec(name, fn, exact=True, priority=priority, low_dim_priority=priority)
    monkeypatch.setitem(SOLVERS, name, spec)


def test_candidates_are_the_two_first_exact_solvers_above_64_values_and_the_rule_below(monkeypatch):
    # Catches: racing on low-dimensional costs (where the rule wins by 1.3x or more), an approximate
    # solver in the race, or candidates out of the rule's order (ties go to the first).
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    monkeypatch.setitem(SOLVERS, "quick", SolverSpec("quick", solve_scipy, exact=False, priority=-9))
    assert race_candidates(256, 65) == ("first", "second")
    assert race_candidates(256, 3072, n=3)[:2] == ("first", "second")
    assert race_candidates(256, 64) == (choose_exact_solver(256, 64),)
    assert race_candidates(256, 2) == (choose_exact_solver(256, 2),)


def test_a_single_installed_exact_solver_is_not_raced(monkeypatch):
    for name in [n for n, s in SOLVERS.items() if s.exact and n != "scipy"]:
        monkeypatch.delitem(SOLVERS, name)
    assert race_candidates(512, 3072) == ("scipy",)


def _race_batch(race: SolverRace, times: dict[str, float], batch: int) -> None:
    """One race batch with given solver times (as the race's solver would measure them)."""
    race.pending_ms.update(times)
    race.record(batch)


def test_race_keeps_the_lowest_total_over_the_same_batches():
    # Totals by hand: a = 9 + 1 + 1 = 11, b = 2 + 2 + 2 = 6 -> b, although a is faster on 2 of 3
    # batches (a median rule would keep a). Catches deciding per batch, on medians or on the first batch.
    race = SolverRace(("a", "b"), batch=8, ranks=1, dim=100, warmup=0)
    for ms_a in (9.0, 1.0, 1.0):
        assert not race.done
        _race_batch(race, {"a": ms_a, "b": 2.0}, 8)
    assert race.done and race.times_ms == {"a": [9.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert race.winner() == "b"


def test_race_solver_runs_every_candidate_and_returns_the_first_ones_answer(monkeypatch):
    # The race's solver times every candidate on the same cost and pairs with the first (the rule's)
    # answer, so the pairing during the race does not depend on timings. Catches returning the
    # faster or the last candidate's answer, or timing only one.
    calls: list[str] = []
    _fake(monkeypatch, "first", -3, calls=calls)
    monkeypatch.setitem(
        SOLVERS,
        "second",
        SolverSpec("second", lambda c: calls.append("second") or np.arange(len(c))[::-1], True),
    )
    race = SolverRace(("first", "second"), batch=4, ranks=1, dim=100)
    cost = np.random.default_rng(0).random((4, 4))
    col = solve(cost, race.solver())
    assert calls == ["first", "second"]
    assert np.array_equal(col, solve_scipy(cost)) and set(race.pending_ms) == {"first", "second"}


def test_race_batches_of_another_size_count_as_rounds_but_not_in_the_times():
    # A short last batch is a race round (the schedule depends on the step only, equal on every
    # rank) but its times do not count. Catches counting them (b's 0.1 ms would win).
    race = SolverRace(("a", "b"), batch=8, ranks=1, dim=100, rounds=2, warmup=0)
    _race_batch(race, {"a": 5.0, "b": 6.0}, 8)
    _race_batch(race, {"a": 9.0, "b": 0.1}, 3)
    assert race.done and race.times_ms == {"a": [5.0], "b": [6.0]}
    assert race.winner() == "a"


def test_tied_totals_go_to_the_rule_order():
    race = SolverRace(("a", "b"), batch=4, ranks=1, dim=100, rounds=1, warmup=0)
    _race_batch(race, {"a": 1.0, "b": 1.0}, 4)
    assert race.winner() == "a"


def test_the_warm_up_batch_is_solved_but_not_counted():
    # A solver's first call in a process carries one-off costs (16 ms for lapjv in the latent example,
    # more than its solve): counting it would hand the race to the other solver. Catches counting it.
    race = SolverRace(("a", "b"), batch=4, ranks=1, dim=100, rounds=2)
    assert race.warmup == 1
    _race_batch(race, {"a": 20.0, "b": 1.5}, 4)
    assert not race.done and race.times_ms == {}
    _race_batch(race, {"a": 1.0, "b": 1.5}, 4)
    _race_batch(race, {"a": 1.0, "b": 1.5}, 4)
    assert race.done and race.winner() == "a"


def test_auto_solver_takes_rank_zeros_decision_not_its_own(monkeypatch):
    # Under DDP each rank times its own solves; the decision must be rank 0's (broadcast), else ranks
    # of one group could solve the same cost with different solvers. Catches: using the local winner.
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    auto = AutoSolver(rounds=1, warmup=0)
    solver, note = auto.solver_for(8, 2, 100)
    assert isinstance(solver, SolverSpec) and note is None
    auto.race.pending_ms.update({"first": 1.0, "second": 5.0})  # locally, "first" wins
    auto.record(8)
    sent = []
    line = auto.finish(lambda index: sent.append(index) or 1)  # rank 0 says: index 1
    assert sent == [0] and auto.decided == {(2, 100): "second"}
    assert line is not None and "using 'second'" in line
    assert auto.solver_for(8, 2, 100) == ("second", None)
    # a larger group (scope="auto" decided) races again
    assert isinstance(auto.solver_for(8, 4, 100)[0], SolverSpec) and auto.race.key == (4, 100)


def test_auto_solver_state_round_trip_drops_unknown_solvers(monkeypatch):
    _fake(monkeypatch, "first", -3)
    auto = AutoSolver()
    auto.decided = {(1, 100): "first", (2, 300): "scipy"}
    again = AutoSolver()
    again.load_state_dict(auto.state_dict())
    assert again.decided == auto.decided
    monkeypatch.delitem(SOLVERS, "first")
    again.load_state_dict(auto.state_dict())
    assert again.decided == {(2, 300): "scipy"}


def test_low_dimensional_items_use_the_rule_without_a_race(caplog):
    auto = AutoSolver()
    name, note = auto.solver_for(256, 1, 2)
    assert name == choose_exact_solver(256, 2) and note is not None and "no race" in note
    assert auto.solver_for(256, 1, 2) == (name, None)  # noted once
    assert auto.race is None


def test_callback_races_then_keeps_the_faster_solver(monkeypatch, caplog):
    # Two exact solvers: the rule prefers "slow" (priority), "fast" is 25 ms quicker per call. Both
    # must solve each of the first 4 batches (1 warm-up + 3), then "fast" alone; the callback must
    # log the choice and checkpoint it; the noise is exact throughout (the oracle: couple() with
    # SciPy on the same pool).
    # Catches: keeping the rule's choice, no race, a race that never ends, or a decision not saved.
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, sleep_s=0.03, calls=calls)
    _fake(monkeypatch, "fast", -2, sleep_s=0.005, calls=calls)
    module, cb = ToyDiffusion(sizes=(80,), batch_size=8, dim=100), ImmiscibleCoupling(seed=5)
    with caplog.at_level("INFO"):
        trainer(callbacks=[cb], max_steps=10).fit(module)
    assert calls == ["slow", "fast"] * 4 + ["fast"] * 6  # a warm-up batch, 3 counted, then the winner
    assert cb.auto_solver.decided == {(1, 100): "fast"}
    assert cb.state_dict()["auto_solver"] == {"decided": [[1, 100, "fast"]]}
    lines = [r.getMessage() for r in caplog.records if "raced" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("using 'fast'.")
    assert "pools of 8 items of 100 values" in lines[0]
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, seed=5, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool, solver="scipy").noise)


def test_a_named_solver_is_never_raced(monkeypatch):
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, calls=calls)
    _fake(monkeypatch, "fast", -2, calls=calls)
    module, cb = ToyDiffusion(sizes=(32,), batch_size=8, dim=100), ImmiscibleCoupling(seed=5, solver="fast")
    trainer(callbacks=[cb], max_steps=4).fit(module)
    assert calls == ["fast"] * 4 and cb.auto_solver.decided == {}


@pytest.mark.parametrize("method", ["knn", "none"])
def test_methods_without_an_assignment_do_not_race(monkeypatch, method):
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, calls=calls)
    module, cb = ToyDiffusion(sizes=(32,), batch_size=8, dim=100), ImmiscibleCoupling(method=method, seed=5)
    trainer(callbacks=[cb], max_steps=4).fit(module)
    assert calls == [] and cb.auto_solver.decided == {} and cb.auto_solver.race is None
