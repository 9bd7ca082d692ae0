"""solver="auto"'s race: the candidates, the schedule, the decision, fallbacks, and the callback's use."""

from __future__ import annotations

import time
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import lightning_immiscible.coupling as coupling
import lightning_immiscible.solver_race as solver_race
from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.process_race import ProcessRace
from lightning_immiscible.protocol import RACE_FIELDS
from lightning_immiscible.solver_race import (
    FELL_BACK,
    NO_TIME,
    AutoSolver,
    RaceBatch,
    SolverRace,
    race_candidates,
)
from lightning_immiscible.solvers import (
    SOLVERS,
    SolverSpec,
    checked_backend,
    choose_exact_solver,
    solve,
    solve_scipy,
)
from lightning_immiscible.streams import draw_pool
from lightning_immiscible.workers import CouplingCollate
from tests.helpers import ToyDiffusion, trainer
from tests.test_workers import counting_solvers, race_calls


def _fake(monkeypatch, name: str, priority: int, sleep_s: float = 0.0, calls: list | None = None) -> None:
    """Registers an exact solver (SciPy underneath) that sleeps first and records its calls."""

    def fn(cost, name=name):
        if calls is not None:
            calls.append(name)
        time.sleep(sleep_s)
        return solve_scipy(cost)

    spec = SolverSpec(name, fn, exact=True, priority=priority, low_dim_priority=priority)
    monkeypatch.setitem(SOLVERS, name, spec)


@pytest.fixture
def small_pools(monkeypatch):
    """Races pools from 2 items on (the callback tests use pools of 8-16 items)."""
    monkeypatch.setattr(solver_race, "RACE_MIN_POOL", 2)


def _step(auto: AutoSolver, pool: int, dim: int, times: dict[str, float], other: dict | None = None):
    """One coupled batch as the protocol runs it: header (with `other` rank's fields), rows, solver, record.

    A race batch gets `times` (ms per candidate) as this rank's solver times.
    """
    own = auto.header_fields()
    rows = {k: [own[k]] + ([other[k]] if other is not None else []) for k in RACE_FIELDS}
    auto.receive_headers(rows)
    solver = auto.solver_for(pool, dim, "l2")
    if auto.racing is not None:
        auto.racing.times_ms.update(times)
    auto.record()
    return solver


def test_candidates_are_the_rule_and_the_next_exact_solver_above_64_values_from_256_items(monkeypatch):
    # Catches: racing on low-dimensional costs or small pools, an approximate solver or SciPy in the
    # race, or candidates out of the rule's order (ties go to the first).
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    monkeypatch.setitem(SOLVERS, "quick", SolverSpec("quick", solve_scipy, exact=False, priority=-9))
    monkeypatch.setitem(SOLVERS, "scipy", SolverSpec("scipy", solve_scipy, exact=True, priority=-1))
    assert race_candidates(256, 65) == ("first", "second")
    assert race_candidates(256, 64) == (choose_exact_solver(256, 64),)
    assert race_candidates(256, 2) == (choose_exact_solver(256, 2),)
    assert race_candidates(255, 3072) == ("first",)  # below RACE_MIN_POOL
    assert race_candidates(8, 3072, min_pool=8) == ("first", "second")
    assert race_candidates(256, 3072, among={"first", "scipy"}) == ("first",)


def test_a_single_installed_exact_solver_is_not_raced(monkeypatch):
    for name in [n for n, s in SOLVERS.items() if s.exact and n != "scipy"]:
        monkeypatch.delitem(SOLVERS, name)
    assert race_candidates(512, 3072) == ("scipy",)


def test_race_keeps_the_lowest_total_over_the_same_batches():
    # Totals by hand: a = 9 + 1 + 1 = 11, b = 2 + 2 + 2 = 6 -> b, although a is faster on 2 of 3
    # batches (a median rule would keep a). Catches deciding per batch, on medians or on the first batch.
    race = SolverRace((8, 100, "l2"), ("a", "b"))
    for us_a in (9000, 1000, 1000):
        assert not race.done
        race.count([[us_a, 2000]])
    assert race.done and race.times_us == {"a": [9000, 1000, 1000], "b": [2000, 2000, 2000]}
    assert race.winner() == "b"


def test_a_groups_round_counts_its_slowest_rank_so_every_rank_decides_alike():
    # Rank 0 finds "a" faster, rank 1 "b"; the group waits for its slowest rank: per round a = 9,
    # b = 3 ms -> "b" on every rank, since every rank counts the same gathered rows. Catches a
    # decision from one rank's own times (rank 0's would keep "a": the ranks would disagree).
    rows = [[1000, 3000], [9000, 2000]]
    decisions = []
    for _rank in range(2):
        race = SolverRace((16, 100, "l2"), ("a", "b"), rounds=2)
        race.count(rows)
        race.count(rows)
        decisions.append(race.winner())
    assert decisions == ["b", "b"]


def test_race_batch_runs_every_candidate_and_returns_the_first_ones_answer(monkeypatch):
    # The race times every candidate on the same cost, in the batch's order, and pairs with the
    # first (the rule's) answer, so the pairing does not depend on timings. Catches returning the
    # faster or the last candidate's answer, or timing only one.
    calls: list[str] = []
    _fake(monkeypatch, "first", -3, calls=calls)
    reverse = SolverSpec("second", lambda c: calls.append("second") or np.arange(len(c))[::-1], True)
    monkeypatch.setitem(SOLVERS, "second", reverse)
    batch = RaceBatch((4, 100, "l2"), ("first", "second"), ("second", "first"), warmup=False)
    cost = np.random.default_rng(0).random((4, 4))
    col = solve(cost, batch.spec())
    assert calls == ["second", "first"]
    assert np.array_equal(col, solve_scipy(cost)) and set(batch.times_ms) == {"first", "second"}


def test_tied_totals_go_to_the_rule_order():
    race = SolverRace((4, 100, "l2"), ("a", "b"), rounds=1)
    race.count([[1000, 1000]])
    assert race.winner() == "a"


def test_the_warm_up_batch_is_solved_but_not_counted_and_the_order_alternates(monkeypatch, small_pools):
    # A solver's first call in a process carries one-off costs: counting it would hand the race to the
    # other solver (a: 20 ms on the warm-up, then 1 ms; b: 1.5 ms). Catches counting the warm-up, or
    # a first candidate that always runs first (the cost may still sit in the cache for the second).
    _fake(monkeypatch, "a", -3)
    _fake(monkeypatch, "b", -2)
    auto, orders = AutoSolver(), []
    for times in ({"a": 20.0, "b": 1.5}, *[{"a": 1.0, "b": 1.5}] * 4):
        _step(auto, 8, 100, times)
        orders.append(auto.racing.order if auto.racing is not None else None)
    assert orders == [("a", "b"), ("b", "a"), ("a", "b"), ("b", "a"), None]
    assert auto.decided == {(8, 100, "l2"): "a"}


def test_alternating_item_sizes_still_end_both_races(monkeypatch, small_pools):
    # Resolution buckets: D alternates 3072 / 4096 between batches. Each shape keeps its own race, so
    # both are decided after 4 race batches each (1 warm-up + 3 counted; each report arrives in the
    # other shape's batch, before this shape's next one). Catches a race discarded whenever the key
    # changes (every batch would be a race batch, forever: defect 1 of issue 25).
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    auto = AutoSolver()
    raced = sum(
        isinstance(_step(auto, 8, (3072, 4096)[i % 2], {"first": 2.0, "second": 1.0}), SolverSpec)
        for i in range(40)
    )
    assert auto.decided == {(8, 3072, "l2"): "second", (8, 4096, "l2"): "second"}
    assert raced == 8 and auto.races == {}


def test_a_race_whose_rounds_never_count_ends_on_the_rule(monkeypatch, small_pools):
    # The other rank of the group never has times (NO_TIME): no round counts. The race still ends
    # after 1 warm-up + 2 x 3 race batches, on the rule's choice. Catches a race that waits for
    # counted rounds forever.
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    auto = AutoSolver()
    timeless = {"race_pool": 8, "race_dim": 100, "race_us0": NO_TIME, "race_us1": NO_TIME}
    kinds = [isinstance(_step(auto, 8, 100, {"first": 9.0, "second": 1.0}, timeless), SolverSpec)
             for _ in range(12)]  # fmt: skip
    assert kinds == [True] * 7 + [False] * 5 and auto.decided == {(8, 100, "l2"): "first"}
    note = "uses 'first' for pools of 8 items of 100 values (no race batch counted)."
    assert auto.pop_notes()[-1].endswith(f"{note} (the race ran out of batches)")


def test_race_batches_per_fit_are_capped(monkeypatch, small_pools):
    # Many pool shapes (one new D per batch): after max_batches race batches, new shapes use the rule
    # without racing, and a shape whose race had begun ends on its leader. Catches a run that races
    # on every new shape forever.
    _fake(monkeypatch, "first", -3)
    _fake(monkeypatch, "second", -2)
    auto = AutoSolver(max_batches=6)
    kinds = [
        isinstance(_step(auto, 8, 100 + i, {"first": 1.0, "second": 2.0}), SolverSpec) for i in range(10)
    ]
    assert kinds == [True] * 6 + [False] * 4 and auto.raced == 6
    assert auto.solver_for(8, 100, "l2") == "first" and auto.races != {}  # begun: ends on its leader
    assert "(no race: the fit's race batches are spent)" in auto.pop_notes()[-2]


def test_state_round_trip_drops_unknown_solvers_and_other_formats(monkeypatch):
    _fake(monkeypatch, "first", -3)
    auto = AutoSolver()
    auto.decided = {(256, 100, "l2"): "first", (512, 300, "l1"): "scipy"}
    auto.raced = 4
    again = AutoSolver()
    again.load_state_dict(auto.state_dict())
    assert again.decided == auto.decided and again.raced == 4
    monkeypatch.delitem(SOLVERS, "first")
    again.load_state_dict(auto.state_dict())
    assert again.decided == {(512, 300, "l1"): "scipy"}
    again.load_state_dict({"decided": [[1, 100, "scipy"]], "raced": [[1, 5]]})  # keyed by group size
    assert again.decided == {} and again.raced == 0
    again.decided = dict(auto.decided)
    again.reset()
    assert again.decided == {} and again.races == {} and again.pop_notes() == []


def test_low_dimensional_items_use_the_rule_without_a_race():
    auto = AutoSolver()
    name = auto.solver_for(256, 2, "l2")
    notes = auto.pop_notes()
    assert name == choose_exact_solver(256, 2) and len(notes) == 1 and "no race" in notes[0]
    assert auto.solver_for(256, 2, "l2") == name and auto.pop_notes() == []  # noted once
    assert auto.races == {} and auto.decided == {}  # the rule follows the pool: nothing is frozen


def test_ranks_with_uneven_batches_choose_alike_from_the_agreed_pool():
    # Two ranks, first batches of 128 and 127 items of 2 values. Each rank's local batch x ranks
    # (256 and 254) straddles POT's min_batch, so the old rule picked 'pot' on rank 0 and 'lapjvr'
    # on rank 1 and the fit stopped. The ranks see the same header rows (b = [128, 127]) and ask for
    # the agreed pool, 255: the same solver on both, the rule's for 255 items (the oracle), for every
    # later pool too. Catches a choice from a rank's own batch size.
    pytest.importorskip("ot")
    assert choose_exact_solver(256, 2) != choose_exact_solver(254, 2)  # the old disagreement
    ranks = [AutoSolver(), AutoSolver()]
    for local in ([128, 127], [100, 100], [128, 128]):
        fields = [rank.header_fields() for rank in ranks]
        rows = {k: [f[k] for f in fields] for k in RACE_FIELDS} | {"b": local}
        answers = []
        for rank in ranks:
            rank.receive_headers(rows)
            answers.append(rank.solver_for(sum(rows["b"]), 2, "l2"))
            rank.record()
        assert answers[0] == answers[1] == choose_exact_solver(sum(local), 2)


def test_a_backend_that_falls_back_is_dropped_from_the_race_not_credited_scipys_time(monkeypatch):
    # "broken" (the rule's first choice) raises, so its checked backend answers with SciPy (fast);
    # "working" takes SciPy + 30 ms. Crediting SciPy's time to "broken" would make it win and solve
    # every later batch (each by its SciPy fallback). Instead it is dropped on the first race call
    # (a warm-up, which still reports the fallback) and "working" is decided. Catches a race that
    # times the registered (falling back) function. The answers stay exact throughout (the oracle:
    # SciPy on the same pool).
    def broken(cost):
        raise RuntimeError("backend failed")

    monkeypatch.setitem(SOLVERS, "broken", SolverSpec("broken", checked_backend(broken), True, priority=-3))
    _fake(monkeypatch, "working", -2, sleep_s=0.03)
    race = ProcessRace()
    monkeypatch.setattr(coupling, "AUTO_RACE", race)  # the process's race, restored afterwards
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(256, 100, generator=gen), torch.randn(256, 100, generator=gen)
    oracle = couple(x0, noise, solver="scipy").index
    for _ in range(5):
        assert torch.equal(couple(x0, noise).index, oracle)
    assert race.decided == {(256, 100, "l2"): "working"} and race.raced == 1
    assert any("dropped 'broken'" in note for note in race.pop_notes())


def test_a_fallback_in_the_group_race_is_reported_and_drops_the_candidate(monkeypatch, small_pools):
    # The header path: the race batch's report says FELL_BACK for the failing candidate, every rank
    # drops it from the same rows and decides the other. Catches a report that turns a fallback
    # into a time (or into "no time", which would keep the broken candidate racing).
    monkeypatch.setitem(SOLVERS, "broken", SolverSpec("broken", checked_backend(lambda c: None), True, -3))
    _fake(monkeypatch, "working", -2)
    auto = AutoSolver()
    solver = auto.solver_for(8, 100, "l2")
    cost = np.random.default_rng(1).random((8, 8))
    assert np.array_equal(solve(cost, solver), solve_scipy(cost))
    auto.record()
    fields = auto.header_fields()
    assert fields["race_us0"] == FELL_BACK
    auto.receive_headers({k: [v] for k, v in fields.items()})  # the next step counts the report
    assert auto.decided == {(8, 100, "l2"): "working"}


def test_callback_races_then_keeps_the_faster_solver(monkeypatch, caplog, small_pools):
    # Two exact solvers: the rule prefers "slow" (priority), "fast" is 25 ms quicker per call. Both
    # solve each of the first 4 batches (1 warm-up + 3 counted; the third count arrives in the next
    # header, before that batch's solver is chosen), who goes first alternating, then "fast" alone;
    # the callback logs the choice and checkpoints it; the noise is exact throughout (the oracle:
    # couple() with SciPy on the same pool). Catches: keeping the rule's choice, no race, a race
    # that never ends, or a decision not saved.
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, sleep_s=0.03, calls=calls)
    _fake(monkeypatch, "fast", -2, sleep_s=0.005, calls=calls)
    module, cb = ToyDiffusion(sizes=(80,), batch_size=8, dim=100), ImmiscibleCoupling(seed=5)
    with caplog.at_level("INFO"):
        trainer(callbacks=[cb], max_steps=10).fit(module)
    assert calls == ["slow", "fast", "fast", "slow"] * 2 + ["fast"] * 6
    assert cb.race.decided == {(8, 100, "l2"): "fast"}
    assert cb.state_dict()["race"] == {"decided": [[8, 100, "l2", "fast"]], "raced": 4}
    lines = [r.getMessage() for r in caplog.records if "raced" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("using 'fast'.")
    assert "(solver time on the same 3 batches, pools of 8 items of 100 values)" in lines[0]
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, seed=5, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool, solver="scipy").noise)


def test_race_batches_count_only_the_used_solvers_time_in_assign_ms(monkeypatch, small_pools):
    # The rule's solver is instant, the other candidate takes 150 ms on each race batch. The overhead
    # warning (assignment > 50 % of the step) must not fire and the logged assign_ms of race batches
    # must not include the 150 ms. Catches assign_ms / the overhead check computed on both solvers'
    # time (defect 4 of issue 25: the warning fired although the solver kept is fast).
    _fake(monkeypatch, "quick", -3)
    _fake(monkeypatch, "sluggish", -2, sleep_s=0.15)
    logged: list[float] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["immiscible/assign_ms"]))

    module, cb = (
        ToyDiffusion(sizes=(64,), batch_size=8, dim=100),
        ImmiscibleCoupling(seed=5, max_step_fraction=0.5),
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(callbacks=[cb, Spy()], max_steps=6).fit(module)
    assert not [w for w in seen if "max_step_fraction" in str(w.message)]
    assert len(logged) == 6 and max(logged[:4]) < 100  # race batches: quick's time only
    assert cb.race.decided == {(8, 100, "l2"): "quick"}


def test_a_named_solver_is_never_raced(monkeypatch, small_pools):
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, calls=calls)
    _fake(monkeypatch, "fast", -2, calls=calls)
    module, cb = ToyDiffusion(sizes=(32,), batch_size=8, dim=100), ImmiscibleCoupling(seed=5, solver="fast")
    trainer(callbacks=[cb], max_steps=4).fit(module)
    assert calls == ["fast"] * 4 and cb.race.decided == {}


@pytest.mark.parametrize("method", ["knn", "none"])
def test_methods_without_an_assignment_do_not_race(monkeypatch, small_pools, method):
    calls: list[str] = []
    _fake(monkeypatch, "slow", -3, calls=calls)
    module, cb = ToyDiffusion(sizes=(32,), batch_size=8, dim=100), ImmiscibleCoupling(method=method, seed=5)
    trainer(callbacks=[cb], max_steps=4).fit(module)
    assert calls == [] and cb.race.decided == {} and cb.race.races == {}


class WorkerCoupled(ToyDiffusion):
    """Batches coupled in 2 non-persistent DataLoader workers (forked: they see the test's solvers)."""

    def train_dataloader(self):
        collate = CouplingCollate("lsa", seed=3)
        return DataLoader(self._dataset(), batch_size=self.batch_size, num_workers=2, collate_fn=collate,
                          persistent_workers=False, multiprocessing_context="fork")  # fmt: skip


class RaceCallsPerEpoch(L.Callback):
    """Reads, at each epoch's end, how many race calls the workers made so far (lines of a file)."""

    def __init__(self, path):
        self.path, self.counts = path, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts.append(race_calls(self.path))


def test_a_worker_race_decided_in_epoch_0_is_not_run_again_in_epoch_1(monkeypatch, tmp_path, small_pools):
    # Non-persistent workers are forked again each epoch from the training process. Each worker of
    # epoch 0 races on its copy (1 warm-up + 3 counted race calls, then its decision: 5 batches each);
    # the batches carry the times back, the callback credits them to the training process's collate,
    # and epoch 1's workers inherit its decision: no race call in epoch 1 (the oracle: 2 workers x
    # (RACE_WARMUP + RACE_ROUNDS) in epoch 0, none after). Catches a race that lives and dies with the
    # worker process (every epoch would race again: 16 calls after epoch 1).
    path = tmp_path / "calls.txt"
    counting_solvers(monkeypatch, path)
    counter = RaceCallsPerEpoch(path)
    module = WorkerCoupled(sizes=(80,), batch_size=8, dim=100)
    trainer(callbacks=[ImmiscibleCoupling(seed=1), counter], max_epochs=2).fit(module)
    per_worker = solver_race.RACE_WARMUP + solver_race.RACE_ROUNDS
    assert counter.counts == [2 * per_worker, 2 * per_worker]
