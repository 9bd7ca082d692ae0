"""Paired statistics and the report of the regimes sweep (JSON, Markdown, plots).

Every comparison is an arm minus the `none` arm of the same seed (negative = the arm is better: all
metrics are distances). Every (dataset, objective, arm, checkpoint, sampler steps, metric) cell that
has paired seeds is reported; none is selected. The pre-registered primary family is flow matching,
1 sampler step, final checkpoint, the dataset's primary metric (exact W2 on 2-D, classifier Fréchet
distance on images); its verdicts use Holm-adjusted paired t-test p-values.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from regimes_quality import quality_rows, quality_section
from scipy import stats
from speedup import paired_stats

PRIMARY_METRIC = {"2d": "w2", "digits64": "fd", "mnist14": "fd", "mnist28": "fd"}
ALPHA = 0.05


def load_records(out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    recs = {}
    for path in sorted((out / "records").glob("*/*/seed*.json")):
        r = json.loads(path.read_text())
        recs[(r["dataset"], r["arm"], r["seed"])] = r
    return recs


def t_test_p(diffs: list[float]) -> float | None:
    """Two-sided one-sample t-test p of paired differences against 0 (`None` with < 2 or constant diffs)."""
    if len(diffs) < 2 or max(diffs) == min(diffs):
        return None
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (same order as given; `None` stays `None`, not counted)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(mean: float, p: float | None, alpha: float = ALPHA) -> str:
    """`helps` / `harms` when the (adjusted) p is below `alpha` (sign of the mean), else `no effect`."""
    if p is None or p >= alpha or mean == 0:
        return "no effect"
    return "helps" if mean < 0 else "harms"


def _metric_values(rec: dict[str, Any], objective: str) -> dict[tuple[str, str, str], float]:
    obj = rec["objectives"][objective]
    values = {("final", "-", "loss_var"): obj["loss_var"]}
    for step, by_k in obj["evals"].items():
        for k, metrics in by_k.items():
            for metric, v in metrics.items():
                values[(step, k, metric)] = v
    return values


def _cell(
    dataset: str, objective: str, arm: str, key: tuple, pairs: list[tuple[float, float]], recs: list
) -> dict:
    diffs = [a - b for a, b in pairs]
    base = sum(b for _, b in pairs) / len(pairs)
    row = {
        "dataset": dataset,
        "objective": objective,
        "arm": arm,
        "step": key[0],
        "sampler_steps": key[1],
        "metric": key[2],
        **paired_stats(diffs),
        "t_p": t_test_p(diffs),
        "baseline": base,
    }
    row["rel_pct"] = 100 * row["mean"] / base if base else None
    row["rel_sem_pct"] = 100 * row["sem"] / base if base and row["sem"] is not None else None
    for key_c in ("reduction_pct", "reduction_l2_pct", "noise_sq_norm", "cos_to_data"):
        row[key_c] = sum(r["coupling"][key_c] for r in recs) / len(recs)
    row["verdict"] = verdict(row["mean"], row["t_p"])
    return row


def paired_cells(
    recs: dict[tuple[str, str, int], dict[str, Any]], baseline: str = "none"
) -> list[dict[str, Any]]:
    """One row per cell with >= 1 paired seed: stats of arm minus `baseline` on the same seed."""
    rows = []
    for dataset, arm in sorted({(d, a) for d, a, _ in recs if a != baseline}):
        seeds = sorted(s for d, a, s in recs if (d, a) == (dataset, arm) and (dataset, baseline, s) in recs)
        arm_recs = [recs[(dataset, arm, s)] for s in seeds]
        for objective in arm_recs[0]["objectives"] if arm_recs else ():
            per_seed = [
                (
                    _metric_values(recs[(dataset, arm, s)], objective),
                    _metric_values(recs[(dataset, baseline, s)], objective),
                )
                for s in seeds
            ]
            for key in per_seed[0][0]:
                pairs = [(a[key], b[key]) for a, b in per_seed if key in b]
                finite = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
                if finite:
                    rows.append(_cell(dataset, objective, arm, key, finite, arm_recs))
                    rows[-1]["nonfinite_pairs"] = len(pairs) - len(
                        finite
                    )  # diverged samples: shown, not hidden
    return rows


def _final(row: dict[str, Any], recs: dict) -> bool:
    steps = max(int(s) for s in next(iter(recs.values()))["objectives"][row["objective"]]["evals"])
    return row["step"] == str(steps)


def primary_family(rows: list[dict[str, Any]], recs: dict) -> list[dict[str, Any]]:
    """The pre-registered primary rows (FM, 1 step, final checkpoint, primary metric) with Holm verdicts."""
    prim = [
        r
        for r in rows
        if r["objective"] == "fm"
        and r["sampler_steps"] == "1"
        and r["metric"] == PRIMARY_METRIC[r["dataset"]]
        and _final(r, recs)
    ]
    for row, p in zip(prim, holm([r["t_p"] for r in prim]), strict=True):
        row["holm_p"], row["primary_verdict"] = p, verdict(row["mean"], p)
    return prim


def correlations(rows: list[dict[str, Any]], recs: dict) -> list[dict[str, Any]]:
    """Spearman rank correlation across cells between relative effect and distance reduction."""
    out = []
    for objective in sorted({r["objective"] for r in rows}):
        for k in sorted({r["sampler_steps"] for r in rows if r["sampler_steps"] != "-"}, key=int):
            cells = [
                r
                for r in rows
                if r["objective"] == objective
                and r["sampler_steps"] == k
                and r["metric"] == PRIMARY_METRIC[r["dataset"]]
                and _final(r, recs)
                and r["rel_pct"] is not None
            ]
            for reduction in ("reduction_pct", "reduction_l2_pct"):
                xs, ys = [c[reduction] for c in cells], [c["rel_pct"] for c in cells]
                rho = (
                    float(stats.spearmanr(xs, ys).statistic) if len(cells) > 2 and len(set(xs)) > 1 else None
                )
                out.append(
                    {
                        "objective": objective,
                        "sampler_steps": k,
                        "reduction": reduction,
                        "cells": len(cells),
                        "spearman": rho,
                    }
                )
    return out


def knn_vs_control(recs: dict, knn: str = "knn4", control: str = "normctrl") -> list[dict[str, Any]]:
    """`knn` minus the norm-matched control, same seed: what of knn's effect its norms do not explain."""
    pair = {key: r for key, r in recs.items() if key[1] in (knn, control)}
    rows = paired_cells(pair, baseline=control) if pair else []
    return [r for r in rows if r["metric"] == PRIMARY_METRIC[r["dataset"]] and _final(r, recs)]


def knn_markdown(rows: list[dict]) -> str:
    head = (
        "dataset",
        "objective",
        "sampler steps",
        "effect ± s.e.",
        "rel %",
        "better/worse (n)",
        "t p",
        "verdict",
    )
    lines = [
        "",
        "## knn minus the norm-matched control (primary metric, final checkpoint; exploratory)",
        "",
        _row(*head),
        _row(*["---"] * len(head)),
    ]
    for r in rows:
        lines.append(
            _row(
                r["dataset"], r["objective"], r["sampler_steps"], *_effect(r), _fmt(r["t_p"], 2), r["verdict"]
            )
        )
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _effect(r: dict) -> tuple[str, str, str]:
    lost = f", {r['nonfinite_pairs']} non-finite" if r.get("nonfinite_pairs") else ""
    return (
        f"{_fmt(r['mean'])} ± {_fmt(r['sem'], 2)}",
        _fmt(r["rel_pct"], 2),
        f"{r['better']}/{r['worse']} ({r['n']}{lost})",
    )


PRIMARY_HEAD = (
    "dataset",
    "arm",
    "effect ± s.e.",
    "rel %",
    "better/worse (n)",
    "sign p",
    "t p",
    "Holm p",
    "reduction % (L2 %)",
    "verdict",
)
CELL_HEAD = (
    "dataset",
    "objective",
    "arm",
    "step",
    "sampler steps",
    "metric",
    "effect ± s.e.",
    "rel %",
    "better/worse (n)",
    "t p",
    "verdict",
)


def markdown(rows: list[dict], prim: list[dict], corr: list[dict], n_records: int, recs: dict) -> str:
    """The report as Markdown: the primary table, the reduction-effect correlations, every cell."""
    lines = [
        f"# Regimes sweep report ({n_records} finished units)",
        "",
        "Effect = arm minus `none` on the same seed (negative = better). rel = effect / baseline mean.",
        "",
        "## Primary: flow matching, 1 sampler step, final checkpoint (Holm over this table)",
        "",
        _row(*PRIMARY_HEAD),
        _row(*["---"] * len(PRIMARY_HEAD)),
    ]
    for r in prim:
        red = f"{r['reduction_pct']:.2f} ({r['reduction_l2_pct']:.2f})"
        lines.append(
            _row(
                r["dataset"],
                r["arm"],
                *_effect(r),
                _fmt(r["p"], 2),
                _fmt(r["t_p"], 2),
                _fmt(r["holm_p"], 2),
                red,
                r["primary_verdict"],
            )
        )
    lines += [
        "",
        "## The map: relative effect on the primary metric, final checkpoint (% of `none` ± s.e.)",
        "",
        "Bold: better than `none` (unadjusted paired t p < 0.05); italics: worse; plain: no effect detected.",
        "",
        map_markdown(rows, recs).rstrip(),
    ]
    lines += [
        "",
        "## Does the logged reduction predict the effect? (Spearman across cells, final checkpoint)",
        "",
        _row("objective", "sampler steps", "reduction", "cells", "Spearman rho"),
        _row(*["---"] * 5),
    ]
    lines += [
        _row(c["objective"], c["sampler_steps"], c["reduction"], c["cells"], _fmt(c["spearman"], 2))
        for c in corr
    ]
    lines += [
        "",
        "## Every cell (unadjusted 95 % paired t verdicts: exploratory)",
        "",
        _row(*CELL_HEAD),
        _row(*["---"] * len(CELL_HEAD)),
    ]
    for r in rows:
        lines.append(
            _row(
                r["dataset"],
                r["objective"],
                r["arm"],
                r["step"],
                r["sampler_steps"],
                r["metric"],
                *_effect(r),
                _fmt(r["t_p"], 2),
                r["verdict"],
            )
        )
    return "\n".join(lines) + "\n"


ARM_ORDER = ("lsa-l2-p64", "lsa-l2-p256", "lsa-l2-p1024", "lsa-sq-p64", "lsa-sq-p256", "lsa-sq-p1024")
ARM_ORDER += ("knn4", "normctrl")
#: Short column heads of the map: `lsa` with l2 / squared L2 over pools of 64, 256, 1024.
ARM_LABEL = {a: a.removeprefix("lsa-").replace("-p", " ") for a in ARM_ORDER if a.startswith("lsa-")}
ARM_LABEL["normctrl"] = "control"


def map_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    rel, sem = r["rel_pct"], r["rel_sem_pct"]
    digits = 0 if abs(rel) >= 9.5 else 1
    text = f"{rel:+.{digits}f}" + (f" ± {sem:.{digits}f}" if sem is not None else " (one seed)")
    return {"helps": f"**{text}**", "harms": f"_{text}_"}.get(r["verdict"], text)


def map_markdown(rows: list[dict], recs: dict) -> str:
    """The map: relative effect (% ± s.e.) on the primary metric at the final checkpoint, per cell.

    One table per objective; a row per (dataset, sampler steps), a column per arm (`l2 64` is
    `lsa-l2-p64`, `control` the norm-matched control). Bold: the arm is
    better than `none` (unadjusted paired t p < 0.05); italics: worse; plain: no effect detected.
    """
    final = [r for r in rows if r["metric"] == PRIMARY_METRIC[r["dataset"]] and _final(r, recs)]
    index = {(r["objective"], r["dataset"], r["sampler_steps"], r["arm"]): r for r in final}
    arms = [a for a in ARM_ORDER if any(k[3] == a for k in index)]
    datasets = [d for d in PRIMARY_METRIC if any(k[1] == d for k in index)]
    lines = []
    for objective, title in (("fm", "flow matching"), ("ddpm", "DDPM epsilon-prediction")):
        if not any(k[0] == objective for k in index):
            continue
        heads = [ARM_LABEL.get(a, a) for a in arms]
        lines += [f"**{title}**", "", _row("data", "steps", *heads), _row(*["---"] * (len(arms) + 2))]
        for dataset in datasets:
            steps = sorted({k[2] for k in index if k[:2] == (objective, dataset)}, key=int)
            lines += [
                _row(dataset, n, *[map_cell(index.get((objective, dataset, n, a))) for a in arms])
                for n in steps
            ]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


#: Figure layout: one row per sampler step count, two columns (the exact assignment: each pool
#: size a colour, solid squared L2, dashed L2; then `knn` and its control), fonts sized for a phone
#: (the docs show the figure about 360 px wide there: 13-point ticks read about 10 px tall).
PLOT_WIDTH_IN = 6.4
PLOT_ROW_IN = 2.3
PLOT_FONT_PT = 13
OBJECTIVE_NAMES = {"fm": "flow matching", "ddpm": "DDPM epsilon-prediction"}
DATA_TICKS = {"2d": "2", "digits64": "64", "mnist14": "196", "mnist28": "784"}


def plot(out: Path, rows: list[dict], recs: dict) -> list[Path]:
    """Relative effect on the primary metric vs dimension: a line per arm, a row per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from regimes_train import DIMS

    paths = []
    for objective in sorted({r["objective"] for r in rows}):
        sel = [
            r
            for r in rows
            if r["objective"] == objective
            and r["metric"] == PRIMARY_METRIC[r["dataset"]]
            and _final(r, recs)
            and r["rel_pct"] is not None
        ]
        ks = sorted({r["sampler_steps"] for r in sel}, key=int)
        if not ks:
            continue
        arms = sorted({r["arm"] for r in sel}, key=lambda a: (not a.startswith("lsa"), len(a), a))
        fig, axes = plt.subplots(
            len(ks), 2, figsize=(PLOT_WIDTH_IN, PLOT_ROW_IN * len(ks) + 2.2), squeeze=False,
            sharex=True, layout="constrained",
        )  # fmt: skip
        for i, k in enumerate(ks):
            for j, title in enumerate(("lsa", "knn / control")):
                ax = axes[i][j]
                for arm in [a for a in arms if a.startswith("lsa") == (j == 0)]:
                    pts = sorted(
                        (DIMS[r["dataset"]], r["rel_pct"], r["rel_sem_pct"] or 0.0)
                        for r in sel
                        if r["arm"] == arm and r["sampler_steps"] == k
                    )
                    ax.errorbar(
                        [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        capsize=2, label=_arm_label(arm), **_arm_style(arm),
                    )  # fmt: skip
                ax.axhline(0, color="grey", lw=0.8)
                ax.set_xscale("log")
                ax.set_xticks([DIMS[d] for d in DATA_TICKS], list(DATA_TICKS.values()))
                ax.minorticks_off()
                ax.tick_params(labelsize=PLOT_FONT_PT - 1)
                ax.grid(alpha=0.3)
                ax.set_title(f"{title}, {k} step{'s' * (k != '1')}", fontsize=PLOT_FONT_PT)
        for ax in axes[-1]:
            ax.set_xlabel("data dimension", fontsize=PLOT_FONT_PT)
        fig.supylabel("effect, % of the baseline (negative: better)", fontsize=PLOT_FONT_PT)
        fig.suptitle(
            f"{OBJECTIVE_NAMES.get(objective, objective)}: each pairing against independent pairs\n"
            "(primary metric, final checkpoint)",
            fontsize=PLOT_FONT_PT,
        )
        handles, labels = [], []
        for ax in axes[0]:
            h, lab = ax.get_legend_handles_labels()
            handles, labels = handles + h, labels + lab
        fig.legend(
            handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=PLOT_FONT_PT - 2
        )
        path = out / f"effects-{objective}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


def _arm_label(arm: str) -> str:
    """``lsa-sq-p256`` -> ``lsa sqeuclidean, pool 256``; ``knn4`` and ``normctrl`` spelled out."""
    if arm.startswith("lsa"):
        _, metric, pool = arm.split("-")
        return f"lsa {'sqeuclidean' if metric == 'sq' else metric}, pool {pool.removeprefix('p')}"
    return {"knn4": "knn, k = 4", "normctrl": "norm-matched control"}.get(arm, arm)


def _arm_style(arm: str) -> dict[str, Any]:
    """A colour per pool size (solid: squared L2, dashed: L2); `knn` and the control apart."""
    if arm.startswith("lsa"):
        _, metric, pool = arm.split("-")
        color = {"p64": "tab:blue", "p256": "tab:orange", "p1024": "tab:green"}.get(pool, "k")
        solid = metric == "sq"
        return {"color": color, "ls": "-" if solid else "--", "marker": "o" if solid else "s", "ms": 4}
    return {"color": {"knn4": "tab:red", "normctrl": "tab:gray"}.get(arm, "k"), "marker": "o", "ms": 4}


def write_report(out: Path, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Writes `report.json`, `report.md` and `effects-<objective>.png` under `out`; returns the summary."""
    recs = load_records(out)
    rows = paired_cells(recs) if recs else []
    prim = primary_family(rows, recs) if rows else []
    corr = correlations(rows, recs) if rows else []
    summary = {
        "units": len(recs),
        "primary": prim,
        "correlations": corr,
        "knn_vs_control": knn_vs_control(recs),
        "steps_to_quality": quality_rows(recs, PRIMARY_METRIC) if recs else [],
        "cells": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(
        markdown(rows, prim, corr, len(recs), recs)
        + knn_markdown(summary["knn_vs_control"])
        + quality_section(summary["steps_to_quality"])
    )
    summary["plots"] = [str(p) for p in plot(out, rows, recs)] if rows else []
    return summary
