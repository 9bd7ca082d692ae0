"""The conditions experiment's runner (`experiments/conditions_fm/run.py`), against independent oracles.

What `docs/results/conditions-preregistration.md` fixes: the split, ink and slant, the buckets, the
leak, the faithfulness error and its chance level, the statistics and decision rules, the report's
comparisons, the records' provenance and refusal, resuming, and the paired streams.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import regimes_metrics  # noqa: E402  (from benchmarks/, as the runner imports it)
from regimes_metrics import FeatureClassifier  # noqa: E402
from regimes_train import load_dataset, reference_sample  # noqa: E402

from experiments.conditions_fm import measure, stats  # noqa: E402
from experiments.conditions_fm import records as rec  # noqa: E402
from experiments.conditions_fm import run as runner  # noqa: E402
from experiments.conditions_fm.report import PRIMARY, SECONDARY, render  # noqa: E402
from lightning_immiscible import CouplingCollate, CouplingSpec  # noqa: E402

TINY = runner.TINY


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: thread hand-offs cost more than the work (a tiny run
    # took 8 s with torch's default threads under load, 1 s with one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        limit: contextlib.AbstractContextManager = threadpool_limits(1)
    except ImportError:
        limit = contextlib.nullcontext()
    with limit:
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data, labels = load_dataset("mnist28")
    return data, labels


@pytest.fixture(scope="module")
def tiny_ctx(tmp_path_factory) -> runner.Context:
    # An untrained classifier: the streams and the couplings do not depend on it, and nothing is cached.
    untrained = FeatureClassifier(784).requires_grad_(False)
    return runner.context(tmp_path_factory.mktemp("cache"), TINY, classifier=untrained)


# ----------------------------------------------------------------------------------------------------
# The condition: ink and slant


def _image(pixels: list[tuple[int, int]], value: float = 1.0) -> torch.Tensor:
    x = torch.full((28, 28), -1.0)
    for r, c in pixels:
        x[r, c] = value
    return x.flatten()[None]


@pytest.mark.parametrize("shear", [0.25, -0.5, 0.0])
def test_slant_of_a_sheared_bar_is_the_shear_built(shear):
    # Oracle: a bar whose column moves `shear` pixels right per row upward (rows count downward),
    # 3 pixels wide, on rows 2, 6, ..., 26 (centre row 14), so every column is an integer.
    # Catches: the sign flipped (the page: positive when the top leans right), mu20 (the column
    # spread) in place of mu02, and moments taken about the grid centre instead of the ink's.
    pixels = []
    for r in range(2, 27, 4):
        c = 14 + round(shear * (14 - r))
        pixels += [(r, c - 1), (r, c), (r, c + 1)]
    (ink, slant) = measure.ink_and_slant(_image(pixels))[0].tolist()
    assert slant == pytest.approx(shear, abs=1e-12)
    assert ink == pytest.approx(len(pixels) / 784)


def test_ink_is_the_mean_of_the_pixels_in_unit_range_and_no_ink_has_no_slant():
    # Catches: ink on the [-1, 1] values (mean(x)) instead of p = (x + 1) / 2; a division by zero
    # turned into a finite slant for an empty image or one whose ink lies in one row.
    x = torch.rand(5, 784, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(measure.ink_and_slant(x)[:, 0], ((x.double() + 1) / 2).mean(1))
    empty, one_row = _image([]), _image([(5, c) for c in range(3, 9)])
    conditions = measure.ink_and_slant(torch.cat([empty, one_row]))
    assert conditions[0, 0] == 0 and not torch.isfinite(conditions[:, 1]).any()


def test_the_faithfulness_error_clips_each_component_and_counts_no_ink_at_the_clip():
    # Oracle: errors written by hand, in SD units. Catches: the clip applied to the per-sample mean
    # instead of each component, and a NaN slant (no ink) dropped instead of counted at 5.
    requested = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 2.0]])
    measured = torch.tensor([[0.5, 7.0], [1.0, -1.5], [0.25, math.nan]])
    out = measure.faithfulness(measured, requested)
    per_sample = [(0.5 + 5.0) / 2, (0.0 + 0.5) / 2, (0.25 + 5.0) / 2]
    assert out["faith_err"] == pytest.approx(sum(per_sample) / 3)
    assert out["ink_err"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert out["slant_err"] == pytest.approx((5.0 + 0.5 + 5.0) / 3)
    assert out["nonfinite"] == 1
    # correlation over the finite samples only: slant (7, -1.5) against (0, -1) is perfectly positive
    assert out["corr_slant"] == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 3, 1000])
def test_the_fixed_derangement_has_no_fixed_point(n):
    # Catches: a chance level that compares a digit with its own request (error 0, not chance).
    d = measure.derangement(n)
    assert sorted(d.tolist()) == list(range(n)) and bool((d != torch.arange(n)).all())


def test_the_split_holds_out_the_earlier_runners_reference_digits(digits):
    # The page: randperm(5000) seeded 7, the first 1,000 held out, "the same 1,000 digits the earlier
    # runner used as its reference". Catches a split that trains on the reference digits.
    data, _ = digits
    sp = measure.split(data.shape[0])
    assert torch.equal(data[sp.held_out], reference_sample("mnist28", data, 1000))
    assert sp.train.numel() == 4000 and not set(sp.train.tolist()) & set(sp.held_out.tolist())


def test_ink_and_slant_on_the_digits_are_what_the_page_measured(digits):
    # The page, measured while choosing the condition: on the 5,000 digits the class explains 35 %
    # of ink's variance and 10 % of slant's, and the two correlate at r = -0.03. Catches another
    # definition of either (slant's sign, moments not weighted by intensity).
    data, labels = digits
    cond = measure.ink_and_slant(data)
    assert bool(torch.isfinite(cond).all())

    def explained(v: torch.Tensor) -> float:
        between = sum(((labels == d).sum() * (v[labels == d].mean() - v.mean()) ** 2) for d in range(10))
        return float(between / ((v - v.mean()) ** 2).sum())

    assert explained(cond[:, 0]) == pytest.approx(0.35, abs=0.01)
    assert explained(cond[:, 1]) == pytest.approx(0.10, abs=0.01)
    assert measure.pearson(cond[:, 0], cond[:, 1]) == pytest.approx(-0.03, abs=0.01)


def test_ink_buckets_are_the_deciles_within_each_digit(tiny_ctx):
    # Catches: deciles over all digits (a bucket would then mostly hold one digit's heavy strokes),
    # an off-by-one making 11 buckets or an empty one.
    labels, digits_ = tiny_ctx.labels["classes100"], tiny_ctx.digits
    assert torch.equal(labels // 10, digits_) and int(labels.max()) < 100
    for d in range(10):
        counts = torch.bincount(labels[digits_ == d] % 10, minlength=10)
        n = int((digits_ == d).sum())
        assert counts.numel() == 10 and float((counts - n / 10).abs().max()) <= 3
    held = tiny_ctx.held_labels["classes100"]
    assert torch.equal(held // 10, tiny_ctx.held_digits)
    assert 0.05 < float((held % 10 == 0).float().mean()) < 0.16  # held-out digits fall in every bucket


def test_conditions_are_standardised_with_the_training_digits(tiny_ctx):
    torch.testing.assert_close(
        tiny_ctx.cond_train.double().mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        tiny_ctx.cond_train.double().std(0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------------------------------
# The leak diagnostic


def test_the_leak_of_noise_along_the_fitted_offsets_is_their_length():
    # Oracle: data exactly linear in the conditions plus an offset and a part orthogonal to them,
    # so the fitted offsets are `C_centred W` by construction. Noise equal to them leaks exactly
    # their Frobenius norm. Catches: no centring (the offset), the raw data instead of the fit (the
    # orthogonal part), a normalisation by the noise.
    g = torch.Generator().manual_seed(0)
    c = torch.randn(64, 2, generator=g, dtype=torch.float64)
    w = torch.randn(2, 10, generator=g, dtype=torch.float64)
    basis = torch.cat([torch.ones(64, 1, dtype=torch.float64), c], dim=1)
    r = torch.randn(64, 10, generator=g, dtype=torch.float64)
    r -= basis @ torch.linalg.lstsq(basis, r).solution  # orthogonal to the constant and the conditions
    x0 = c @ w + 3.0 + r
    v = (c - c.mean(0)) @ w
    assert measure.condition_leak(x0, c, v) == pytest.approx(float(v.norm()), rel=1e-9)
    assert measure.condition_leak(x0, c, 2.5 * v / v.norm()) == pytest.approx(2.5, rel=1e-9)


def test_the_leak_of_independent_noise_is_standard_normal():
    # The page's null: N(0, 1) per batch. Catches a per-item normalisation or a missing square root.
    g = torch.Generator().manual_seed(1)
    leaks = torch.tensor([
        measure.condition_leak(torch.randn(32, 16, generator=g), torch.randn(32, 2, generator=g),
                               torch.randn(32, 16, generator=g))
        for _ in range(2000)
    ])  # fmt: skip
    assert abs(float(leaks.mean())) < 0.1 and 0.85 < float(leaks.var()) < 1.15


def test_on_digits_plain_ot_leaks_and_independent_pairs_do_not(tiny_ctx):
    # The page's expectation (30 batches of 128): ot 8.0, knn 1.5, independent about 0. Catches a
    # leak of the drawn instead of the coupled noise, and arms that couple with the wrong method.
    g = torch.Generator().manual_seed(2)
    means = {arm: 0.0 for arm in ("independent", "ot", "knn")}
    for _ in range(4):
        i = torch.randperm(4000, generator=g)[:128]
        x0, cond, noise = tiny_ctx.train[i], tiny_ctx.cond_train[i], torch.randn(128, 784, generator=g)
        for arm in means:
            _, diag = runner.couple_a(arm, x0, noise, cond, runner.Settings(), g)
            means[arm] += diag["leak"] / 4
    assert means["ot"] > 4.0 and abs(means["independent"]) < 2.0 and 0.3 < means["knn"] < means["ot"]


# ----------------------------------------------------------------------------------------------------
# Statistics and decisions


def test_sign_test_p_values_are_the_exact_binomial_tails():
    # Oracle: the page's numbers (10 of 10: 1/1024, 9 of 10: 11/1024, 8 of 10: 56/1024) and scipy's
    # two-sided binomtest. Catches a two-sided p used for the one-sided primary, or ties counted.
    from scipy.stats import binomtest

    assert stats.one_sided_p([-1.0] * 10) == pytest.approx(1 / 1024)
    assert stats.one_sided_p([-1.0] * 9 + [2.0]) == pytest.approx(11 / 1024)
    assert stats.one_sided_p([-1.0] * 8 + [2.0] * 2) == pytest.approx(56 / 1024)
    assert stats.one_sided_p([-1.0] * 9 + [0.0]) == pytest.approx(1 / 512)  # the tie is left out
    assert stats.one_sided_p([-1.0] * 9 + [2.0], toward="worse") == pytest.approx(1023 / 1024)
    assert stats.one_sided_p([0.1] * 9 + [-1.0], lower_is_better=False) == pytest.approx(11 / 1024)
    diffs = [-1.0] * 7 + [1.0] * 3
    two = stats.compare(dict(enumerate(diffs)), dict.fromkeys(range(10), 0.0), "fid_clf")
    assert two["sign_p"] == pytest.approx(binomtest(7, 10, 0.5).pvalue)


def test_holm_against_a_hand_computation():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([1 / 1024, 0.5, 0.5, 0.5])[0] == pytest.approx(4 / 1024)  # the page: 0.004


def _cell(diff: float, jitter: float, b_sd: float, n: int = 10, sign_flips: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    b = {s: 50.0 + b_sd * float(v) for s, v in enumerate(torch.randn(n, generator=g))}
    b_sd_real = float(torch.tensor(list(b.values())).std())
    b = {s: 50.0 + (v - 50.0) * b_sd / b_sd_real for s, v in b.items()}  # exactly b_sd
    d = [diff + jitter * float(v) for v in torch.randn(n, generator=g)]
    for i in range(sign_flips):
        d[i] = -d[i]
    return {s: b[s] + d[s] for s in b}, b


def test_the_decision_rules_on_constructed_differences():
    # Catches: a rule without the size condition (10 of 10 seeds better by less than B's SD must
    # be "level", not "better"), a level call from a point estimate instead of the whole interval,
    # and a missing mirror for harm.
    assert stats.compare(*_cell(-3.0, 0.3, 1.0), "fid_clf")["decision"] == "better"
    assert stats.compare(*_cell(3.0, 0.3, 1.0), "fid_clf")["decision"] == "worse"
    small = stats.compare(*_cell(-0.5, 0.05, 2.0), "fid_clf")
    assert small["a_better"] == 10 and small["sign_p"] < 0.01 and small["decision"] == "level"
    assert stats.compare(*_cell(-0.5, 3.0, 1.0), "fid_clf")["decision"] == "undecided"
    # accuracy: higher is better, so a positive difference is "better"
    assert stats.compare(*_cell(0.05, 0.005, 0.01), "class_acc")["decision"] == "better"


def test_the_primary_family_needs_nine_of_ten_in_every_cell():
    # The page: with 10 seeds, 9 of 10 passes Holm (4 x 11/1024 = 0.043), 8 of 10 cannot (0.055
    # alone). Catches an uncorrected primary, and a two-sided primary (9 of 10 would then fail).
    nine = stats.primary_family([_cell(-3.0, 0.3, 1.0, sign_flips=1)] * 4, "fid_clf")
    assert [r["holm_better"] for r in nine] == pytest.approx([44 / 1024] * 4)
    assert [r["decision"] for r in nine] == ["better"] * 4
    eight = stats.primary_family([_cell(-3.0, 0.3, 1.0, sign_flips=2)] * 4, "fid_clf")
    assert {r["decision"] for r in eight} == {"undecided"}
    worse = stats.primary_family([_cell(3.0, 0.3, 1.0)] * 4, "fid_clf")
    assert [r["decision"] for r in worse] == ["worse"] * 4 and worse[0]["holm_worse"] == pytest.approx(
        4 / 1024
    )


# ----------------------------------------------------------------------------------------------------
# The report, from synthetic records


def _synthetic(part: str, seeds: int = 10) -> list[dict]:
    s = runner.Settings()
    g = torch.Generator().manual_seed(4)
    out = []
    for setting, arms in runner.PARTS[part].items():
        for i, arm in enumerate(arms):
            for seed in range(seeds):
                evals = []
                for step in s.checkpoints:
                    for w in s.guidance if part == "b" else (None,):
                        for k in s.sampler_steps:
                            e = {"step": step, "euler_steps": k} | ({"guidance": w} if part == "b" else {})
                            noise = float(torch.randn(1, generator=g))
                            # within-p16 better than within-p1 by 5 FID in every cell, seed SD 1
                            e["fid_clf"] = 40.0 - 5.0 * (arm == "within-p16") + noise + i * 0.01
                            e |= {"faith_err": 1.0 + 0.1 * noise, "class_acc": 0.8, "bucket_hit": 0.3}
                            e |= {"ink_err": 0.5, "slant_err": 0.7, "corr_ink": 0.9, "corr_slant": 0.6}
                            evals.append(e)
                out.append({
                    "part": part, "setting": setting, "arm": arm, "seed": seed, "settings": json.loads(
                        json.dumps(asdict(s))), "evals": evals, "started": "2026-01-01T00:00:00+00:00",
                    "provenance": {"library_tree": "t", "commit": "c", "dirty": False, "prereg_commit": "p"},
                    "classifier_heldout_acc": 0.95, "chance": {"faith_err": 1.2}, "leak_mean": 0.1,
                    "leak_batches": 6000, "prior_skew_mean": 0.0, "prior_skew_pools": 6000, "train_s": 50.0,
                })  # fmt: skip
    return out


@pytest.mark.parametrize("part", ["a", "b"])
def test_the_report_renders_every_prelisted_comparison(part):
    # Catches a comparison of the page left out of the report (each numbered secondary, each of its
    # pairs and metrics), and a primary decided on the wrong cells.
    text, result = render(_synthetic(part), part)
    setting, a, b, _ = PRIMARY[part]
    assert f"## Primary: {setting + ': ' if part == 'b' else ''}{a} vs {b}, FID at step 6000" in text
    for number in range(1, 9):
        assert re.search(rf"^## Secondary {number}: ", text, re.M), f"secondary {number} missing"
    for listed in SECONDARY[part]:
        for pa, pb in listed.pairs:
            for metric in listed.metrics:
                label = {"fid_clf": "FID", "faith_err": "faithfulness error", "class_acc": "class accuracy",
                         "bucket_hit": "bucket hit rate"}[metric]  # fmt: skip
                assert f"| {pa} vs {pb} | {label} |" in text
                found = [
                    r
                    for r in result["secondary"]
                    if (r.get("a"), r.get("b"), r.get("metric")) == (pa, pb, metric)
                ]
                assert {r["step"] for r in found} == {
                    1500,
                    3000,
                    6000,
                }  # secondary 8: the earlier checkpoints
    assert len(result["primary"]) == 4
    if part == "b":
        assert [r["decision"] for r in result["primary"]] == ["better"] * 4
        assert "### The primary pair at step 1500, guidance 2.0" in text  # "everything at 1,500"
        assert {r["guidance"] for r in result["secondary"] if r.get("of") == 1} == {1.0, 2.0}
    assert {r["decision"] for r in result["primary"]} <= {"better", "worse", "level", "undecided"}
    assert all(r["n"] == 10 for r in result["primary"])


def test_the_report_of_no_records_says_so():
    assert "No finished runs yet" in render([], "a")[0]


# ----------------------------------------------------------------------------------------------------
# Records: provenance and refusal


def test_a_record_with_another_library_tree_hash_is_refused(tmp_path, monkeypatch):
    # Catches a part that mixes library versions (the page: one library version per part), and a
    # check that refuses the other part's records (the parts are separate experiments).
    prov = rec.provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and re.fullmatch(
        r"[0-9a-f]{40}", prov["library_tree"]
    )
    assert re.fullmatch(r"[0-9a-f]{40}", prov["prereg_commit"]) and isinstance(prov["dirty"], bool)
    settings = asdict(TINY)
    old = {"part": "b", "settings": settings, "provenance": prov | {"library_tree": "0" * 40}}
    rec.write(tmp_path / "records" / "b-classes10-independent-seed0.json", old)
    with pytest.raises(SystemExit, match="tree hash"):
        rec.check_can_add(tmp_path / "records", prov, "b", settings)

    def never(*args, **kwargs):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(runner, "run_unit", never)
    with pytest.raises(SystemExit, match="tree hash"):
        runner.main(["--part", "b", "--tiny", "--out", str(tmp_path)])
    # same library, other settings of the same part: refused too; of the other part: fine
    rec.write(tmp_path / "records" / "b-classes10-independent-seed0.json", old | {"provenance": prov})
    with pytest.raises(SystemExit, match="other settings"):
        rec.check_can_add(tmp_path / "records", prov, "b", asdict(runner.Settings()))
    rec.check_can_add(tmp_path / "records", prov, "a", asdict(runner.Settings()))
    # a part (a) record of another library: part (b) may still add, part (a) may not
    other = {"part": "a", "settings": asdict(runner.Settings()), "provenance": old["provenance"]}
    rec.write(tmp_path / "records" / "a-ink-slant-independent-seed0.json", other)
    rec.check_can_add(tmp_path / "records", prov, "b", settings)
    with pytest.raises(SystemExit, match="one library version per part"):
        rec.check_can_add(tmp_path / "records", prov, "a", asdict(runner.Settings()))


def test_tiny_part_b_stops_between_runs_resumes_and_reports(tmp_path, monkeypatch):
    # End to end, part (b) with --tiny (2 seeds x 2 settings x 4 arms, 32 steps of 16 items).
    # Catches: --max-minutes that cuts a run short or is ignored, a rerun that retrains finished
    # records, records without their provenance, pools that are not k batches, a report whose
    # per-run tables do not find the runner's keys.
    now = [0.0]

    def fake_clock() -> float:
        now[0] += 30.0  # every look at the clock: 30 s later
        return now[0]

    monkeypatch.setattr(runner, "clock", fake_clock)
    calls = []
    real = runner.run_unit
    monkeypatch.setattr(runner, "run_unit", lambda *a, **k: calls.append(a[:4]) or real(*a, **k))
    out = ["--part", "b", "--tiny", "--out", str(tmp_path)]
    runner.main([*out, "--max-minutes", "1.2"])  # deadline 72 s after the first look: two runs
    first = sorted((tmp_path / "records").glob("*.json"))
    assert len(calls) == 2 and [p.name for p in first] == [
        "b-classes100-independent-seed0.json", "b-classes100-within-p1-seed0.json"]  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in first}
    monkeypatch.setattr(runner, "clock", runner.time.monotonic)
    runner.main(out)
    assert len(calls) == 16 and {p: p.stat().st_mtime_ns for p in first} == stamps  # resumed
    records = rec.load(tmp_path / "records")
    assert len(records) == 16 and len({r["provenance"]["library_tree"] for r in records}) == 1
    for r in records:
        assert r["pools"] == TINY.steps // runner.pool_batches(r["arm"])
        assert r["prior_skew_batches"] == TINY.steps and r["prior_skew_mean"] is not None
        assert r["started"] and r["provenance"]["prereg_commit"]
        assert len(r["evals"]) == len(TINY.checkpoints) * len(TINY.guidance) * len(TINY.sampler_steps)
    reductions = {r["arm"]: r["reduction_pct_mean"] for r in records if r["setting"] == "classes10"}
    assert reductions["independent"] == 0 < reductions["within-p1"] < reductions["within-p16"]
    result = runner.main([*out, "--report"])
    text = (tmp_path / "report-b.md").read_text()
    assert (
        result["records"] == 16 and len(result["primary"]) == 4 and "| classes100 | within-p16 | 2 |" in text
    )
    assert "n/a (" not in text.split("## Secondary 6")[1].split("## Secondary 8")[0]  # keys found


def test_plan_counts_the_runs_left_and_caches_nothing(tmp_path, capsys):
    result = runner.main(["--part", "b", "--tiny", "--plan", "--out", str(tmp_path)])
    # Catches a plan that times one arm for all (the arms' costs differ by up to 2x) or skips some.
    assert result["left"] == result["total"] == 16 and result["minutes"] > 0
    assert set(result["per_run_s"]) == {(s, a) for s, arms in runner.PARTS["b"].items() for a in arms}
    assert all(v > 0 for v in result["per_run_s"].values())
    out = capsys.readouterr().out
    assert "16 of 16 runs left" in out and out.count(" ms/step") == 8 and not (tmp_path / "cache").exists()


def test_runs_are_seed_major():
    order = runner.units("b", runner.Settings())
    assert [u[2] for u in order[:8]] == [0] * 8 and order[8][2] == 1 and len(order) == 80
    assert len(runner.units("a", runner.Settings())) == 40


# ----------------------------------------------------------------------------------------------------
# Paired streams and pools


@pytest.mark.parametrize(("part", "setting", "arms"), [
    ("b", "classes100", ("independent", "within-p4")),
    ("a", "ink-slant", ("independent", "knn")),
])  # fmt: skip
def test_two_arms_of_a_seed_draw_the_same_streams(tiny_ctx, part, setting, arms):
    # Compares the drawn tensors. Catches: a coupling that consumes the noise stream (knn's extra
    # candidates drawn from it), pools that draw their batches in another order, drops or times
    # drawn per pool instead of per step, and streams shared across seeds.
    traces = {}
    for arm in arms:
        traces[arm] = []
        runner.run_unit(part, setting, arm, 0, TINY, tiny_ctx, trace=traces[arm])
    other: list = []
    runner.run_unit(part, setting, arms[0], 1, TINY, tiny_ctx, trace=other)
    a, b = (traces[arm] for arm in arms)
    assert len(a) == len(b) == TINY.steps + 1
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert "drop" in a[1] if part == "b" else "drop" not in a[1]
    assert not torch.equal(a[0]["eval_noise"], other[0]["eval_noise"])
    assert not torch.equal(a[1]["index"], other[1]["index"])


def test_a_pool_keeps_every_item_in_its_batch_and_couples_within_classes():
    # Catches a pool coupling that lets items change batch, or couples across classes.
    g = torch.Generator().manual_seed(5)
    x0s = [torch.randn(8, 6, generator=g) for _ in range(3)]
    noises = [torch.randn(8, 6, generator=g) for _ in range(3)]
    labels = [torch.randint(3, (8,), generator=g) for _ in range(3)]
    coupled, res = runner.couple_pool(runner.LSA, x0s, noises, labels)
    assert [c.shape for c in coupled] == [x.shape for x in x0s]
    pool = torch.cat(noises)
    assert torch.equal(torch.cat(coupled), pool[res.index])  # a permutation of the pool's draws
    # within classes: the items of label c (ascending) share the pool positions of block c
    flat, start = torch.cat(labels), 0
    for c in flat.unique().tolist():
        n_c = int((flat == c).sum())
        assert sorted(res.index[flat == c].tolist()) == list(range(start, start + n_c))
        start += n_c
    assert res.prior_skew is not None


def test_the_runners_pools_equal_the_librarys_worker_pools():
    # The page: "A test of the runner checks that its coupled pools equal those of
    # CouplingCollate(pool_batches=k) given the same items and noise."
    g = torch.Generator().manual_seed(6)
    for k in (1, 4):
        x0s = [torch.rand(16, 784, generator=g) * 2 - 1 for _ in range(k)]
        noises = [torch.randn(16, 784, generator=g) for _ in range(k)]
        labels = [torch.randint(10, (16,), generator=g) for _ in range(k)]
        collate = CouplingCollate("lsa", metric="sqeuclidean", pool_batches=k, seed=0)
        theirs = collate.couple_pool(x0s, noises, labels)
        mine, _ = runner.couple_pool(runner.LSA, x0s, noises, labels)
        assert len(theirs) == k
        for t, m in zip(theirs, mine, strict=True):
            torch.testing.assert_close(t.noise, m)


# ----------------------------------------------------------------------------------------------------
# The classifier


def test_the_classifier_is_trained_on_the_training_digits_only_and_cached(tmp_path, monkeypatch, digits):
    # Catches: a classifier that saw the held-out digits (FID against them would be flattered), a
    # cache under another name, a cache that is not used on the next run.
    assert runner.classifier_name(runner.Settings()) == "mnist28-train4000"
    seen = []
    real = regimes_metrics.train_classifier
    monkeypatch.setattr(regimes_metrics, "train_classifier", lambda x, y, e: seen.append(x) or real(x, y, e))
    ctx = runner.context(tmp_path, TINY)
    data, _ = digits
    assert len(seen) == 1 and torch.equal(seen[0], data[measure.split(5000).train])
    assert (
        tmp_path / f"classifier-{runner.classifier_name(TINY)}.pt"
    ).exists() and 0.5 < ctx.classifier_acc <= 1

    def never(*args):
        raise AssertionError("retrained")

    monkeypatch.setattr(regimes_metrics, "train_classifier", never)
    again = runner.context(tmp_path, TINY)
    assert again.classifier_acc == ctx.classifier_acc


# ----------------------------------------------------------------------------------------------------
# Part (a) with the library's condition-aware coupling


def test_tiny_part_a_runs_every_arm_and_records_the_weight_search(tmp_path):
    # Catches an ot-cond arm whose weight search misses the page's tolerance (r within 0.001 of 0.2),
    # and a record without the library's own leak beside the runner's.
    runner.main(["--part", "a", "--tiny", "--out", str(tmp_path)])
    records = rec.load(tmp_path / "records")
    assert len(records) == 8
    cond = [r for r in records if r["arm"] == "ot-cond"]
    assert all(r["w_mean"] is not None and r["r_mean"] == pytest.approx(0.2, abs=0.01) for r in cond)
    assert all(r["library_leak_mean"] is not None for r in records if r["arm"] in ("ot", "ot-cond"))
    text, result = render(records, "a")
    assert len(result["primary"]) == 4 and "## Secondary 7" in text


def test_the_ot_cond_spec_is_the_pages():
    spec = runner.ot_cond_spec(runner.Settings())
    assert (spec.method, spec.metric) == ("lsa", "sqeuclidean")
    assert (spec.candidate_share, spec.condition_metric) == (0.2, "sqeuclidean")
    assert isinstance(runner.LSA, CouplingSpec) and runner.LSA.metric == "sqeuclidean"


def test_the_committed_part_a_report_is_a_rerender_of_its_records():
    # Catches a report edited by hand, and records changed (or added) after the report was written.
    records = rec.load(ROOT / "experiments/conditions_fm/records")
    text, result = render(records, "a")
    assert (
        result["records"] == 40
        and len({r["provenance"]["library_tree"] for r in records if r["part"] == "a"}) == 1
    )
    assert (ROOT / "docs/results/conditions_fm_report_a.md").read_text() == text


def test_the_committed_part_b_report_is_a_rerender_of_its_records():
    # Catches a report edited by hand, records changed or added after it was written, and a part
    # whose runs mixed library versions (the runner refuses that; this checks the committed folder).
    records = rec.load(ROOT / "experiments/conditions_fm/records")
    text, result = render(records, "b")
    part_b = [r for r in records if r["part"] == "b"]
    assert result["records"] == len(part_b) == 80
    assert len({r["provenance"]["library_tree"] for r in part_b}) == 1
    assert not any(r["provenance"]["dirty"] for r in part_b)
    assert (ROOT / "docs/results/conditions_fm_report_b.md").read_text() == text
