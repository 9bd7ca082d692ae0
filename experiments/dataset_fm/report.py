"""Every pre-listed comparison of the dataset-level coupling experiment, from its records, as Markdown.

The primary: `dataset` vs `independent`, FID against held-out digits at the last step, at 1, 2, 4
and 8 Euler steps, one-sided and Holm-corrected; then secondaries 1-6 of
`docs/results/dataset-coupling-preregistration.md` in its order. Nothing is trained here.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from experiments.conditions_fm.stats import compare, primary_family

MEMORISATION = ("copy_share", "near_share", "distance_ratio")


def values(records: list[dict[str, Any]], arm: str, metric: str, step: int, k: int) -> dict[int, float]:
    """Per seed, `arm`'s `metric` at training step `step` and `k` Euler steps."""
    out = {}
    for r in records:
        if r["arm"] != arm:
            continue
        for row in r["evals"]:
            if row["step"] == step and row["euler_steps"] == k and metric in row:
                out[r["seed"]] = float(row[metric])
    return out


def steps_to_best(records: list[dict[str, Any]], arm: str, k: int) -> dict[int, float | None]:
    """Per seed, the speed-up: the baseline's step at its best FID over `arm`'s first step at or below it.

    `None` for a seed where `arm` never gets there.
    """
    out: dict[int, float | None] = {}
    by = {(r["arm"], r["seed"]): r for r in records}
    for (a, seed), r in by.items():
        base = by.get(("independent", seed))
        if a != arm or base is None:
            continue
        curve = [(row["step"], row["fid_clf"]) for row in base["evals"] if row["euler_steps"] == k]
        best_step, best = min(curve, key=lambda sv: (sv[1], sv[0]))
        reached = [row["step"] for row in r["evals"] if row["euler_steps"] == k and row["fid_clf"] <= best]
        out[seed] = best_step / min(reached) if reached else None
    return out


def _fmt(x: float, f: str = "+.3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, f)


def _row(label: str, s: dict[str, Any], extra: str = "") -> str:
    return (
        f"| {label} | {s['n']} | {_fmt(s['mean'])} | [{_fmt(s['lo'])}, {_fmt(s['hi'])}] | "
        f"{s['a_better']}/{s['n']} | {_fmt(s['sd_b'], '.3f')} |{extra} {s['decision']} |"
    )


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return f"{statistics.fmean(xs):.3f} ± {_fmt(sd, '.3f')}"


def render(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The report's Markdown and a summary (`records`, `primary`)."""
    if not records:
        return "# Dataset-level coupling: report\n\nNo finished runs yet.\n", {"records": 0, "primary": []}
    s = records[0]["settings"]
    last, ks = s["steps"], s["sampler_steps"]
    lines = [
        "# Dataset-level coupling: report",
        "",
        f"Rendered by `python experiments/dataset_fm/run.py --report` from {len(records)} records "
        f"(seeds {sorted({r['seed'] for r in records})}). FID: the classifier FID against the "
        "held-out digits. Differences are A - B (negative: A better or memorising less).",
        "",
        f"## Primary: dataset vs independent, FID at step {last}",
        "",
        "| Euler steps | seeds | mean A - B | 95 % interval | A better | B's SD | Holm p (better) "
        "| decision |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    cells = [
        (values(records, "dataset", "fid_clf", last, k), values(records, "independent", "fid_clf", last, k))
        for k in ks
    ]
    primary = primary_family(cells, "fid_clf")
    for k, row in zip(ks, primary, strict=True):
        lines.append(
            f"| {k} | {row['n']} | {_fmt(row['mean'])} | [{_fmt(row['lo'])}, {_fmt(row['hi'])}] | "
            f"{row['a_better']}/{row['n']} | {_fmt(row['sd_b'], '.3f')} | "
            f"{_fmt(row['holm_better'], '.4f')} | "
            f"{row['decision']} |"
        )
    header = [
        "",
        "| cell | seeds | mean A - B | 95 % interval | A better | B's SD | decision |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for number, (a, b) in enumerate([("dataset", "batch-ot"), ("batch-ot", "independent")], start=1):
        lines += ["", f"## Secondary {number}: {a} vs {b}, FID at step {last} (two-sided)", *header]
        for k in ks:
            lines.append(
                _row(
                    f"{k} steps",
                    compare(
                        values(records, a, "fid_clf", last, k),
                        values(records, b, "fid_clf", last, k),
                        "fid_clf",
                    ),
                )
            )
    lines += ["", f"## Secondary 3: memorisation at step {last}", "",
              f"Held-out reference: median nearest-training distance {records[0]['held_nn_median']:.3f}, "
              f"smallest {records[0]['held_nn_min']:.3f}.", "",
              "| arm | Euler steps | " + " | ".join(MEMORISATION) + " |",
              "|---|---:|" + "---:|" * len(MEMORISATION)]  # fmt: skip
    for arm in ("independent", "batch-ot", "dataset"):
        for k in ks:
            cells_m = [_mean_sd(list(values(records, arm, m, last, k).values())) for m in MEMORISATION]
            lines.append(f"| {arm} | {k} | " + " | ".join(cells_m) + " |")
    for other in ("independent", "batch-ot"):
        lines += ["", f"dataset vs {other}:", "", *header[1:]]
        for m in MEMORISATION:
            for k in ks:
                lines.append(
                    _row(
                        f"{m}, {k} steps",
                        compare(
                            values(records, "dataset", m, last, k), values(records, other, m, last, k), m
                        ),
                    )
                )
    lines += [
        "",
        "## Secondary 4: steps to the baseline's best FID",
        "",
        "| arm | Euler steps | median speed-up | seeds that got there |",
        "|---|---:|---:|---:|",
    ]
    for arm in ("batch-ot", "dataset"):
        for k in ks:
            got = steps_to_best(records, arm, k)
            reached = [v for v in got.values() if v is not None]
            med = f"{statistics.median(reached):.2f}x" if reached else "not reached"
            lines.append(f"| {arm} | {k} | {med} | {len(reached)}/{len(got)} |")
    lines += [
        "",
        "## Secondary 5: FID at every evaluation (mean ± SD over seeds)",
        "",
        "| arm | step | " + " | ".join(f"{k} steps" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    steps = sorted({row["step"] for r in records for row in r["evals"]})
    for arm in ("independent", "batch-ot", "dataset"):
        for step in steps:
            lines.append(
                f"| {arm} | {step} | "
                + " | ".join(_mean_sd(list(values(records, arm, "fid_clf", step, k).values())) for k in ks)
                + " |"
            )
    lines += [
        "",
        "## Secondary 6: cost",
        "",
        "| arm | seed | train s | ms/step | fit s | fit steps | last chi2 | distinct items per batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(records, key=lambda r: (r["arm"], r["seed"])):
        chi2 = r.get("fit_chi2") or [[None, math.nan]]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['train_s']:.0f} | {1000 * r['train_s'] / s['steps']:.1f} | "
            f"{_fmt(r.get('fit_s', math.nan), '.0f')} | {r.get('fit_steps', '')} | "
            f"{_fmt(chi2[-1][1], '.4f')} | "
            f"{r['distinct_items_mean']:.1f} |"
        )
    trees = sorted({r["provenance"]["library_tree"] for r in records})
    pages = ", ".join(sorted({str(r["provenance"]["prereg_commit"]) for r in records}))
    lines += ["", "## Provenance", "", f"Library tree hash(es): {', '.join(trees)}; "
              f"pre-registration commit(s): {pages}.", ""]  # fmt: skip
    return "\n".join(lines), {"records": len(records), "primary": primary}


def write_report(records: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Writes the report to `path` and returns its summary."""
    text, result = render(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path} ({result['records']} records)")
    return result
