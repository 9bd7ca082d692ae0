"""The pre-listed comparisons of the conditional flow-matching sweep (`conditional_fm.py`), as Markdown.

Every comparison is paired by seed (arms of a seed share every random stream): the per-seed
difference `A - B` of a metric, its mean, a 95 % t interval and the exact two-sided sign test. The
primary family (ot-within vs ot, FID at the last checkpoint with the primary guidance scale, at
1, 2, 4 and 8 Euler steps) is Holm-corrected; the rest is reported uncorrected, as pre-registered.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

COMPARISONS = (("ot-within", "ot"), ("ot-within", "independent"), ("ot", "independent"))


def load(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def paired(records: list[dict[str, Any]], a: str, b: str, cell: dict[str, Any], metric: str) -> list[float]:
    """Per-seed `a - b` of `metric` in the evaluation `cell` (seeds where both arms finished)."""

    def value(arm: str, seed: int) -> float | None:
        for r in records:
            if r["arm"] == arm and r["seed"] == seed:
                for e in r["evals"]:
                    if all(e[k] == v for k, v in cell.items()):
                        return e[metric]
        return None

    seeds = sorted({r["seed"] for r in records})
    pairs = [(value(a, s), value(b, s)) for s in seeds]
    return [x - y for x, y in pairs if x is not None and y is not None]


def summary(diffs: list[float], lower_is_better: bool = True) -> dict[str, float]:
    """Mean, 95 % t interval and the exact two-sided sign-test p of paired differences.

    `a_better` counts the seeds where A is better: a negative difference for FID, a positive one
    for class accuracy (`lower_is_better=False`).
    """
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    wins = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    nonzero = sum(d != 0 for d in diffs)
    p = stats.binomtest(wins, nonzero, 0.5).pvalue if nonzero else 1.0
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sign_p": p, "a_better": wins}


def holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p values (same order)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def _row(label: str, s: dict[str, float], extra: str = "") -> str:
    return (
        f"| {label} | {s['n']} | {s['mean']:+.3f} | [{s['lo']:+.3f}, {s['hi']:+.3f}] | "
        f"{s['a_better']}/{s['n']} | {s['sign_p']:.3f} |{extra}"
    )


def _arm_means(records: list[dict[str, Any]], settings: dict[str, Any], step: int, w: float) -> list[str]:
    """Each arm's mean FID and class accuracy over seeds at the last checkpoint (context for the tests)."""
    arms = sorted({r["arm"] for r in records})
    lines = [f"## Each arm at step {step}, guidance {w}: mean over seeds (FID / class accuracy)", ""]
    lines += ["| Euler steps | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for k in settings["sampler_steps"]:
        cells = []
        for arm in arms:
            values = [
                (e["fid_clf"], e["class_acc"])
                for r in records if r["arm"] == arm
                for e in r["evals"] if (e["step"], e["guidance"], e["euler_steps"]) == (step, w, k)
            ]  # fmt: skip
            fid = statistics.fmean(v[0] for v in values) if values else math.nan
            acc = statistics.fmean(v[1] for v in values) if values else math.nan
            cells.append(f"{fid:.1f} / {acc:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(out: Path, path: Path, arms: list[str]) -> dict[str, Any]:
    """Writes the comparisons to `path` and returns them; nothing to compare yields a short note."""
    records = load(out)
    if not records:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("No finished runs yet.\n")
        return {"records": 0}
    settings = records[0]["settings"]
    last, w0 = max(settings["checkpoints"]), settings["guidance"][0]
    lines = ["# Conditional flow matching: the pre-listed comparisons", ""]
    lines += [
        f"{len(records)} finished (arm, seed) runs. Differences are A - B: for the FID negative means A "
        "is better, for class accuracy positive means A is better (the `A better` column counts seeds "
        "either way).",
        "",
    ]
    lines += _arm_means(records, settings, last, w0)
    head = "| cell | seeds | mean A - B | 95 % CI | A better | sign p |"
    primary = [
        summary(
            paired(records, "ot-within", "ot", {"step": last, "guidance": w0, "euler_steps": k}, "fid_clf")
        )
        for k in settings["sampler_steps"]
    ]
    adjusted = holm([s["sign_p"] for s in primary])
    lines += ["## Primary: ot-within vs ot, FID at the last checkpoint, guidance " + f"{w0}", ""]
    lines += [head + " Holm p |", "|---|---|---|---|---|---|---|"]
    for k, s, p in zip(settings["sampler_steps"], primary, adjusted, strict=True):
        lines.append(_row(f"{k} Euler steps", s, f" {p:.3f} |"))
    result: dict[str, Any] = {"records": len(records), "primary": primary, "holm": adjusted, "secondary": []}
    for a, b in COMPARISONS:
        for metric in ("fid_clf", "class_acc"):
            lines += ["", f"## {a} vs {b}: {metric}, every checkpoint and guidance scale", "", head]
            lines.append("|---|---|---|---|---|---|")
            for step in settings["checkpoints"]:
                for w in settings["guidance"]:
                    for k in settings["sampler_steps"]:
                        cell = {"step": step, "guidance": w, "euler_steps": k}
                        s = summary(paired(records, a, b, cell, metric), metric != "class_acc")
                        result["secondary"].append({"a": a, "b": b, "metric": metric, **cell, **s})
                        lines.append(_row(f"step {step}, w {w}, {k} steps", s))
    lines += ["", "## The prior-skew diagnostic per arm (mean over training batches, then over seeds)", ""]
    lines += ["| arm | seeds | mean | SE over seeds | null SE of one run |", "|---|---|---|---|---|"]
    for arm in arms:
        values = [r["prior_skew_mean"] for r in records if r["arm"] == arm]
        batches = [r["prior_skew_batches"] for r in records if r["arm"] == arm]
        if values:
            se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
            lines.append(
                f"| {arm} | {len(values)} | {statistics.fmean(values):+.3f} | {se:.3f} | "
                f"{1 / math.sqrt(min(batches)):.3f} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return result
