"""Steps to quality in the regimes sweep, from its three checkpoints (250, 500 and 1,000 steps).

For each (dataset, objective, arm, sampler steps) on the dataset's primary metric: per seed, the
training steps the arm needs to reach the best value its paired `none` run reached at any
checkpoint (not its last: the baseline's few-step distance can rise with training), linearly
interpolated between checkpoints, and the speed-up (the baseline's step of its best / the arm's
step), with the geometric mean, its 95 % t-interval and the sign tests of `speedup.speedup_stats`.
With three checkpoints the resolution is coarse: an arm already at or below the target at the
first checkpoint (250 steps) gets 250 steps, an upper bound, so its speed-up is a lower bound.
"""

from __future__ import annotations

from typing import Any

from speedup import speedup_stats, steps_to_quality

#: Arms shown in the report's summary table (pool 256: the others are in the full table).
SUMMARY_ARMS = ("lsa-l2-p256", "lsa-sq-p256", "knn4", "normctrl")


def curve(rec: dict[str, Any], objective: str, sampler_steps: str, metric: str) -> list[dict[str, float]]:
    """``[{"step": 250, metric: value}, ...]`` of one record, in checkpoint order."""
    evals = rec["objectives"][objective]["evals"]
    return [{"step": int(s), metric: evals[s][sampler_steps][metric]} for s in sorted(evals, key=int)]


def quality_rows(
    recs: dict[tuple[str, str, int], dict], primary_metric: dict[str, str], baseline: str = "none"
) -> list[dict[str, Any]]:
    """One row per (dataset, objective, arm, sampler steps) with paired seeds, on the primary metric."""
    rows = []
    for dataset, arm in sorted({(d, a) for d, a, _ in recs if a != baseline}):
        seeds = sorted(s for d, a, s in recs if (d, a) == (dataset, arm) and (dataset, baseline, s) in recs)
        if not seeds:
            continue
        metric = primary_metric[dataset]
        first = recs[(dataset, arm, seeds[0])]
        for objective in first["objectives"]:
            evals = first["objectives"][objective]["evals"]
            for k in sorted(next(iter(evals.values())), key=int):
                per_seed = [
                    steps_to_quality(
                        curve(recs[(dataset, arm, s)], objective, k, metric),
                        curve(recs[(dataset, baseline, s)], objective, k, metric),
                        metric,
                    )
                    for s in seeds
                ]
                row = {"dataset": dataset, "objective": objective, "arm": arm, "sampler_steps": k}
                row |= {"metric": metric, "per_seed": per_seed, **speedup_stats(per_seed)}
                row["at_first_eval"] = sum(r["at_first_eval"] for r in per_seed)
                rows.append(row)
    return rows


def _factor(row: dict[str, Any]) -> str:
    if row["geomean"] is None:
        return "-"
    if row["at_first_eval"] == row["n"]:  # every seed already there at the first checkpoint: a bound only
        return f"≥ {row['geomean']:.2f}x"
    ci = f" [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]" if row["ci95"] else ""
    return f"{row['geomean']:.2f}x{ci}{'*' if row['censored'] else ''}"


def _base_steps(row: dict[str, Any]) -> str:
    steps = sorted(int(r["base_steps"]) for r in row["per_seed"])
    return ", ".join(str(s) for s in steps)


HEAD = ("data", "objective", "arm", "sampler steps", "baseline's best at (per seed)", "speed-up [95 % CI]",
        "faster/slower (p)", "> 2x (one-sided p)", "at 250 already")  # fmt: skip


def quality_markdown(rows: list[dict[str, Any]], arms: tuple[str, ...] | None = None) -> str:
    """The steps-to-quality table (all rows, or only ``arms``) as Markdown."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        if arms is not None and r["arm"] not in arms:
            continue
        tests = (
            f"{r['faster']}/{r['slower']} ({r['p_faster']:.2g})",
            f"{r['above_claim']}/{r['n']} ({r['p_claim']:.2g})",
        )
        where = (r["dataset"], r["objective"], r["arm"], r["sampler_steps"])
        cells = (*where, _base_steps(r), _factor(r), *tests, f"{r['at_first_eval']}/{r['n']}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def quality_section(rows: list[dict[str, Any]]) -> str:
    """The report's section: what the measure is, then every row."""
    return "\n".join(
        [
            "",
            "## Steps to quality (primary metric; exploratory)",
            "",
            "Per seed: the training steps the arm needs to reach the best value its paired `none` run"
            " reached at any checkpoint (250, 500, 1,000 steps), linearly interpolated; speed-up = the"
            " baseline's step of its best / the arm's step, geometric mean over seeds [95 % t-interval on"
            " log factors]. `*`: a seed never reached it and enters at its upper bound, so the mean is an"
            " upper estimate. A seed already there at 250 steps counts as reached at 250, a lower bound on"
            " its factor; `≥`: every seed was, so only a lower bound is known. Faster/slower than the"
            " baseline with a two-sided sign test; more than 2x faster with a one-sided sign test.",
            "",
            quality_markdown(rows).rstrip(),
            "",
        ]
    )
