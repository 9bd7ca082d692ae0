"""Solver backends: optimality against SciPy, degenerate costs, auto, the approximate solver."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import lightning_immiscible
from lightning_immiscible import couple
from lightning_immiscible.solvers import (
    LOW_DIM_MAX,
    POINTS_DIM_MAX,
    SOLVERS,
    SolverSpec,
    available_solvers,
    checked_backend,
    choose_exact_solver,
    own_answer,
    permutation_in,
    register_solver,
    resolve_solver,
    solve,
    solve_scipy,
)
from lightning_immiscible.solvers_approx import solve_greedy

# Every exact backend the library knows, installed or not: a missing optional package shows as a
# skipped test (with the package to install), not as a test that silently never ran.
OPTIONAL_PACKAGES = {"lapjv": "lapjv", "lapx": "lapx", "pot": "pot"}
EXACT = sorted({"scipy", *OPTIONAL_PACKAGES, *(name for name, spec in SOLVERS.items() if spec.exact)})


def _require(solver: str) -> None:
    if solver not in ("auto", "greedy") and solver not in SOLVERS:
        pytest.skip(
            f"solver {solver!r} is not installed (pip install {OPTIONAL_PACKAGES.get(solver, solver)})"
        )


PKG_DIR = str(Path(lightning_immiscible.__file__).parent)


def _optimum(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def _objective(cost: np.ndarray, col: np.ndarray) -> float:
    return float(cost[np.arange(len(col)), col].sum())


def _is_perm(col: np.ndarray, b: int) -> bool:
    return col.dtype == np.int64 and col.shape == (b,) and sorted(col.tolist()) == list(range(b))


def _image_cost(b: int, d: int, seed: int) -> np.ndarray:
    """L2 cost of smooth image-like data against Gaussian noise (the project's cost structure)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.randn(b, d, generator=gen), 1) / d**0.5
    x = x.clamp(-1, 1) + 0.3 * torch.rand(b, 1, generator=gen)
    return torch.cdist(x.double(), torch.randn(b, d, generator=gen).double()).numpy()


def _points_cost(b: int, seed: int, squared: bool = False) -> np.ndarray:
    """L2 (or squared L2) cost of 2-D '8 Gaussians' points against 2-D Gaussian noise, in NumPy."""
    rng = np.random.default_rng(seed)
    angle = rng.integers(0, 8, b) * np.pi / 4
    x = 5 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.3 * rng.standard_normal((b, 2))
    sq = ((x[:, None, :] - rng.standard_normal((b, 2))[None, :, :]) ** 2).sum(-1)
    return sq if squared else np.sqrt(sq)


DEGENERATE = {
    "zeros": np.zeros((7, 7)),
    "constant": np.full((6, 6), 3.5),
    "B1": np.array([[2.0]]),
    "B2": np.array([[1.0, 2.0], [3.0, 4.0]]),
    "B2_ties": np.ones((2, 2)),
    "int_ties": np.random.default_rng(0).integers(0, 3, (40, 40)).astype(float),
    "rank1": np.outer(np.arange(20.0), np.ones(20)),
    "identity": np.eye(25),
    "huge_offset": np.random.default_rng(1).random((30, 30)) * 1e3 + 1e12,
    "huge_scale": np.random.default_rng(3).random((30, 30)) * 1e42,  # beyond float32's range
    "negative": -np.random.default_rng(2).random((30, 30)) * 100,
}


# Compared after removing a case's common offset (same optimum), so the tolerance is tight: on the
# raw 1e12 + [0, 1e3) cost a relative 1e-12 admits swaps worth ~30, the very failure to catch.
OFFSET = {"huge_offset": 1e12}
SCALE = {"huge_scale": 1e42}


def test_registry_has_scipy_and_an_approximate_solver():
    assert SOLVERS["scipy"].exact and not SOLVERS["greedy"].exact
    assert available_solvers()[-1] == "greedy"  # exact solvers come first


def test_auto_without_a_dimension_picks_an_exact_solver_preferring_lapjv():
    spec = resolve_solver("auto")
    assert spec.exact
    if importlib.util.find_spec("lapjv") is not None:
        assert spec.name == "lapjv"


def test_auto_rule_with_every_optional_solver_installed():
    # The documented rule: pot for points (<= 3 values) from B = 256, lapjvr for the rest of
    # <= 64 values, lapjv above and when D is unknown. Catches: an off-by-one boundary (dim < 64,
    # dim < 3, b > 256), a rule ignoring dim, POT chosen for small pools or high-dimensional items.
    pytest.importorskip("lapjv")
    pytest.importorskip("lap")
    pytest.importorskip("ot")
    assert (LOW_DIM_MAX, POINTS_DIM_MAX) == (64, 3)
    for b in (2, 255, 256, 2048, 10_000):
        points = "pot" if b >= 256 else "lapjvr"
        assert [choose_exact_solver(b, d) for d in (1, 2, 3)] == [points] * 3
        assert [choose_exact_solver(b, d) for d in (4, 64)] == ["lapjvr"] * 2
        assert [choose_exact_solver(b, d) for d in (65, 196, 3072, None)] == ["lapjv"] * 4
    assert resolve_solver("auto", 512, 2).name == "pot"


def _only(monkeypatch, *names):
    for name in [n for n in SOLVERS if n not in names]:
        monkeypatch.delitem(SOLVERS, name)


@pytest.mark.parametrize(
    ("installed", "low", "high"),
    [
        (("scipy", "lapjv", "lapx", "greedy"), "scipy", "lapjv"),  # no lapjvr: SciPy beats lapjv on 2-D
        (("scipy", "lapx", "lapjvr"), "lapjvr", "lapjvr"),  # Python >= 3.12: no lapjv wheels
        (("scipy", "lapx"), "scipy", "lapx"),  # an old lapx without lapjvr
        (("scipy", "greedy"), "scipy", "scipy"),  # SciPy alone
        (("scipy", "pot"), "pot", "scipy"),  # POT without lapx: first on points, after SciPy above
    ],
)
def test_auto_rule_falls_back_in_the_measured_order(monkeypatch, installed, low, high):
    # Catches: one order for both regimes, or an approximate solver ever chosen by auto.
    _only(monkeypatch, *[n for n in installed if n in SOLVERS])
    if not set(installed) <= set(SOLVERS):
        pytest.skip(f"needs {sorted(set(installed) - set(SOLVERS))} installed")
    assert (choose_exact_solver(300, 2), choose_exact_solver(300, 3072)) == (low, high)


def test_a_user_solver_with_top_priority_becomes_auto(monkeypatch):
    monkeypatch.setitem(SOLVERS, "mine", SOLVERS["scipy"])
    register_solver("mine", SOLVERS["scipy"].fn, exact=True, priority=0)
    assert choose_exact_solver(100, 2) == choose_exact_solver(100, 3072) == "mine"
    register_solver("mine", SOLVERS["scipy"].fn, exact=False, priority=0)  # approximate: never auto
    assert choose_exact_solver(100, 2) != "mine"


@pytest.mark.parametrize("dim", [2, 3072])
def test_couple_passes_the_item_dimension_to_auto(monkeypatch, dim):
    # The solver couple() runs is the rule's choice for its (B, D). Catches: a call site that does
    # not pass dim (auto would use the high-dimensional choice on 2-D data).
    calls = []
    for name, spec in list(SOLVERS.items()):

        def spy(cost, name=name, fn=spec.fn):
            calls.append(name)
            return fn(cost)

        monkeypatch.setitem(SOLVERS, name, dataclasses.replace(spec, fn=spy))
    gen = torch.Generator().manual_seed(dim)
    shape = (40, dim) if dim == 2 else (40, 3, 32, 32)
    couple(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    assert calls == [choose_exact_solver(40, dim)]


@pytest.mark.parametrize("seed", range(6))
def test_auto_reaches_the_exact_optimum_on_2d_points(seed):
    # Oracle: SciPy on the raw cost built here. lapjv stops 3.5e-10 (relative) above the optimum
    # at seed 5 (an absolute tolerance inside it): a rule choosing lapjv for 2-D data fails here.
    cost = _points_cost(160, seed)
    col = solve(cost, "auto", dim=2)
    assert _is_perm(col, 160)
    assert abs(_objective(cost, col) - _optimum(cost)) <= 1e-12 * _optimum(cost)


@pytest.mark.parametrize("dim", [2, LOW_DIM_MAX, LOW_DIM_MAX + 1, 3072])
def test_every_choice_of_auto_reaches_the_same_optimum_value(dim):
    # Whatever auto picks (per regime), the assignment value is SciPy's on the uncentred cost.
    for cost in (_points_cost(120, dim), _points_cost(120, dim, squared=True), _image_cost(120, 48, dim)):
        col = solve(cost, "auto", dim=dim)
        assert _objective(cost, col) == pytest.approx(_optimum(cost), rel=1e-12)


@pytest.mark.parametrize("solver", EXACT)
@pytest.mark.parametrize("b", [3, 17, 64, 200])
def test_exact_solvers_reach_the_scipy_optimum_on_random_costs(solver, b):
    _require(solver)
    rng = np.random.default_rng(b)
    # 1e-9: lapjv stops up to a few 1e-10 above the optimum on 2-D points (see the auto tests)
    for cost in (rng.random((b, b)), _image_cost(b, 48, b), _points_cost(b, b), _points_cost(b, b, True)):
        col = solve(cost, solver)
        assert _is_perm(col, b)
        assert _objective(cost, col) == pytest.approx(_optimum(cost), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("solver", [*EXACT, "auto"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_exact_solvers_on_degenerate_costs(solver, case):
    # Catches lapjv fed the raw 1e12-offset cost (its absolute tolerance gives a non-optimal
    # assignment) and costs beyond float32's range (lapjv solves in float32: inf entries).
    _require(solver)
    cost = DEGENERATE[case]
    col = solve(cost, solver)
    assert _is_perm(col, len(cost))
    residual = (cost - OFFSET.get(case, 0.0)) / SCALE.get(case, 1.0)
    assert _objective(residual, col) == pytest.approx(_optimum(residual), rel=1e-12, abs=1e-9)


def test_solve_rescales_costs_beyond_float32_for_every_solver():
    # Catches a float32 backend fed costs above 3.4e38 (inf inside lapjv/greedy: a SciPy error,
    # a non-permutation or corrupted memory).
    cost = DEGENERATE["huge_scale"]
    for solver in [s for s in EXACT if s in SOLVERS] + ["greedy"]:
        col = solve(cost, solver)
        assert _objective(cost / 1e42, col) == pytest.approx(_optimum(cost / 1e42), rel=1e-12)


def test_empty_cost_gives_an_empty_assignment():
    for solver in [s for s in EXACT if s in SOLVERS] + ["greedy"]:
        assert solve(np.zeros((0, 0)), solver).shape == (0,)


@pytest.mark.parametrize("case", sorted(set(DEGENERATE) - set(SCALE)))  # solve() rescales those
def test_greedy_returns_a_permutation_on_degenerate_costs(case):
    cost = DEGENERATE[case]
    for fixup in (0, 64):
        assert _is_perm(solve_greedy(cost, fixup=fixup, exact=solve_scipy), len(cost))


def test_greedy_keeps_most_of_the_exact_reduction_on_image_like_costs():
    # Stated bound (measured 97-98 % at B = 128-2048): >= 90 % of the exact distance reduction,
    # for the greedy path alone (fixup=0: no exact finishing step).
    for seed, b in [(0, 128), (1, 256), (2, 400)]:
        cost = _image_cost(b, 192, seed)
        identity, optimum = np.trace(cost), _optimum(cost)
        col = solve_greedy(cost, fixup=0, exact=solve_scipy)
        assert _is_perm(col, b)
        share = (identity - _objective(cost, col)) / (identity - optimum)
        assert 0.90 <= share <= 1.0 + 1e-12


def test_greedy_recovers_a_planted_permutation():
    rng = np.random.default_rng(3)
    perm = rng.permutation(300)
    cost = rng.random((300, 300)) + 1.0
    cost[np.arange(300), perm] = 0.0
    np.testing.assert_array_equal(solve_greedy(cost, fixup=0, exact=solve_scipy), perm)


def test_greedy_small_problems_are_solved_exactly_by_the_fixup():
    cost = _image_cost(50, 32, 4)
    assert _objective(cost, solve(cost, "greedy")) == pytest.approx(_optimum(cost), rel=1e-12)


def test_first_permutation_reads_every_known_tuple_layout():
    x = np.array([2, 0, 1], dtype=np.int32)
    y = np.array([1, 2, 0], dtype=np.int32)
    for out in [(x, y, (0.0, None, None)), (0.0, x, y), (x, y), x]:
        np.testing.assert_array_equal(permutation_in(out, 3), x)
    assert permutation_in((np.array([0, 0, 1]), y), 3) is None  # not a permutation


def test_checked_backend_falls_back_to_scipy_on_bad_output_or_error():
    cost = np.random.default_rng(5).random((12, 12))

    def broken(c):
        raise ValueError("degenerate")

    for backend in (broken, lambda c: (np.zeros(12, dtype=np.int64),), lambda c: None):
        col = checked_backend(backend)(cost)
        assert _objective(cost, col) == pytest.approx(_optimum(cost))
        # own_answer tells that SciPy answered (the race must not credit its time to the backend)
        assert own_answer(SolverSpec("b", checked_backend(backend), exact=True), cost) is None
    good = SolverSpec("good", checked_backend(lambda c: (solve_scipy(c), None)), exact=True)
    assert np.array_equal(own_answer(good, cost), solve_scipy(cost))


@pytest.mark.parametrize("solver", [*EXACT, "greedy"])
def test_couple_accepts_every_solver_and_keeps_the_noise_multiset(solver):
    _require(solver)
    gen = torch.Generator().manual_seed(6)
    x0, noise = torch.rand(96, 3, 4, 4, generator=gen), torch.randn(96, 3, 4, 4, generator=gen)
    res = couple(x0, noise, method="lsa", solver=solver)
    assert sorted(res.index.tolist()) == list(range(96))
    torch.testing.assert_close(res.noise, noise[res.index])
    assert res.cost_after < res.cost_before


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown solver"):
        solve(np.zeros((3, 3)), "hungarian-3000")


def test_greedy_uses_the_given_exact_solver_for_leftovers():
    calls = []

    def spy(cost):
        calls.append(cost.shape)
        return SOLVERS["scipy"].fn(cost)

    col = solve_greedy(_image_cost(120, 16, 7), fixup=200, exact=functools.partial(spy))
    assert calls == [(120, 120)] and _is_perm(col, 120)


def test_library_works_with_scipy_alone():
    # A fresh interpreter where importing lapjv / lap fails: only scipy and greedy get registered.
    code = (
        "import sys, types; sys.modules['lapjv'] = None; sys.modules['lap'] = None\n"
        "import importlib.util; importlib.util.find_spec = lambda name, *a: None\n"
        f"sys.path.insert(0, {str(Path(PKG_DIR).parent)!r})\n"
        "import numpy as np\n"
        "from lightning_immiscible.solvers import SOLVERS, resolve_solver, solve\n"
        "assert sorted(SOLVERS) == ['greedy', 'scipy'], sorted(SOLVERS)\n"
        "assert resolve_solver('auto').name == 'scipy' == resolve_solver('auto', 512, 2).name\n"
        "c = np.random.default_rng(0).random((300, 300))\n"
        "assert sorted(solve(c, 'greedy').tolist()) == list(range(300))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _race_solvers(monkeypatch, calls: list[str], slow_ms: float = 20.0) -> None:
    """Two exact solvers besides SciPy, logging their calls: `first` (the rule's choice, slowed
    down by `slow_ms`) and `second`."""
    import time

    def first(cost):
        calls.append("first")
        time.sleep(slow_ms / 1e3)
        return solve_scipy_raw(cost)

    def second(cost):
        calls.append("second")
        return solve_scipy_raw(cost)

    _only(monkeypatch, "scipy")
    for name in ("first", "second"):  # tracked by monkeypatch, so removed again after the test
        monkeypatch.setitem(SOLVERS, name, SOLVERS["scipy"])
    register_solver("first", first, exact=True, priority=0, low_dim_priority=0)
    register_solver("second", second, exact=True, priority=1, low_dim_priority=1)


def solve_scipy_raw(cost):
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)].astype(np.int64)


def test_couple_auto_races_per_shape_then_keeps_the_faster_solver(monkeypatch):
    # couple()'s solver="auto" (no callback): on the first 4 calls of a (B, D, metric) both
    # candidates solve the same cost and the rule's answer is used; then the faster one alone.
    # Catches: a race that never ends or never switches, timings that pick the answer of a race
    # call, a race keyed on nothing (a new shape must race again), and racing below the size limit.
    import lightning_immiscible.coupling as coupling
    from lightning_immiscible.process_race import ProcessRace
    from lightning_immiscible.solver_race import RACE_ROUNDS, RACE_WARMUP

    calls: list[str] = []
    _race_solvers(monkeypatch, calls)
    monkeypatch.setattr(coupling, "AUTO_RACE", ProcessRace())  # the process's race, restored afterwards
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.rand(300, 3, 8, 8, generator=gen), torch.randn(300, 3, 8, 8, generator=gen)
    oracle = solve_scipy_raw(torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()).numpy())
    race = RACE_WARMUP + RACE_ROUNDS
    for step in range(race + 2):
        calls.clear()
        res = couple(x0, noise)
        np.testing.assert_array_equal(res.index.numpy(), oracle)  # exact on every call
        assert sorted(calls) == (["first", "second"] if step < race else ["second"])
    assert coupling.AUTO_RACE.decided == {(300, 192, "l2"): "second"}
    calls.clear()
    couple(x0[:280], noise[:280])  # another shape: races again
    assert sorted(calls) == ["first", "second"]
    calls.clear()
    couple(x0[:200], noise[:200])  # below RACE_MIN_BATCH: the rule alone
    couple(x0[:, :1, :4, :4].reshape(300, 16), noise[:, :1, :4, :4].reshape(300, 16))  # D <= 64
    assert calls == ["first", "first"]


def test_race_calls_return_the_rules_answer_whatever_the_timings(monkeypatch):
    # On a race call the returned pairing is the rule's (first candidate's), even when the other
    # candidate is faster and answers differently. Catches a race that returns the fastest answer.
    from lightning_immiscible.process_race import ProcessRace

    _only(monkeypatch, "scipy")
    for name in ("first", "second"):
        monkeypatch.setitem(SOLVERS, name, SOLVERS["scipy"])
    register_solver("first", solve_scipy_raw, exact=True, priority=0)
    register_solver("second", lambda c: np.arange(len(c))[::-1].copy(), exact=True, priority=1)
    cost = np.random.default_rng(9).random((300, 300))
    race = ProcessRace()
    for _ in range(4):
        col = resolve_solver(race.solver(300, 3072, "l2")).fn(cost)
        np.testing.assert_array_equal(col, solve_scipy_raw(cost))


def test_group_coupling_never_uses_the_per_process_race(monkeypatch):
    # Ranks of a group must solve with the same solver: without the callback's header race (a
    # `peer`), couple_in_group keeps the fixed rule.
    from lightning_immiscible import CouplingSpec
    from lightning_immiscible.distributed import couple_in_group
    from lightning_immiscible.groups import build_rank_group

    calls: list[str] = []
    _race_solvers(monkeypatch, calls, slow_ms=0.0)
    x0 = torch.rand(300, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    for step in range(5):
        couple_in_group(x0, build_rank_group("global"), 0, step, CouplingSpec("lsa"))
    assert calls == ["first"] * 5


def test_pot_reaches_the_scipy_optimum_on_points_and_falls_back_when_it_stops_early(monkeypatch):
    # POT's network simplex answers with a plan; the registered solver turns it into a permutation.
    # Oracle: SciPy on the raw cost. Catches: a plan read by columns instead of rows, a non-converged
    # run (numItermax reached: POT returns a feasible, non-optimal plan) taken as the answer.
    pytest.importorskip("ot")
    for seed in range(3):
        cost = _points_cost(300, seed, squared=seed == 2)
        col = SOLVERS["pot"].fn(cost)
        assert _is_perm(col, 300)
        assert _objective(cost, col) == pytest.approx(_optimum(cost), rel=1e-12)
    import ot

    real = ot.emd
    monkeypatch.setattr(ot, "emd", lambda *a, **k: real(*a, **{**k, "numItermax": 5}))
    cost = _points_cost(300, 4)
    with pytest.warns(UserWarning, match="numItermax"):
        col = SOLVERS["pot"].fn(cost)
    assert _objective(cost, col) == pytest.approx(_optimum(cost), rel=1e-12)  # SciPy's answer


NON_FINITE = {"nan": np.nan, "pos_inf": np.inf, "neg_inf": -np.inf}


@pytest.mark.parametrize("in_float32_range", [False, True])
@pytest.mark.parametrize("bad", sorted(NON_FINITE))
def test_solve_refuses_a_non_finite_cost_before_any_backend_sees_it(bad, in_float32_range):
    # The last-line guard of every path. Catches: solve() without the finiteness check (lapjv fed a
    # NaN row corrupts the heap and the process aborts: free(): invalid next size), the check
    # skipped when the caller vouches for float32's range, or done after the backend ran.
    from lightning_immiscible import CouplingInputError

    calls = []
    spy = dataclasses.replace(
        SOLVERS["scipy"], name="spy", fn=lambda c: calls.append(c) or solve_scipy_like(c)
    )
    cost = np.random.default_rng(7).random((6, 6))
    cost[2] = NON_FINITE[bad]  # one item's row, as a NaN/Inf item makes it
    for solver in [spy, "auto", *available_solvers()]:
        with pytest.raises(CouplingInputError, match="NaN" if bad == "nan" else "Inf") as info:
            solve(cost, solver, in_float32_range=in_float32_range)
        assert info.value.reason == "non_finite" and "overflow float64" in str(info.value)
    assert calls == []
    one = np.array([[NON_FINITE[bad]]])
    with pytest.raises(CouplingInputError):
        solve(one, spy)  # a one-item block of a conditional coupling: no backend, still refused


def solve_scipy_like(cost: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(cost)[1].astype(np.int64)


def test_greedys_exact_finish_goes_through_the_guard():
    # greedy centres in float32: a cost handed to it directly (not through solve) with NaN, or with
    # entries beyond float32, makes NaN leftovers. At 10 rows (<= its fixup of 64) the exact finish
    # gets them all. Catches the exact finish calling a backend's fn directly (the NaN would reach
    # lapjvr or lapjv).
    from lightning_immiscible import CouplingInputError

    cost = np.random.default_rng(8).random((10, 10))
    cost[5, 9] = np.nan
    with pytest.raises(CouplingInputError, match="NaN"):
        SOLVERS["greedy"].fn(cost)
    with pytest.raises(CouplingInputError, match="NaN"), np.errstate(over="ignore", invalid="ignore"):
        SOLVERS["greedy"].fn(np.random.default_rng(9).random((10, 10)) * 1e300)


@pytest.mark.parametrize("top", [1e30, 1e200, float(np.finfo(np.float64).max) / 2])
def test_huge_finite_costs_are_solved_optimally_by_every_solver(top):
    # Costs near float64's largest value: scaled by a power of two before any backend (exact, same
    # optimum). Oracle: SciPy on the cost scaled by 2**-1100 in the test. Catches a scaling that
    # overflows (|cost| temporaries, centring sums of entries near 1.8e308) and a backend fed
    # costs beyond float32.
    cost = np.random.default_rng(10).random((20, 20)) * top
    scaled = cost * 2.0**-1100
    for solver in ["auto", *available_solvers()]:
        col = solve(cost, solver)
        assert _is_perm(col, 20)
        assert _objective(scaled, col) == pytest.approx(_optimum(scaled), rel=1e-9), solver
