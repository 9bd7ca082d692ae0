"""benchmarks/flow_matching_report.py: the pre-listed comparisons of the flow-matching paired runs.

Oracles are worked out by hand on small made-up curves; the committed report must equal a re-render
from the committed run records, and the sampling-scatter command must be the pre-registered one.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import flow_matching_report as fmr  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["flow_matching_report"])  # LightningCLI must not read pytest's


STEPS = [375, 750, 1125, 1500, 1875, 2250, 2625, 3000]


def _run(method, seed, values_by_k):
    """A finished run: FID at k Euler steps is ``values_by_k[k]`` per evaluation (or one list for all)."""
    curve = []
    for i, step in enumerate(STEPS):
        row = {"step": step}
        for k in fmr.SAMPLER_STEPS:
            values = values_by_k[k] if isinstance(values_by_k, dict) else values_by_k
            row[fmr.key(k)] = values[i]
        curve.append(row)
    return {"method": method, "seed": seed, "curve": curve}


def _write(folder, run):
    d = folder / "runs" / f"{run['method']}_seed{run['seed']}"
    d.mkdir(parents=True)
    (d / "done.json").write_text(json.dumps(run))


# A baseline falling 0.08 -> 0.01 by 0.01 per evaluation: its best is at step 3000 (0.01).
BASE_CURVE = [0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01]
# An arm that is at 0.01 from step 750 on: it reaches the baseline's best 4x sooner (3000 / 750).
FAST_CURVE = [0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
# An arm that reaches 0.01 at step 1875: 1.6x (3000 / 1875), below the claimed 2x.
SLOW_CURVE = [0.08, 0.07, 0.06, 0.05, 0.01, 0.01, 0.01, 0.01]


def test_baseline_rise_finds_a_best_before_the_last_evaluation():
    # best 0.3 at step 750, last 0.4: rose by 0.1. A broken variant that takes the last value as the
    # best would report 0 seeds and no excess.
    rising = _run("none", 0, [0.5, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4])
    falling = _run("none", 1, BASE_CURVE)
    rise = fmr.baseline_rise({0: rising, 1: falling}, fmr.key(2))
    assert rise["before_last"] == 1
    assert rise["per_seed"][0]["best_step"] == 750 and rise["per_seed"][0]["excess"] == pytest.approx(0.1)
    assert rise["per_seed"][1] == {"best_step": 3000, "best": 0.01, "last": 0.01, "excess": 0.0,
                                   "before_last": False}  # fmt: skip


def test_a_cell_is_real_only_when_the_sign_test_passes_and_the_mean_clears_the_noise_floor():
    # The pre-registered bar has two parts; a variant that checks only the sign test passes the
    # second case, one that checks only the floor passes the third.
    passing = {"mean": -0.05, "p": 0.03125}
    assert fmr.is_real(passing, floor=0.04)
    assert not fmr.is_real(passing, floor=0.06)
    assert not fmr.is_real({"mean": -0.05, "p": 0.0625}, floor=0.01)
    assert not fmr.is_real(passing, floor=None)
    assert fmr.is_real({"mean": +0.05, "p": 0.03125}, floor=0.04)  # harm is real too


def test_long_pair_reading_follows_the_preregistered_rule():
    assert fmr.verdict(-0.10, spread=0.05) == "persists"
    assert fmr.verdict(-0.01, spread=0.05) == "shrinks"
    assert fmr.verdict(+0.01, spread=0.05) == "reverses"
    assert fmr.verdict(0.0, spread=0.05) == "reverses"


def test_paired_cell_pairs_by_seed_and_skips_seeds_without_a_baseline():
    arm = {0: _run("a", 0, [0.5] * 8), 1: _run("a", 1, [0.2] * 8), 7: _run("a", 7, [9.0] * 8)}
    base = {0: _run("none", 0, [0.4] * 8), 1: _run("none", 1, [0.3] * 8)}
    cell = fmr.paired_cell(arm, base, fmr.key(1), 375)
    # seed 0: +0.1, seed 1: -0.1; seed 7 has no baseline and must not enter (else the mean is ~+3)
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.0) and cell["better"] == 1
    assert fmr.paired_cell(arm, base, fmr.key(1), 999) is None  # no such evaluation


def test_scatter_summary_is_mean_and_sample_sd_over_sample_seeds():
    scatter = {"evaluations": [{"sample_seed": s, **{fmr.key(k): v for k in fmr.SAMPLER_STEPS}}
                               for s, v in ((1, 1.0), (2, 2.0), (3, 3.0))]}  # fmt: skip
    s = fmr.scatter_summary(scatter)
    assert s[2]["mean"] == 2.0 and s[2]["std"] == pytest.approx(1.0) and s[2]["n"] == 3  # sd of 1,2,3 = 1


def _sweep(folder, ot_curves, l2=True):
    for seed, curve in enumerate(ot_curves):
        _write(folder, _run("none", seed, BASE_CURVE))
        _write(folder, _run("lsa-sqeuclidean", seed, curve))
    if l2:
        for seed in range(3):
            _write(folder, _run("lsa-l2", seed, FAST_CURVE))


def test_report_decides_the_claim_only_with_all_six_pairs(tmp_path):
    # 6 of 6 seeds 4x faster: one-sided sign test p = 1/64 = 0.016 -> supported.
    _sweep(tmp_path / "all", [FAST_CURVE] * 6)
    text = fmr.render(fmr.load_runs(tmp_path / "all"), [], None)
    assert "**supported**" in text and "p = 0.016" in text
    assert "Geometric-mean speed-up over 6 seeds: **4.00x**" in text  # 3000 / 750 in every seed
    assert "**Interim**" in text  # the long pair and the scatter are still missing
    # 5 of 6 above 2x: p = 7/64 = 0.109 -> not supported (a variant deciding on the mean would say yes)
    _sweep(tmp_path / "five", [FAST_CURVE] * 5 + [SLOW_CURVE])
    text = fmr.render(fmr.load_runs(tmp_path / "five"), [], None)
    assert "**not supported** by the pre-registered rule (one-sided p = 0.109" in text
    # the primary needs only its 12 runs: decided without the L2 arm
    _sweep(tmp_path / "no_l2", [FAST_CURVE] * 6, l2=False)
    assert "**supported**" in fmr.render(fmr.load_runs(tmp_path / "no_l2"), [], None)
    # 4 finished pairs: no decision, whatever the numbers
    _sweep(tmp_path / "four", [FAST_CURVE] * 4, l2=False)
    text = fmr.render(fmr.load_runs(tmp_path / "four"), [], None)
    assert "not decided yet: 4 of the 6" in text and "`lsa-l2` 0 of 3" in text


def test_unfinished_runs_are_left_out_and_counted(tmp_path):
    _sweep(tmp_path, [FAST_CURVE] * 2, l2=False)
    unfinished = tmp_path / "runs" / "none_seed2"
    unfinished.mkdir()
    (unfinished / "curves.jsonl").write_text(json.dumps({"step": 375, fmr.key(2): 0.0}) + "\n")
    runs = fmr.load_runs(tmp_path)
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("lsa-sqeuclidean", 0), ("lsa-sqeuclidean", 1), ("none", 0), ("none", 1)
    ]  # fmt: skip
    assert "`none` 2 of 6 (seeds 0, 1)" in fmr.render(runs, [], None)


def test_complete_report_reads_the_long_pair_and_the_scatter(tmp_path):
    _sweep(tmp_path / "short", [FAST_CURVE] * 6)
    long_dir = tmp_path / "long"
    _write(long_dir, _run("none", 0, BASE_CURVE))
    # OT 0.005 below the baseline at the end: the short baseline's sd over seeds is 0 (all identical),
    # so the gain "persists" at 1 and 2 steps.
    _write(long_dir, _run("lsa-sqeuclidean", 0, [v - 0.005 for v in BASE_CURVE]))
    scatter = {"evaluations": [{"sample_seed": s, **{fmr.key(k): 0.01 * s for k in fmr.SAMPLER_STEPS}}
                               for s in fmr.SCATTER_SEEDS]}  # fmt: skip
    text = fmr.render(fmr.load_runs(tmp_path / "short"), fmr.load_runs(long_dir), scatter)
    assert "**Complete**" in text
    assert text.count("| persists |") == 2
    assert "| 2 | 0.0300 | 0.0158 |" in text  # mean and sample sd of 0.01..0.05


def test_a_speed_up_from_arms_already_there_at_the_first_evaluation_is_called_a_lower_estimate():
    # Oracle by hand: the baseline's best is 0.01 at step 3000; an arm at 0.005 from step 375 on
    # reached it by 375, so 3000 / 375 = 8x is only a lower bound for every seed. Catches: a table
    # that presents such a factor as a measured speed-up (the first evaluation caps it).
    base = {s: _run("none", s, BASE_CURVE) for s in range(3)}
    early = {s: _run("lsa-sqeuclidean", s, [0.005] * 8) for s in range(3)}
    row = fmr._quality_table(early, base, (2,))[-1]
    assert "s0: 3000 -> <=375" in row
    assert "8.00x" in row and "(a lower estimate: 3 of 3 reached it by the first evaluation)" in row
    later = {s: _run("lsa-sqeuclidean", s, FAST_CURVE) for s in range(3)}
    assert "lower estimate" not in fmr._quality_table(later, base, (2,))[-1]


def test_relative_effect_is_the_mean_of_per_seed_ratios_with_a_t_interval():
    # Oracle by hand: ratios 0.5/1 - 1 = -0.5 and 0.3/0.5 - 1 = -0.4: mean -0.45, sample sd 0.0707,
    # half-width t(0.975, 1) * 0.0707 / sqrt(2) = 12.706 * 0.05 = 0.635. Catches: a ratio of the
    # arms' means (0.4 / 0.75 - 1 = -0.467) instead of the mean of paired ratios, or an unpaired seed.
    base = {0: _run("none", 0, [1.0] * 8), 1: _run("none", 1, [0.5] * 8), 2: _run("none", 2, [9.0] * 8)}
    arm = {0: _run("lsa-sqeuclidean", 0, [0.5] * 8), 1: _run("lsa-sqeuclidean", 1, [0.3] * 8)}
    cell = fmr.relative_cell(arm, base, fmr.key(2), 3000)
    assert cell["n"] == 2
    assert cell["mean"] == pytest.approx(-0.45)
    assert cell["ci95"] == pytest.approx((-0.45 - 0.6353, -0.45 + 0.6353), abs=1e-3)


def test_main_draws_the_long_pair_only_once_both_of_its_runs_have_finished(tmp_path):
    # Catches: a long-pair figure drawn from one run (a KeyError on the missing arm, or a picture of
    # one arm presented as the pair), or never drawn when the pair is in.
    _sweep(tmp_path / "short", [FAST_CURVE] * 6)
    long_dir, docs = tmp_path / "long", tmp_path / "docs"
    _write(long_dir, _run("none", 0, BASE_CURVE))
    args = ["--runs", str(tmp_path / "short"), "--long", str(long_dir), "--docs", str(docs)]
    text = fmr.main(args)
    assert (docs / "flow_matching_curves.png").is_file()
    assert not (docs / "flow_matching_long.png").exists()
    assert "flow_matching_long.png" not in text
    _write(long_dir, _run("lsa-sqeuclidean", 0, FAST_CURVE))
    text = fmr.main(args)
    assert (docs / "flow_matching_long.png").stat().st_size > 0
    assert "](flow_matching_long.png)" in text


def test_scatter_command_is_the_preregistered_one():
    page = (ROOT / "docs/results/flow-matching-preregistration.md").read_text()
    blocks = [
        shlex.split(re.sub(r"\\\n\s*", " ", b)) for b in re.findall(r"```bash\n(.*?)```", page, flags=re.S)
    ]
    [registered] = [b for b in blocks if "validate" in b]
    ckpt = Path("benchmarks/results/speedup_flow/runs/none_seed0/last.ckpt")
    ours = [w.replace(f"{ROOT}/", "") for w in fmr.scatter_args(3, ckpt)]
    assert registered[:3] == ["python", "-m", "example_projects.flow_matching"]
    assert [w.replace("=K", "=3") for w in registered[3:]] == ours


@pytest.mark.slow
def test_measure_scatter_changes_only_the_sample_noise(tmp_path):
    """Tiny run, then the scatter: the same sample seed twice gives the same FID, another seed another."""
    import speedup

    from tests.test_speedup import TINY

    configs = f"{ROOT}/example_projects/flow_matching/configs/"
    tiny = [
        w for w in TINY if not w.startswith(("--fid.sampling_steps", "--data.dataset", "--data.num_synth"))
    ]
    tiny += ["--fid.samplers=[euler1, euler2]"]
    config = ["--config", f"{configs}quickstart.yaml", f"{configs}compare.yaml"]
    speedup.main(["--example", "flow_matching", *config, "--methods", "none", "--seeds", "0",
                  "--max-steps", "2", "--eval-every", "2", "--out", str(tmp_path), "--", *tiny])  # fmt: skip
    record = fmr.measure_scatter(
        tmp_path / "runs" / "none_seed0" / "last.ckpt", tmp_path / "scatter.json", seeds=(1, 1, 2),
        extra=("--trainer.logger=false", *tiny),
    )  # fmt: skip
    values = [e["val/fid16_n8_euler2"] for e in record["evaluations"]]
    assert values[0] == values[1]  # a variant that ignores --fid.seed or draws fresh noise fails one of these
    assert values[0] != values[2]
    assert json.loads((tmp_path / "scatter.json").read_text())["evaluations"][2]["sample_seed"] == 2


def test_committed_report_equals_a_rerender_of_the_committed_records(tmp_path):
    """The report on the docs site is exactly what the committed records render to (no hand edits)."""
    text = fmr.main(["--docs", str(tmp_path)])
    assert text == (ROOT / "docs/results/flow_matching_report.md").read_text()
