"""Fuzz: every entry point x every installed solver x hostile inputs ends well, in its own process.

Entry points: `couple`, `CouplingSpec.couple` with a condition, the group path
(`couple_in_group`, a group of one), `CouplingCollate(...)(samples)` and the callback (a one-step
Trainer fit whose `immiscible_data` returns the fuzzed tensor). Inputs: NaN, +Inf, -Inf, huge finite
values (1e30 in float32, 1e200 and float64's max / 2 in float64), an `x0` that requires grad, fp16,
bf16, fp64, a non-contiguous view, an empty batch and one item.

Every case must end in an optimal pairing (judged against `scipy.optimize.linear_sum_assignment` on
a float64 l2 cost built in `tests/fuzz_driver.py` from the differences, by total distance with a
tolerance) or in a `CouplingInputError` whose message names the problem. Each case runs in a child
forked from one helper process (`tests/fuzz_driver.py`), so a case that aborts the process (a
native solver fed NaN) fails its test here instead of killing pytest. All 455 cases take about
35 s on 2 loaded cores (most of it is the driver's imports and the forks).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import fuzz_driver
from tests.fuzz_driver import ENTRIES, INPUTS, Pairing, case_solvers, fork_case, verdict_numbers

pytestmark = pytest.mark.slow  # about 40 s: 455 forked cases and one driver start

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fuzz_driver.py"

#: Inputs that cannot be paired, and the words (any one of them) the error must use, with its reason.
NAMES_THE_PROBLEM: dict[str, tuple[tuple[str, ...], str]] = {
    "nan": (("NaN",), "non_finite"),
    "pos_inf": (("Inf",), "non_finite"),
    "neg_inf": (("Inf",), "non_finite"),
    "huge_1e200": (("overflow",), "non_finite"),
    "huge_fmax_half": (("overflow",), "non_finite"),
    "empty": (("empty",), "empty"),
}
#: Of those, the inputs that may not end in a pairing at all (the others may pair optimally: an
#: empty batch has the empty pairing; huge values may be rescaled instead of refused).
MUST_FAIL = ("nan", "pos_inf", "neg_inf")


def problem(record: dict) -> str | None:
    """What is wrong with one case's outcome, or `None` when it ended well."""
    words, reason = NAMES_THE_PROBLEM.get(record["input"], ((), None))
    if record["outcome"] == "paired":
        if record["input"] in MUST_FAIL:
            # catches: a NaN/Inf input coupled anyway (the check skipped: the removed check_finite=False)
            return "paired an input that holds NaN/Inf"
        if record["problems"]:
            # catches: x0 modified in place or cut from its graph, res.noise with a graph (noise not
            # detached), an index that is no permutation, noise that is not pool[index], an item
            # coupled outside its label's block
            return "; ".join(record["problems"])
        if not record["lib"] <= record["oracle"] + record["tol"]:  # NaN totals fail here too
            # catches: a wrong pairing (e.g. from a cost with inf entries that a backend solved, or
            # from the rows of the wrong items)
            lib, oracle, tol = record["lib"], record["oracle"], record["tol"]
            return f"not optimal: total {lib:.9g} > optimum {oracle:.9g} + {tol:.2g}"
        return None
    if record["outcome"] == "error":
        if not words:
            # catches: x0 that requires grad reaching .numpy() ("Can't call numpy() on Tensor that
            # requires grad"), fp16/bf16/views that a path cannot cost
            return f"{record['type']} on a valid input: {record['message']}"
        if record["type"] != "CouplingInputError" or record["reason"] != reason:
            # catches: a raw SciPy "matrix contains invalid numeric entries" for an overflowed cost
            got = f"{record['type']} ({record['reason']})"
            return f"{got} instead of CouplingInputError ({reason}): {record['message']}"
        if not any(w in record["message"] for w in words):
            return f"the message does not name the problem ({' / '.join(words)}): {record['message']}"
        return None
    # catches: solve() without the finiteness guard -> lapjv aborts the child (free(): invalid next
    # size, SIGABRT); a hang in a backend -> timeout
    return (
        f"{record['outcome']} {record.get('signal', record.get('exit', ''))}: {record.get('log', '')[-400:]}"
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case's outcome, from one run of the driver (its imports are paid once)."""
    out = tmp_path_factory.mktemp("fuzz") / "outcomes.jsonl"
    subprocess.run([sys.executable, str(DRIVER), "--out", str(out)], cwd=ROOT, check=True, timeout=540)
    header, *records = [json.loads(line) for line in out.read_text().splitlines()]
    # catches: the driver fuzzing an installed copy of the library instead of this checkout's
    assert Path(header["library"]).resolve().parent == ROOT / "lightning_immiscible"
    return records


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_input_pairs_optimally_or_fails_naming_the_problem(outcomes, entry):
    mine = [r for r in outcomes if r["entry"] == entry]
    # catches: cases silently dropped (a crashed driver, a solver or input left out)
    assert {(r["solver"], r["input"]) for r in mine} == {(s, k) for s in case_solvers() for k in INPUTS}
    bad = [f"{r['solver']:>7} {r['input']:<15} {p}" for r in mine if (p := problem(r)) is not None]
    assert not bad, f"{len(bad)} of {len(mine)} {entry} cases ended badly:\n" + "\n".join(bad)


def test_the_fuzz_covers_every_installed_solver_and_the_inputs_it_names():
    # catches: a solver list that forgets one (e.g. an optional backend installed later)
    from lightning_immiscible.solvers import available_solvers

    assert set(case_solvers()) == {"auto", *available_solvers()}
    assert set(NAMES_THE_PROBLEM) <= set(INPUTS) and set(MUST_FAIL) <= set(NAMES_THE_PROBLEM)


def test_the_oracle_tells_an_optimal_pairing_from_a_worse_one():
    # The judge of every "paired" case. catches: a vacuous oracle or a tolerance so wide that any
    # permutation passes (then the fuzz would not notice wrong pairings).
    gen = torch.Generator().manual_seed(5)
    x0, pool = torch.randn(8, 2, 3, generator=gen), torch.randn(8, 2, 3, generator=gen)
    cost = torch.cdist(x0.reshape(8, -1).double(), pool.reshape(8, -1).double()).numpy()
    from scipy.optimize import linear_sum_assignment

    best = torch.as_tensor(linear_sum_assignment(cost)[1])
    good = verdict_numbers(x0, Pairing(pool, pool[best]))
    assert good["lib"] == pytest.approx(good["oracle"], rel=1e-12) and not good["problems"]
    worse = verdict_numbers(x0, Pairing(pool, pool[best.roll(1)]))
    assert worse["lib"] > worse["oracle"] + worse["tol"]
    # huge finite values keep a finite, scaled oracle; non-finite ones are reported, never judged
    huge = verdict_numbers(x0.double() * 1e300, Pairing(pool.double() * 1e300, pool.double()[best] * 1e300))
    assert math.isfinite(huge["oracle"]) and huge["lib"] <= huge["oracle"] + huge["tol"]
    broken = x0.clone()
    broken[0, 0, 0] = math.nan
    assert verdict_numbers(broken, Pairing(pool, pool))["problems"] == ["paired non-finite values"]
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    crossed = verdict_numbers(x0, Pairing(pool, pool, labels, torch.arange(8)))
    assert crossed["problems"] == ["an item took noise from another label's block"]


def test_a_case_that_aborts_or_hangs_is_recorded_not_fatal(tmp_path, monkeypatch):
    # The harness itself. catches: a driver that runs cases in its own process (an abort would kill
    # it) or waits forever on a hung child.
    monkeypatch.setitem(fuzz_driver.RUNNERS, "couple", lambda *args: os.abort())
    aborted = fork_case("couple", "scipy", "fp64", tmp_path, 0)
    assert aborted["outcome"] == "aborted" and aborted["signal"] == signal.SIGABRT.name
    assert problem({**aborted, "input": "fp64"}).startswith("aborted SIGABRT")
    monkeypatch.setitem(fuzz_driver.RUNNERS, "couple", lambda *args: signal.pause())
    monkeypatch.setattr(fuzz_driver, "DEFAULT_TIMEOUT_S", 1.0)
    assert fork_case("couple", "scipy", "fp64", tmp_path, 1)["outcome"] == "timeout"
