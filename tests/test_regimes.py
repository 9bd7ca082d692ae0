"""benchmarks/regimes.py: pairing, resume, statistics, the norm-matched control, a tiny sweep end to end."""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg, stats
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import regimes  # noqa: E402
import regimes_metrics  # noqa: E402
import regimes_quality  # noqa: E402
import regimes_report  # noqa: E402
import regimes_tables  # noqa: E402
import regimes_train  # noqa: E402
import regimes_unit  # noqa: E402

TINY = dict(steps=4, batch=8, block=16, width=16, eval_samples=32, eval_at=(2, 4), sampler_steps=(1, 2))
ARGS = [
    "--datasets",
    "2d",
    "--seeds",
    "2",
    "--steps",
    "4",
    "--batch",
    "8",
    "--block",
    "16",
    "--width",
    "16",
    "--eval-samples",
    "32",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep runs: tiny models are much faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ctx2d(tmp_path_factory):
    return regimes_unit.dataset_context("2d", 32, tmp_path_factory.mktemp("cache"))


def _sha(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_arms_of_a_seed_share_weights_data_order_noise_pool_and_times(ctx2d):
    settings = regimes_train.Settings(dataset="2d", objectives=("fm",), **TINY)
    recs = {
        arm: regimes_unit.run_unit(ctx2d, settings, regimes_train.Arm.parse(arm), seed=0)
        for arm in ("none", "lsa-l2-p8", "lsa-sq-p16", "knn4", "normctrl")
    }
    # Catches an arm that draws from a shared stream (e.g. knn's extra candidates taken from the noise
    # generator shifts the second block's pool) or seeds a stream by the arm's name.
    for arm, rec in recs.items():
        assert rec["fingerprint"] == recs["none"]["fingerprint"], arm
    # The fingerprints are of the actual streams: recompute the data order and pool from the seed.
    g_data, g_noise = regimes_train.stream("2d", 0, "data"), regimes_train.stream("2d", 0, "noise")
    index = torch.cat([torch.randint(20000, (16,), generator=g_data) for _ in range(2)])
    assert (
        recs["none"]["fingerprint"]["data"]
        == hashlib.sha256(b"".join(index[i : i + 16].numpy().tobytes() for i in (0, 16))).hexdigest()
    )
    pool = [torch.randn(16, 2, generator=g_noise) for _ in range(2)]
    assert (
        recs["none"]["fingerprint"]["noise"]
        == hashlib.sha256(b"".join(p.numpy().tobytes() for p in pool)).hexdigest()
    )
    # Different seeds are not paired: every stream differs.
    other = regimes_unit.run_unit(ctx2d, settings, regimes_train.Arm.parse("none"), seed=1)
    assert all(other["fingerprint"][k] != recs["none"]["fingerprint"][k] for k in other["fingerprint"])
    # And coupling changed something: arms' sample quality differs from none's.
    assert recs["lsa-l2-p8"]["objectives"] != recs["none"]["objectives"]


def test_pools_couple_within_their_chunks_only():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, generator=g) + 2, torch.randn(16, 3, generator=g)
    block = regimes_train.Block(torch.arange(16), x0, noise, torch.rand(16, generator=g))
    for pool in (4, 16):
        used, st = regimes_train.couple_block(
            regimes_train.Arm.parse(f"lsa-sq-p{pool}"), block, x0, {}, "scipy"
        )
        total = 0.0
        for s in range(0, 16, pool):  # oracle: scipy on each chunk's squared-distance matrix
            cost = torch.cdist(x0[s : s + pool].double(), noise[s : s + pool].double()).square()
            rows, cols = linear_sum_assignment(cost.numpy())
            total += cost.numpy()[rows, cols].sum()
            # Catches coupling across chunk boundaries: each chunk keeps its own noise multiset.
            assert torch.equal(used[s : s + pool].sort(0).values, noise[s : s + pool].sort(0).values)
        assert (used - x0).square().sum().item() == pytest.approx(total, rel=1e-5)
        before = (noise - x0).square().sum(1).mean().item()
        assert st["reduction_pct"] == pytest.approx(100 * (1 - total / 16 / before), rel=1e-4)


def test_norm_matched_control_has_knns_norms_and_no_dependence_on_its_data():
    data, _ = regimes_train.load_dataset("digits64")
    g = torch.Generator().manual_seed(1)
    n = 3000
    x0 = data[torch.randint(data.shape[0], (n,), generator=g)]
    knn = regimes_train.couple(x0, torch.randn(n, 4, 64, generator=g), method="knn", metric="l2").noise
    plain = torch.randn(n, 64, generator=g)
    control = regimes_train.norm_matched_noise(plain, data, g, k=4)
    ks_control = stats.ks_2samp(control.norm(dim=1).numpy(), knn.norm(dim=1).numpy())
    ks_plain = stats.ks_2samp(plain.norm(dim=1).numpy(), knn.norm(dim=1).numpy())
    # The test has power (plain Gaussian norms are clearly not knn's) and the control matches knn's.
    # Catches a control that keeps Gaussian norms, or takes norms from k=1 or another k.
    assert ks_plain.pvalue < 1e-6
    assert ks_control.pvalue > 0.01
    # Dependence on the paired item: knn's noise leans toward it, the control's does not.
    # Catches a control that keeps knn's own choice for the paired batch (it leans toward its items).
    cos = lambda a: torch.nn.functional.cosine_similarity(x0, a, dim=1)  # noqa: E731
    assert cos(knn).mean() > 10 * cos(knn).std() / math.sqrt(n)
    assert abs(cos(control).mean()) < 3 * cos(control).std() / math.sqrt(n)
    # Directions are the plain noise's: only the norms changed.
    assert torch.allclose(
        control / control.norm(dim=1, keepdim=True), plain / plain.norm(dim=1, keepdim=True), atol=1e-5
    )


def _rec(arm, seed, w2, reduction=0.0, loss_var=1.0):
    evals = {"10": {"1": {"w2": w2}}}
    return {
        "dataset": "2d",
        "arm": arm,
        "seed": seed,
        "coupling": {
            "reduction_pct": reduction,
            "reduction_l2_pct": reduction,
            "noise_sq_norm": 1.0,
            "cos_to_data": 0.0,
        },
        "objectives": {"fm": {"loss_var": loss_var, "evals": evals}},
    }


def test_paired_statistics_against_hand_computed_values():
    base = [5.0, 6.0, 7.0, 8.0]
    recs = {("2d", "none", s): _rec("none", s, b) for s, b in enumerate(base)}
    # Arm "lsa-l2-p64" is better by 1, 2, 3 and worse by 1 on seed 3; "knn4" is worse by 0.5 everywhere
    # but seed 2 (no run: not paired, must not count).
    for s, d in enumerate([-1.0, -2.0, -3.0, 1.0]):
        recs[("2d", "lsa-l2-p64", s)] = _rec("lsa-l2-p64", s, base[s] + d, reduction=10.0)
    for s in (0, 1, 3):
        recs[("2d", "knn4", s)] = _rec("knn4", s, base[s] + 0.5 + 0.1 * s, reduction=2.0)
    rows = {(r["arm"], r["metric"]): r for r in regimes_report.paired_cells(recs)}
    lsa = rows[("lsa-l2-p64", "w2")]
    assert lsa["mean"] == pytest.approx(-1.25) and lsa["n"] == 4
    diffs = [-1.0, -2.0, -3.0, 1.0]
    sd = math.sqrt(sum((d + 1.25) ** 2 for d in diffs) / 3)
    assert lsa["sem"] == pytest.approx(sd / 2)
    assert (lsa["better"], lsa["worse"]) == (3, 1) and lsa["p"] == pytest.approx(2 * 5 / 16)
    t = -1.25 / (sd / 2)
    assert lsa["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
    assert lsa["rel_pct"] == pytest.approx(100 * -1.25 / 6.5)
    knn = rows[("knn4", "w2")]
    assert knn["n"] == 3 and knn["mean"] == pytest.approx(0.5 + 0.4 / 3) and knn["worse"] == 3
    assert rows[("knn4", "loss_var")]["mean"] == 0.0  # same loss variance: zero effect, no verdict
    assert rows[("knn4", "loss_var")]["verdict"] == "no effect"


def test_map_marks_helps_harms_and_missing_cells():
    # The docs' map: one cell per (dataset, sampler steps, arm) at the final checkpoint, relative
    # effect ± s.e. in %, bold where the arm helps, italics where it harms. Oracle: the rows' own
    # numbers by hand (lsa: -1.25 / 6.5 = -19 %, knn: +0.367 / 6.33 = +5.8 % on seeds 0, 1, 3).
    # Catches a map that drops the arm without a run (shown "-"), swaps the marks, or shows
    # another checkpoint than the final one.
    base = [5.0, 6.0, 7.0, 8.0]
    recs = {("2d", "none", s): _rec("none", s, b) for s, b in enumerate(base)}
    for s, d in enumerate([-1.0, -1.5, -1.0, -1.5]):
        recs[("2d", "lsa-l2-p64", s)] = _rec("lsa-l2-p64", s, base[s] + d)
    for s in (0, 1, 3):
        recs[("2d", "knn4", s)] = _rec("knn4", s, base[s] + 0.3 + 0.05 * s)
    rows = regimes_report.paired_cells(recs)
    lines = regimes_report.map_markdown(rows, recs).splitlines()
    assert lines[2] == "| data | steps | l2 64 | knn4 |"
    lsa = next(r for r in rows if r["arm"] == "lsa-l2-p64" and r["metric"] == "w2")
    knn = next(r for r in rows if r["arm"] == "knn4" and r["metric"] == "w2")
    assert lsa["verdict"] == "helps" and knn["verdict"] == "harms"
    assert lsa["rel_pct"] == pytest.approx(100 * -1.25 / 6.5)
    lsa_text = f"**{lsa['rel_pct']:+.0f} ± {lsa['rel_sem_pct']:.0f}**"
    knn_text = f"_{knn['rel_pct']:+.1f} ± {knn['rel_sem_pct']:.1f}_"
    assert lines[4] == f"| 2d | 1 | {lsa_text} | {knn_text} |"
    assert lines.count("| --- | --- | --- | --- |") == 1  # only flow matching has records here


def _curve_rec(arm, seed, values):
    """A 2-D record whose 1-step W2 is ``values`` at the checkpoints 250, 500 and 1,000."""
    rec = _rec(arm, seed, 0.0)
    rec["objectives"]["fm"]["evals"] = {
        str(s): {"1": {"w2": v}} for s, v in zip((250, 500, 1000), values, strict=True)
    }
    return rec


def test_steps_to_quality_from_the_three_checkpoints_by_hand():
    # Seed 0: the baseline's best is 2.0 at step 500 (it rises to 3.0 by 1,000); the arm has 4.0 at 250
    # and 1.0 at 500, so it reaches 2.0 at 250 + 250 * (4 - 2) / (4 - 1) = 416.7: 500 / 416.7 = 1.2x.
    # Seed 1: best 1.5 at 1,000; the arm is at 1.0 already at 250: <= 250 steps, 4x (a lower bound).
    # Seed 2: best 1.0 at 500; the arm never gets there: censored at 500 / 1,000 = 0.5x.
    # Catches a target taken from the baseline's last value (seed 0 would read 250 steps, 2x) and
    # seeds counted as faster when they never arrive.
    base = {0: (5.0, 2.0, 3.0), 1: (4.0, 3.0, 1.5), 2: (3.0, 1.0, 2.0)}
    arm = {0: (4.0, 1.0, 1.0), 1: (1.0, 1.0, 1.0), 2: (3.0, 2.0, 1.5)}
    recs = {("2d", "none", s): _curve_rec("none", s, v) for s, v in base.items()}
    recs |= {("2d", "lsa-l2-p64", s): _curve_rec("lsa-l2-p64", s, v) for s, v in arm.items()}
    [row] = regimes_quality.quality_rows(recs, {"2d": "w2"})
    steps = [r["steps"] for r in row["per_seed"]]
    assert steps[0] == pytest.approx(250 + 250 * 2 / 3) and steps[1] == 250 and steps[2] is None
    assert [r["base_steps"] for r in row["per_seed"]] == [500, 1000, 500]
    factors = [500 / steps[0], 4.0, 0.5]
    assert row["geomean"] == pytest.approx(math.prod(factors) ** (1 / 3))
    assert (row["faster"], row["slower"], row["censored"], row["at_first_eval"]) == (2, 1, 1, 1)
    assert (row["above_claim"], row["below_claim"]) == (1, 2)
    line = regimes_quality.quality_markdown([row]).splitlines()[2]
    assert line.startswith("| 2d | fm | lsa-l2-p64 | 1 | 500, 500, 1000 | ") and "x [" in line and "*" in line


def test_frechet_distance_against_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g)
    b = torch.randn(300, 5, generator=g) * 2 + 1
    (mu1, c1), (mu2, c2) = regimes_metrics.gaussian_stats(a), regimes_metrics.gaussian_stats(b)
    # Oracle: the textbook formula with scipy's general matrix square root and numpy's covariance.
    assert np.allclose(c1, np.cov(a.double().numpy(), rowvar=False))
    oracle = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert regimes_metrics.frechet(a, (mu2, c2)) == pytest.approx(oracle, rel=1e-6)
    assert regimes_metrics.frechet(a, (mu1, c1)) == pytest.approx(0.0, abs=1e-6)


def test_holm_and_verdicts_by_hand():
    assert regimes_report.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert regimes_report.verdict(-1.0, 0.01) == "helps"
    assert regimes_report.verdict(1.0, 0.01) == "harms"
    assert regimes_report.verdict(-1.0, 0.2) == "no effect"
    assert regimes_report.verdict(-1.0, None) == "no effect"


def test_correlation_of_effect_with_reduction():
    recs = {}
    for s in range(3):
        recs[("2d", "none", s)] = _rec("none", s, 10.0 + s)
        # The larger the reduction, the larger the improvement: Spearman(reduction, effect) = -1.
        for arm, red, d in (("lsa-l2-p64", 5.0, -1.0), ("lsa-l2-p256", 10.0, -2.0), ("knn4", 1.0, 0.5)):
            recs[("2d", arm, s)] = _rec(arm, s, 10.0 + s + d + 0.01 * s, reduction=red)
    rows = regimes_report.paired_cells(recs)
    corr = regimes_report.correlations(rows, recs)
    by = {c["reduction"]: c for c in corr}
    assert by["reduction_pct"]["cells"] == 3 and by["reduction_pct"]["spearman"] == pytest.approx(-1.0)


def test_resume_after_interruption_gives_the_uninterrupted_records(tmp_path, monkeypatch):
    arms = ["--arms", "none", "lsa-l2-p16", "normctrl", "--objectives", "fm"]
    regimes.main([*ARGS, *arms, "--out", str(tmp_path / "a")])
    real, calls = regimes_unit.run_unit, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a killed session
        calls.append(a[2].name)
        return real(*a, **k)

    monkeypatch.setattr(regimes, "run_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        regimes.main([*ARGS, *arms, "--out", str(tmp_path / "b")])
    done = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.json"))
    assert len(done) == 2
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*.json")}
    rerun = []

    def counted(*a, **k):
        rerun.append(a[2].name)
        return real(*a, **k)

    monkeypatch.setattr(regimes, "run_unit", counted)
    regimes.main([*ARGS, *arms, "--out", str(tmp_path / "b")])
    # Catches a rerun that redoes finished units: only the 4 missing ones ran, the 2 files are untouched.
    assert len(rerun) == 4
    assert all(p.read_bytes() == b for p, b in before.items())

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("seconds", "timing")}

    for path in (tmp_path / "a" / "records").rglob("*.json"):
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert strip(json.loads(other.read_text())) == strip(json.loads(path.read_text())), path
    assert len(list((tmp_path / "b" / "records").rglob("*.json"))) == 6
    # A resume with other settings refuses instead of mixing records.
    with pytest.raises(SystemExit, match="other settings"):
        regimes.main([*ARGS[:-1], "48", *arms, "--out", str(tmp_path / "b")])


def test_workers_share_the_units_and_give_the_single_process_records(tmp_path):
    arms = ["--arms", "none", "lsa-l2-p16", "--objectives", "fm"]
    regimes.main([*ARGS, *arms, "--out", str(tmp_path / "one")])
    summary = regimes.main([*ARGS, *arms, "--out", str(tmp_path / "two"), "--workers", "2"])
    one = sorted((tmp_path / "one" / "records").rglob("*.json"))
    two = sorted((tmp_path / "two" / "records").rglob("*.json"))
    # Catches shards that overlap or miss units, and workers that train differently (e.g. threads).
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two]
    for a, b in zip(one, two, strict=True):
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert ra["objectives"] == rb["objectives"] and ra["fingerprint"] == rb["fingerprint"]
    assert summary["units"] == 4  # the parent wrote the report after both workers finished


def test_tiny_sweep_writes_the_report_with_every_cell(tmp_path):
    arms = ["none", "lsa-l2-p8", "knn4"]
    summary = regimes.main([*ARGS, "--arms", *arms, "--out", str(tmp_path), "--datasets", "2d", "digits64"])
    # Every (dataset, objective, arm) has: 3 evals x 4 sampler steps x 3 metrics (2-D: w2, sw2, energy;
    # digits: fd instead of w2), the 8-step path's straightness per eval, and the loss variance.
    # Catches a report that drops cells (e.g. keeps only the final checkpoint or only significant rows).
    evals = len(regimes.settings_for("2d", regimes.parse_args(ARGS)).eval_at)
    expected = 2 * 2 * 2 * (evals * (4 * 3 + 1) + 1)
    assert len(summary["cells"]) == expected
    assert {(r["dataset"], r["arm"]) for r in summary["primary"]} == {
        (d, a) for d in ("2d", "digits64") for a in arms[1:]
    }
    assert all(r["n"] == 2 for r in summary["cells"])
    md = (tmp_path / "report.md").read_text()
    assert "| 2d | lsa-l2-p8 |" in md and "Spearman" in md and "## Steps to quality" in md
    assert len(summary["steps_to_quality"]) == 2 * 2 * 2 * 4  # (dataset, objective, arm, sampler steps)
    assert json.loads((tmp_path / "report.json").read_text())["units"] == 12
    assert (tmp_path / "effects-fm.png").stat().st_size > 0 and (tmp_path / "effects-ddpm.png").exists()
    assert (tmp_path / "cache" / "classifier-digits64.pt").exists()


def test_plan_lists_units_and_estimates(tmp_path, capsys):
    seconds = regimes.main(
        [*ARGS, "--arms", "none", "lsa-l2-p16", "--objectives", "fm", "--out", str(tmp_path), "--plan"]
    )
    out = capsys.readouterr().out
    assert seconds > 0 and "4 units" in out and "lsa-l2-p16" in out
    assert not (tmp_path / "records").exists()  # the plan runs nothing that counts


def test_max_minutes_stops_before_a_unit_that_would_overrun(tmp_path):
    arms = ["--arms", "none", "lsa-l2-p16", "--objectives", "fm", "--out", str(tmp_path)]
    summary = regimes.main([*ARGS, *arms, "--max-minutes", "0"])
    # Catches a limit that is checked only after a unit (it would train one unit past the limit).
    assert summary["units"] == 0 and not (tmp_path / "records").exists()
    regimes.main([*ARGS, *arms, "--max-minutes", "60"])
    assert len(list((tmp_path / "records").rglob("*.json"))) == 4


def test_results_page_shows_the_committed_sweep_map_and_plots():
    # docs/when-does-it-help.md shows the map that `--report` renders from the committed records and
    # the plots it wrote. Catches numbers edited by hand, a stale map after a re-run, or plots that
    # no longer match the sweep's own.
    out = ROOT / "benchmarks" / "results" / "regimes"
    saved = json.loads((out / "report.json").read_text())
    page = (ROOT / "docs" / "when-does-it-help.md").read_text()
    start = page.index("<!-- regimes map:")
    shown = page[page.index("\n", start) + 1 : page.index("<!-- end of regimes map -->")]
    expected = regimes_report.map_markdown(saved["cells"], regimes_report.load_records(out))
    assert shown.strip() == expected.strip()
    assert saved["units"] == 216
    for objective in ("fm", "ddpm"):
        copy = ROOT / "docs" / "results" / f"regimes_effects_{objective}.png"
        assert copy.read_bytes() == (out / f"effects-{objective}.png").read_bytes()


def test_results_page_tables_are_rendered_from_the_committed_report():
    # The caveat tables of docs/when-does-it-help.md (the baseline's rise, steps to quality, where the
    # data-space distances disagree) are what `regimes_tables.py` renders from report.json. Catches a
    # number edited by hand, a table left stale after `--report`, or a table dropped from the page.
    report = json.loads((ROOT / "benchmarks/results/regimes/report.json").read_text())
    page = (ROOT / "docs" / "when-does-it-help.md").read_text()
    for name, render in regimes_tables.TABLES.items():
        start = page.index(f"<!-- regimes table: {name} -->")
        shown = page[page.index("\n", start) + 1 : page.index("<!-- end of regimes table -->", start)]
        assert shown.strip() == render(report).strip(), name
    assert not page.startswith("---")  # no front matter hiding the navigation (it was hidden before)
    # The baseline's one-step rise on digits that the page quotes, from the records themselves.
    recs = regimes_report.load_records(ROOT / "benchmarks/results/regimes")
    fd = [[recs[("digits64", "none", s)]["objectives"]["fm"]["evals"][c]["1"]["fd"] for s in range(6)]
          for c in ("250", "500", "1000")]  # fmt: skip
    assert [round(sum(v) / 6) for v in fd] == [36, 59, 120]
    assert "from 36 to 59 to 120" in page
