"""The dataset-level coupling experiment's runner: its measures, its statistics and a tiny sweep."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("scipy")

from example_projects.common.memorisation import memorisation, nearest_distance
from experiments.dataset_fm import report
from experiments.dataset_fm import run as runner


def test_memorisation_measures_against_a_hand_built_case():
    # Training items on a line at 0, 10, 20; held-out items at distances 1, 2, 3, 4 from them.
    # Samples: one copy (distance 0), one at 0.5 (below the held-out minimum 1: a copy too), one at
    # 5 (farther than any held-out item). Catches a copy share against the held-out median, a ratio
    # inverted, and distances measured to the held-out set instead of the training set.
    train = torch.tensor([[0.0], [10.0], [20.0]])
    held = torch.tensor([[1.0], [12.0], [23.0], [6.0]])
    held_nn = nearest_distance(held, train)
    assert held_nn.tolist() == [1.0, 2.0, 3.0, 4.0]
    got = memorisation(torch.tensor([[10.0], [19.5], [15.0]]), train, held_nn)
    assert got["copy_share"] == pytest.approx(2 / 3)
    assert got["near_share"] == pytest.approx(2 / 3)  # the 5th percentile of 1..4 is 1.15
    assert got["distance_ratio"] == pytest.approx(0.5 / 2.5)


def test_steps_to_the_baselines_best():
    # Baseline best 2.0 at step 300; arm reaches <= 2.0 first at step 100 (3x); another never.
    base = {
        "arm": "independent",
        "seed": 0,
        "evals": [
            {"step": s, "euler_steps": 1, "fid_clf": f} for s, f in ((100, 5.0), (200, 3.0), (300, 2.0))
        ],
    }
    fast = {
        "arm": "dataset",
        "seed": 0,
        "evals": [
            {"step": s, "euler_steps": 1, "fid_clf": f} for s, f in ((100, 1.9), (200, 1.0), (300, 0.5))
        ],
    }
    slow = {
        "arm": "batch-ot",
        "seed": 0,
        "evals": [
            {"step": s, "euler_steps": 1, "fid_clf": f} for s, f in ((100, 9.0), (200, 8.0), (300, 2.5))
        ],
    }
    records = [base, fast, slow]
    assert report.steps_to_best(records, "dataset", 1) == {0: 3.0}
    assert report.steps_to_best(records, "batch-ot", 1) == {0: None}


def test_tiny_sweep_resumes_and_reports(tmp_path, monkeypatch):
    # End to end with --tiny (2 seeds x 3 arms): stops between runs, resumes without retraining,
    # pairs the arms' noise, and the report finds every key. Catches a dataset arm that trains on
    # the batch arms' items (its distinct items would equal the batch size every step).
    now = [0.0]

    def fake_clock() -> float:
        now[0] += 30.0
        return now[0]

    monkeypatch.setattr(runner, "clock", fake_clock)
    out = ["--tiny", "--out", str(tmp_path)]
    runner.main([*out, "--max-minutes", "1.2"])
    first = sorted(p.name for p in (tmp_path / "records").glob("*.json"))
    assert first == ["batch-ot-seed0.json", "independent-seed0.json"]
    monkeypatch.setattr(runner, "clock", runner.time.monotonic)
    runner.main(out)
    records = runner.rec.load(tmp_path / "records")
    assert len(records) == 6
    for r in records:
        finals = [row for row in r["evals"] if row["step"] == runner.TINY.steps]
        assert len(finals) == 4 and all("copy_share" in row for row in finals)
        assert r["provenance"]["prereg_commit"]
    by = {(r["arm"], r["seed"]): r for r in records}
    assert by[("independent", 0)]["distinct_items_mean"] == runner.TINY.batch  # a permutation's batch
    assert by[("dataset", 0)]["fit_steps"] >= 30 and by[("dataset", 0)]["fit_s"] > 0
    result = runner.main([*out, "--report"])
    text = (tmp_path / "report.md").read_text()
    assert result["records"] == 6 and len(result["primary"]) == 4
    assert "n/a" not in text.split("## Secondary 3")[1].split("## Secondary 4")[0]


def test_the_committed_report_is_a_rerender_of_the_cheap_runners_records():
    # Catches a report edited by hand, records changed or added after it was written, and a sweep
    # whose records mixed library versions or ran from uncommitted code.
    from pathlib import Path

    from experiments.conditions_fm import records as rec

    root = Path(__file__).resolve().parents[1]
    records = rec.load(root / "experiments/dataset_fm/records")
    text, result = report.render(records)
    assert result["records"] == len(records) == 30
    assert sorted({(r["arm"], r["seed"]) for r in records}) == sorted(
        (arm, seed) for arm in ("independent", "batch-ot", "dataset") for seed in range(10)
    )
    assert len({r["provenance"]["library_tree"] for r in records}) == 1
    assert len({r["provenance"]["prereg_commit"] for r in records}) == 1
    assert not any(r["provenance"]["dirty"] for r in records)
    assert (root / "docs/results/dataset_fm_report.md").read_text() == text


def _lightning_run(tmp_path, arm, seed, fids, extra=None):
    """A ``done.json`` as ``benchmarks/speedup.py`` writes it, with FID ``fids[k][i]`` at step 375 (i + 1)."""
    import json

    from experiments.dataset_fm import lightning_report as lr

    curve = []
    for i in range(len(fids[1])):
        row = {"step": 375 * (i + 1), "immiscible/assign_ms": 2.0 * (i + 1)}
        for k in lr.EULER:
            row[lr.fid_key(k)] = fids[k][i]
            row |= {lr.memo_key(m, k): 0.25 * seed for m in lr.MEMORISATION}
        curve.append(row)
    sessions = [{"start_step": 0, "fit_start_s": 3.5, **(extra or {})}]
    folder = tmp_path / f"{arm}_seed{seed}"
    folder.mkdir()
    (folder / "done.json").write_text(
        json.dumps({"method": arm, "seed": seed, "curve": curve, "sessions": sessions})
    )


def test_the_lightning_report_differences_and_cells_against_hand_values(tmp_path):
    # Oracle: values written by hand into the records. Catches a difference taken the wrong way
    # round (dataset - baseline must be negative here), one paired with the wrong seed or read at
    # another step than the final one, a missing run not named, and the map's steps and chi2 or a
    # logged time not reported.
    from experiments.dataset_fm import lightning_report as lr

    base = {k: [0.9, 0.5] for k in lr.EULER}
    for seed, shift in ((0, 0.1), (1, 0.3)):
        _lightning_run(tmp_path, "none", seed, {k: [v + shift for v in base[k]] for k in lr.EULER})
        _lightning_run(
            tmp_path, "dataset", seed, base, {"map": {"steps": 500, "chi2": 0.0123, "converged": True}}
        )
    _lightning_run(tmp_path, "lsa-sqeuclidean", 0, {k: [0.8, 0.45] for k in lr.EULER})
    runs = lr.load_runs(tmp_path)
    assert lr.final_step(runs) == 750
    assert lr.differences(runs, "dataset", "none", lr.fid_key(2), 750) == pytest.approx({0: -0.1, 1: -0.3})
    assert lr.differences(runs, "dataset", "lsa-sqeuclidean", lr.fid_key(8), 750) == pytest.approx({0: 0.05})
    text = lr.render(runs)
    assert "s0: -0.100, s1: -0.300 | -0.200 ± 0.141 | 2/2" in text
    assert "s0: +0.050 | +0.050 | 0/1" in text
    assert "Not finished:" in text and "lsa-sqeuclidean_seed1" in text and "dataset_seed2" in text
    assert "| 500 | 0.0123 | `assign_ms` 3.00 |" in text  # mean of 2.0 and 4.0
    assert "| 1 | dataset | 0.000, 0.250 | 0.000, 0.250 | 0.000, 0.250 |" in text
