"""The benchmark and figure scripts the docs show run end to end (on tiny sizes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "docs" / "scripts"))
import distance_table  # noqa: E402
import group_sizing  # noqa: E402
import make_figures  # noqa: E402


def test_distance_table_on_the_embedded_digits(tmp_path):
    rows = distance_table.main(["--sizes", "16", "64", "--repeats", "1", "--json", str(tmp_path / "t.json")])
    assert [r["batch"] for r in rows] == [16, 64]
    assert all(r["reduction_pct"] > 0 for r in rows)
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["batch"] == 16


def test_distance_table_names_a_missing_dataset(tmp_path):
    from example_projects.common.data import DatasetUnavailableError

    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        distance_table.main(["--dataset", "folder", "--root", str(tmp_path / "missing")])


def test_group_sizing_table(tmp_path):
    result = group_sizing.main(["--batch", "16", "--dim", "48", "--pools", "32", "64", "--repeats", "1",
                                "--json", str(tmp_path / "g.json")])  # fmt: skip
    assert [(r["pool"], r["ranks_per_group"]) for r in result["rows"]][:1] == [(32, 2)]
    assert all(r["assign_ms"] > 0 for r in result["rows"])
    # 15 named fields (b, status, epoch, draw, wide, solver, path, condition, condition_dim, 4 race,
    # ndim, numel), 6 dims and a 256-byte message slot (32 int64), written out here from the
    # documented layout: 424 bytes
    header = (15 + 6 + 32) * 8
    assert result["rows"][0]["mib_sent_per_rank"] == pytest.approx((header + 16 * 32 * 4 + 24) / 2**20)


def test_figure_script_writes_figures_and_numbers(tmp_path):
    result = make_figures.main(["--out", str(tmp_path), "--sizes", "16", "32", "--repeats", "1"])
    for name in ("toy_pairing.png", "reduction_vs_batch.png", "reduction_vs_batch.json"):
        assert (tmp_path / name).is_file()
    assert result["toy"]["cost_after"] < result["toy"]["cost_before"]
    tilt = result["knn_tilt_mnist5k_b256"]
    assert tilt[1]["reduction_pct"] == 0 and tilt[16]["mean_sq_noise_per_dim"] < 0.99


def test_assignment_benchmark_quick_run(tmp_path):
    out = tmp_path / "a.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "assignment.py"), "--sizes", "64", "--dims", "48",
         "--repeats", "1", "--no-step-time", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert out.is_file() and "cdist" in done.stdout
    # ours:auto is couple() with its defaults: the call the check lines compare with cdist+scipy
    assert "ours:auto" in {r["impl"] for r in json.loads(out.read_text())["results"]}


def test_split_benchmark_quick_run_adds_up(tmp_path):
    # --split: one couple() call = GEMM + solver + rest. Catches a rest that is not the remainder
    # of the same medians, a missing budget line at B >= 1024, and a render that drops rows.
    import call_split

    out = tmp_path / "s.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "assignment.py"), "--split", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert [r["B"] for r in saved["split"]] == [64, 128] and saved["split_checks"] == []
    for r in saved["split"]:  # one round (--quick): the medians are that round's times
        assert r["rest_ms"] == pytest.approx(r["call_ms"] - r["gemm_ms"] - r["solver_ms"])
        assert r["rest_share"] == pytest.approx(r["rest_ms"] / r["call_ms"])
    assert "| 128 | 3072 |" in call_split.render_split(saved)
    row = {**saved["split"][0], "B": 1024, "rest_ms": 5.0, "call_ms": 100.0, "rest_share": 0.05}
    assert "budget <= 10 %: met" in call_split.budget_line(row)
    assert "MISSED" in call_split.budget_line({**row, "rest_ms": 11.0, "rest_share": 0.11})


def test_assignment_benchmark_families_quick_run(tmp_path):
    # The per-family solver table the docs show: every family runs, every solver is timed, auto's
    # pick is the rule's and reaches SciPy's optimum. Catches: a family or solver silently dropped,
    # the JSON and the rule disagreeing, a greedy share outside (0, 100] %.
    from lightning_immiscible.solver_race import race_candidates
    from lightning_immiscible.solvers import SOLVERS, choose_exact_solver

    out, families = tmp_path / "f.json", ["points2d", "points2d-sq", "digits", "image3x32x32"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "assignment.py"), "--families", *families, "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert [(s["family"], s["B"]) for s in saved["summary"]] == [(f, b) for f in families for b in (64, 128)]
    for s in saved["summary"]:
        assert set(s["ms"]) == set(SOLVERS) and s["rule"] == choose_exact_solver(s["B"], s["D"])
        assert s["auto"] in race_candidates(s["B"], s["D"]) and s["batches"] == 2
        assert 0 < s["greedy_share_pct"] <= 100 + 1e-9
    picked = {(s["family"], s["B"]): {s["auto"], s["rule"]} for s in saved["summary"]}
    for row in (r for r in saved["rows"] if r["solver"] in picked[(r["family"], r["B"])]):
        assert abs(row["rel_gap"]) <= 1e-12 and len(row["instance_ms"]) == 2
    assert "| points2d (2, l2) | 64 |" in done.stdout
    rendered = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "assignment.py"), "--render", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert "| image3x32x32 (3072, l2) | 128 |" in rendered.stdout


def test_race_replay_sums_every_candidate_over_the_first_batches(monkeypatch):
    # The benchmark replays solver="auto"'s race (the callback's, couple()'s and the workers'): every
    # candidate on the first 4 batches, the first (warm-up) not counted, lowest total of the next 3
    # wins; the race costs the other candidates' time on all 4. By hand: a = 5 + 5 + 5 = 15,
    # b = 9 + 1 + 1 = 11 -> b, costing b's 1 + 9 + 1 + 1 = 12 ms (a is the first candidate, whose
    # answer is used); b's slow later batch does not count. Catches a replay on all batches (b's
    # mean 5.3 > a's 5.0), one that counts the warm-up batch, or a cost that counts the first
    # candidate. Below 256 items, and on 2-D items, nothing is raced.
    import solver_families

    from lightning_immiscible.solvers import SOLVERS, SolverSpec, solve_scipy

    for name, priority in (("a", -3), ("b", -2)):
        monkeypatch.setitem(SOLVERS, name, SolverSpec(name, solve_scipy, exact=True, priority=priority))
    times = {"a": [5.0] * 6, "b": [1.0, 9.0, 1.0, 1.0, 9.0, 11.0]}
    assert solver_families.replay_race(256, 784, times) == ("b", 12.0)
    assert solver_families.replay_race(256, 2, times)[1] == 0.0  # low-D: no race, no cost
    assert solver_families.replay_race(128, 784, times) == ("a", 0.0)  # below RACE_MIN_POOL


def test_performance_page_shows_the_committed_solver_family_run():
    # The per-family table in docs/performance.md is the --render output of the committed JSON,
    # so a re-run plus `--render` regenerates it. Catches: numbers edited by hand or a stale table.
    import solver_families

    saved = json.loads((ROOT / "benchmarks" / "results" / "solver_families_cpu.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    start = page.index("<!-- solver-families table:")
    shown = page[page.index("\n", start) + 1 : page.index("<!-- end of solver-families table -->")]
    assert shown.strip() == solver_families.render_families(saved).strip()


def test_performance_page_shows_the_committed_call_split_run():
    # The call-split table is the --render output of the committed JSON (regenerated by a re-run).
    import call_split

    saved = json.loads((ROOT / "benchmarks" / "results" / "call_split_cpu.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    start = page.index("<!-- call-split table:")
    shown = page[page.index("\n", start) + 1 : page.index("<!-- end of call-split table -->")]
    assert shown.strip() == call_split.render_split(saved).strip()


def test_embedding_cost_benchmark_quick_run(tmp_path):
    out = tmp_path / "e.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "embedding_cost.py"), "--batches", "32", "--widths", "3",
         "--dim", "16", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["E"]) for r in rows] == [(32, 3), (32, 3)] and all(r["weight"] > 0 for r in rows)
    assert "| 32 | 3 | cosine |" in done.stdout


def test_dataset_coupling_cost_benchmark_quick_run(tmp_path):
    out = tmp_path / "d.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dataset_coupling_cost.py"), "--sizes", "300",
         "--batches", "16", "--dim", "8", "--fit-batch", "64", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [row] = json.loads(out.read_text())["rows"]
    assert (row["n"], row["batch"]) == (300, 16) and row["search_ms"] > 0 and row["fit_step_ms"] > 0
    assert row["memory_mb"] == (300 * 8 * 4 + 3 * 300 * 8) / 2**20
    assert "| 300 | 16 |" in done.stdout
