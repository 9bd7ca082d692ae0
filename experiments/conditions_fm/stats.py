"""The statistics of every comparison of the conditions experiment, and its decision rules.

Per seed, the difference `A - B` of a metric. Reported: its mean, a 95 % t interval, the seeds where
A was better and an exact sign test. A primary family is one-sided in its pre-stated direction and
Holm-corrected over its four Euler step counts (and the mirror family for harm); a secondary test
is two-sided and uncorrected. The decision (`decide`) is the page's: better, worse, level or
undecided. `summary` and `holm` are the earlier runner's (`benchmarks/conditional_fm_report.py`).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from conditional_fm_report import holm, summary

__all__ = ["ALPHA", "HIGHER_IS_BETTER", "compare", "decide", "holm", "one_sided_p", "primary_family"]

#: The level of every test.
ALPHA = 0.05
#: Metrics where a larger value is better (every other one: lower is better).
HIGHER_IS_BETTER = frozenset({"class_acc", "bucket_hit", "corr_ink", "corr_slant"})


def one_sided_p(diffs: list[float], lower_is_better: bool = True, toward: str = "better") -> float:
    """Exact one-sided sign-test p that A is better (`toward="better"`) or worse than B.

    Seeds with a zero difference are left out (the usual sign test).
    """
    better = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    nonzero = sum(d != 0 for d in diffs)
    if not nonzero:
        return 1.0
    hits = better if toward == "better" else nonzero - better
    return float(stats.binomtest(hits, nonzero, 0.5, alternative="greater").pvalue)


def decide(s: dict[str, Any], sd_b: float, p_better: float, p_worse: float, lower_is_better: bool) -> str:
    """The page's rule for one cell.

    Args:
        s: The cell's `summary` (mean, `lo`, `hi` of the 95 % interval of `A - B`).
        sd_b: B's seed-to-seed standard deviation in that cell.
        p_better: The p that decides "better" (Holm-adjusted one-sided for a primary, two-sided
            otherwise).
        p_worse: The p that decides "worse" (the mirror family for a primary).
        lower_is_better: The metric's direction (FID and errors: lower is better).

    Returns:
        `"better"`: p below 0.05, the interval on A's good side of 0 and the mean difference larger
        in size than B's SD; `"worse"`: the mirror image; `"level"`: the interval within plus or
        minus B's SD; `"undecided"`: anything else.
    """
    lo, hi = (s["lo"], s["hi"]) if lower_is_better else (-s["hi"], -s["lo"])
    large = abs(s["mean"]) > sd_b
    if p_better < ALPHA and hi < 0 and large:
        return "better"
    if p_worse < ALPHA and lo > 0 and large:
        return "worse"
    if -sd_b <= lo and hi <= sd_b:
        return "level"
    return "undecided"


def compare(a: dict[int, float], b: dict[int, float], metric: str) -> dict[str, Any]:
    """A two-sided, uncorrected secondary comparison of one cell, paired by seed.

    Args:
        a: Per seed, A's value of `metric` in the cell.
        b: Per seed, B's value.
        metric: Its name (sets the direction, `HIGHER_IS_BETTER`).

    Returns:
        `summary`'s fields plus `sd_b` (B's SD over the paired seeds) and `decision`.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    lower = metric not in HIGHER_IS_BETTER
    out: dict[str, Any] = summary(diffs, lower)
    out["sd_b"] = statistics.stdev([b[s] for s in seeds]) if len(seeds) > 1 else math.nan
    out["decision"] = decide(out, out["sd_b"], out["sign_p"], out["sign_p"], lower)
    return out


def primary_family(
    cells: list[tuple[dict[int, float], dict[int, float]]], metric: str
) -> list[dict[str, Any]]:
    """The primary family: one-sided sign tests toward "A better", Holm-corrected over the cells.

    Harm is the mirror family (one-sided toward "A worse", Holm-corrected over the same cells).
    Each cell's result carries `p_better`, `p_worse`, their Holm adjustments `holm_better` and
    `holm_worse`, `sd_b` and the `decision` made with the adjusted p values.
    """
    lower = metric not in HIGHER_IS_BETTER
    rows = []
    for a, b in cells:
        seeds = sorted(set(a) & set(b))
        diffs = [a[s] - b[s] for s in seeds]
        row: dict[str, Any] = summary(diffs, lower)
        row["sd_b"] = statistics.stdev([b[s] for s in seeds]) if len(seeds) > 1 else math.nan
        row["p_better"] = one_sided_p(diffs, lower, "better")
        row["p_worse"] = one_sided_p(diffs, lower, "worse")
        rows.append(row)
    for key in ("better", "worse"):
        for row, p in zip(rows, holm([r[f"p_{key}"] for r in rows]), strict=True):
            row[f"holm_{key}"] = p
    for row in rows:
        row["decision"] = decide(row, row["sd_b"], row["holm_better"], row["holm_worse"], lower)
    return rows
