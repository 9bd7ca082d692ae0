"""benchmarks/speedup.py: paired runs, curves, report, resume, speed-up arithmetic (tiny settings)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import speedup  # noqa: E402

TINY = [
    "--data.dataset=synthetic",
    "--data.num_synthetic=64",
    "--data.image_size=8",
    "--data.channels=1",
    "--data.batch_size=8",
    "--data.val_size=8",
    "--model.net.init_args.base_channels=8",
    "--model.net.init_args.channel_mult=[1, 2]",
    "--model.net.init_args.image_size=8",
    "--fid.extractor=example_projects.common.fid.TinyExtractor",
    "--fid.num_samples=8",
    "--fid.sampling_steps=[2]",
    "--fid.batch_size=8",
    "--grid.num_images=4",
    "--grid.steps=2",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["speedup"])


def test_steps_to_reach_interpolates_and_reports_never():
    curve = [{"step": 100, "fid": 50.0}, {"step": 200, "fid": 30.0}, {"step": 300, "fid": 20.0}]
    assert speedup.steps_to_reach(curve, "fid", 40.0) == pytest.approx(150.0)
    assert speedup.steps_to_reach(curve, "fid", 60.0) == 100.0
    assert speedup.steps_to_reach(curve, "fid", 10.0) is None
    runs = [
        {"method": "none", "seed": 0, "curve": curve},
        {"method": "lsa", "seed": 0, "curve": [{"step": 100, "fid": 20.0}, {"step": 200, "fid": 15.0}]},
    ]
    summary = speedup.summarize(runs, "fid")
    assert summary["lsa"]["speedup"] == [3.0] and summary["none"]["speedup"] == [1.0]


def _args(out, max_steps):
    return ["--example", "ddim", "--config", str(ROOT / "example_projects/ddim/configs/quickstart.yaml"),
            "--methods", "none", "lsa", "--seeds", "0", "--max-steps", str(max_steps), "--eval-every", "2",
            "--out", str(out), "--", *TINY]  # fmt: skip


def test_paired_sweep_writes_curves_plot_report_and_resumes(tmp_path):
    summary = speedup.main(_args(tmp_path, 4))
    for name in ("curves.json", "report.md", "fid_vs_steps.png"):
        assert (tmp_path / name).is_file()
    data = json.loads((tmp_path / "curves.json").read_text())
    assert data["metric"] == "val/fid16_n8_ddim2"  # not the logged evaluation time
    assert [row["step"] for row in data["runs"][0]["curve"]] == [2, 4]
    assert set(summary) == {"none", "lsa"}
    # the paired baseline and the immiscible run start from the same weights and data: their
    # first FIDs differ only through the coupling
    report = (tmp_path / "report.md").read_text()
    assert "| none |" in report and "| lsa − none |" in report  # FID table and paired differences
    assert set(data["summary"]["lsa"]["paired"]) == {"2", "4"}  # JSON keys: the evaluation steps
    # resume: an interrupted run (no done.json) continues from last.ckpt and keeps its curve
    run = tmp_path / "runs" / "lsa_seed0"
    (run / "done.json").unlink()
    speedup.main(_args(tmp_path, 6))
    resumed = json.loads((run / "done.json").read_text())
    assert [row["step"] for row in resumed["curve"]] == [2, 4, 6]


def test_paired_differences_count_seeds_and_sign_test():
    assert speedup.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert speedup.sign_test_p(5, 1) == pytest.approx(2 * 7 / 64)
    assert speedup.sign_test_p(3, 3) == 1.0 and speedup.sign_test_p(0, 0) == 1.0

    def run(method, seed, fids):
        curve = [{"step": 10 * (i + 1), "fid": f} for i, f in enumerate(fids)]
        return {"method": method, "seed": seed, "curve": curve}

    runs = [
        run("none", 0, [5.0, 3.0]),
        run("lsa", 0, [4.0, 3.5]),
        run("none", 1, [6.0, 2.0]),
        run("lsa", 1, [5.0, 2.0]),
        run("lsa", 2, [1.0, 1.0]),  # no baseline for seed 2: left out of the pairs
    ]
    paired = speedup.paired_differences(runs, "fid")
    assert set(paired) == {"lsa"} and list(paired["lsa"]) == [10, 20]
    first, second = paired["lsa"][10], paired["lsa"][20]
    assert (first["mean"], first["n"], first["better"], first["worse"]) == (-1.0, 2, 2, 0)
    assert first["sem"] == pytest.approx(0.0)
    assert (second["mean"], second["better"], second["worse"]) == (0.25, 0, 1)  # a tie is neither
    assert speedup.summarize(runs, "fid")["lsa"]["paired"] == paired["lsa"]
