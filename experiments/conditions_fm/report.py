"""Every comparison that `docs/results/conditions-preregistration.md` lists, as Markdown, from the records.

`render(records, part)` returns the report and the numbers behind it. Each section's heading names
the page's comparison ("Primary", "Secondary 1", ...); the rules and tests are in `stats.py`.
Nothing here trains or reads anything but the records given.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from experiments.conditions_fm.stats import compare, primary_family

P1, P4, P16, IND = "within-p1", "within-p4", "within-p16", "independent"
LABELS = {
    "fid_clf": "FID",
    "faith_err": "faithfulness error",
    "class_acc": "class accuracy",
    "bucket_hit": "bucket hit rate",
    "ink_err": "ink error",
    "slant_err": "slant error",
    "corr_ink": "ink correlation",
    "corr_slant": "slant correlation",
}


@dataclass(frozen=True)
class Listed:
    """One numbered secondary comparison of the page: its setting, pairs `(A, B)` and metrics."""

    number: int
    title: str
    setting: str
    pairs: tuple[tuple[str, str], ...]
    metrics: tuple[str, ...]


#: Part (a)'s primary: (setting, A, B, metric); B's SD decides the size rule.
PRIMARY = {"a": ("ink-slant", "ot-cond", IND, "fid_clf"), "b": ("classes100", P16, P1, "fid_clf")}
SECONDARY: dict[str, tuple[Listed, ...]] = {
    "a": (
        Listed(1, "ot-cond vs independent: faithfulness error (the harm check)", "ink-slant",
               (("ot-cond", IND),), ("faith_err",)),
        Listed(2, "ot vs independent: FID and faithfulness error", "ink-slant",
               (("ot", IND),), ("fid_clf", "faith_err")),
        Listed(3, "ot-cond vs ot: FID and faithfulness error", "ink-slant",
               (("ot-cond", "ot"),), ("fid_clf", "faith_err")),
        Listed(4, "exploratory: knn vs independent and knn vs ot-cond", "ink-slant",
               (("knn", IND), ("knn", "ot-cond")), ("fid_clf", "faith_err")),
    ),
    "b": (
        Listed(1, "classes100: class accuracy and bucket hit rate, within-p16 vs within-p1", "classes100",
               ((P16, P1),), ("class_acc", "bucket_hit")),
        Listed(2, "classes100: the dose, within-p4 vs within-p1 and within-p16 vs within-p4", "classes100",
               ((P4, P1), (P16, P4)), ("fid_clf", "class_acc", "bucket_hit")),
        Listed(3, "classes100: each within-pk vs independent", "classes100",
               ((P1, IND), (P4, IND), (P16, IND)), ("fid_clf", "class_acc", "bucket_hit")),
        Listed(4, "classes10: p16 vs p1, p4 vs p1, p16 vs p4, each vs independent", "classes10",
               ((P16, P1), (P4, P1), (P16, P4), (P1, IND), (P4, IND), (P16, IND)), ("fid_clf", "class_acc")),
    ),
}  # fmt: skip
COMPONENTS = ("ink_err", "slant_err", "corr_ink", "corr_slant")


def values(
    records: list[dict[str, Any]], setting: str, arm: str, cell: dict[str, Any], metric: str
) -> dict[int, float]:
    """Per seed, `arm`'s value of `metric` in the evaluation `cell` (the records that have it)."""
    out = {}
    for r in records:
        if r["setting"] == setting and r["arm"] == arm:
            for e in r["evals"]:
                if all(e.get(k) == v for k, v in cell.items()) and e.get(metric) is not None:
                    out[r["seed"]] = float(e[metric])
    return out


def _num(x: float, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _stats_cells(s: dict[str, Any]) -> str:
    return f"{s['n']} | {_num(s['mean'])} | [{_num(s['lo'])}, {_num(s['hi'])}] | {s['a_better']}/{s['n']} | "


def _cell_label(cell: dict[str, Any]) -> str:
    parts = [f"step {cell['step']}"]
    if "guidance" in cell:
        parts.append(f"w {cell['guidance']}")
    return ", ".join(parts) + f", {cell['euler_steps']} Euler steps"


def cells(
    settings: dict[str, Any], part: str, step: int, guidance: float | None = None
) -> list[dict[str, Any]]:
    """The evaluation cells of one checkpoint (and guidance scale in part b), one per step count."""
    base: dict[str, Any] = {"step": step} if part == "a" else {"step": step, "guidance": guidance}
    return [{**base, "euler_steps": k} for k in settings["sampler_steps"]]


def secondary_table(
    records: list[dict[str, Any]], listed: Listed, where: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The rows of one numbered secondary comparison in the given cells (two-sided, uncorrected)."""
    head = "| A vs B | metric | cell | seeds | mean A - B | 95 % CI | A better | sign p | B's SD | decision |"
    lines, rows = [head, "|---|---|---|---|---|---|---|---|---|---|"], []
    for a, b in listed.pairs:
        for metric in listed.metrics:
            for cell in where:
                s = compare(values(records, listed.setting, a, cell, metric),
                            values(records, listed.setting, b, cell, metric), metric)  # fmt: skip
                rows.append({"number": listed.number, "a": a, "b": b, "metric": metric, **cell, **s})
                lines.append(
                    f"| {a} vs {b} | {LABELS[metric]} | {_cell_label(cell)} | {_stats_cells(s)}"
                    f"{_num(s['sign_p'], '.3f')} | {_num(s['sd_b'], '.3f')} | {s['decision']} |"
                )
    return lines, rows


def primary_section(
    records: list[dict[str, Any]], part: str, settings: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The primary family at the last checkpoint (part b: the first guidance scale)."""
    setting, a, b, metric = PRIMARY[part]
    last = max(settings["checkpoints"])
    where = cells(settings, part, last, settings["guidance"][0] if part == "b" else None)
    rows = primary_family(
        [(values(records, setting, a, c, metric), values(records, setting, b, c, metric)) for c in where],
        metric,
    )
    scope = f"{setting}: " if part == "b" else ""
    lines = [
        f"## Primary: {scope}{a} vs {b}, {LABELS[metric]} at step {last}"
        + (f", guidance {settings['guidance'][0]}" if part == "b" else ""),
        "",
        f'One-sided sign tests toward "{a} better", Holm-corrected over the four step counts; harm is '
        f"the mirror family. B's SD is {b}'s seed-to-seed SD in the cell.",
        "",
        "| cell | seeds | mean A - B | 95 % CI | A better | p (better) | Holm p (better) | Holm p (worse) "
        "| B's SD | decision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, s in zip(where, rows, strict=True):
        lines.append(
            f"| {_cell_label(cell)} | {_stats_cells(s)}{_num(s['p_better'], '.4f')} | "
            f"{_num(s['holm_better'], '.4f')} | {_num(s['holm_worse'], '.4f')} | {_num(s['sd_b'], '.3f')} | "
            f"{s['decision']} |"
        )
        s.update(cell)
    return [*lines, ""], rows


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return f"{statistics.fmean(xs):.3f} ± {_num(sd, '.3f')}"


def arm_table(
    records: list[dict[str, Any]], setting: str, where: list[dict[str, Any]], metrics: Iterable[str]
) -> list[str]:
    """Each arm's mean ± SD over seeds of each metric in each cell (descriptive)."""
    arms = sorted({r["arm"] for r in records if r["setting"] == setting})
    lines = ["| metric | cell | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for metric in metrics:
        for cell in where:
            row = [_mean_sd(list(values(records, setting, arm, cell, metric).values())) for arm in arms]
            lines.append(f"| {LABELS[metric]} | {_cell_label(cell)} | " + " | ".join(row) + " |")
    return [*lines, ""]


def per_run_table(
    records: list[dict[str, Any]], keys: list[tuple[str, str]], null: str | None = None
) -> list[str]:
    """Per (setting, arm): the mean over seeds of per-run values, with its SE over seeds.

    Args:
        records: The records.
        keys: `(record key, column title)` pairs.
        null: A record key holding the number of batches (pools) per run: adds the null SE of
            one run's mean, `1 / sqrt(that number)`.
    """
    head = "| setting | arm | seeds | " + " | ".join(f"{t} (mean, SE over seeds)" for _, t in keys)
    lines = [head + (" | null SE of one run |" if null else " |")]
    lines.append("|---|---|---|" + "---|" * (len(keys) + bool(null)))
    groups = sorted({(r["setting"], r["arm"]) for r in records})
    for setting, arm in groups:
        runs = [r for r in records if (r["setting"], r["arm"]) == (setting, arm)]
        cols = []
        for key, _ in keys:
            xs = [float(r[key]) for r in runs if r.get(key) is not None]
            se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
            cols.append(f"{_num(statistics.fmean(xs)) if xs else 'n/a'} ({_num(se, '.3f')})")
        extra = f" {_num(1 / math.sqrt(min(r[null] for r in runs)), '.3f')} |" if null else ""
        lines.append(f"| {setting} | {arm} | {len(runs)} | " + " | ".join(cols) + " |" + extra)
    return [*lines, ""]


def provenance(records: list[dict[str, Any]]) -> list[str]:
    """What the records ran from: commits, the library tree hash, dirty flags, the page's commit."""

    def seen(key: str) -> str:
        found = sorted({str(r["provenance"].get(key)) for r in records})
        return ", ".join(f"`{v}`" for v in found)

    first = min(r["started"] for r in records)
    accuracy = ", ".join(sorted({f"{r['classifier_heldout_acc']:.4f}" for r in records}))
    dirty = sum(bool(r["provenance"].get("dirty")) for r in records)
    return [
        "## Provenance",
        "",
        f"- Records: {len(records)}; first run started {first}.",
        f"- Library tree hash (`lightning_immiscible/`): {seen('library_tree')}.",
        f"- Commits: {seen('commit')}; runs with uncommitted code changes: {dirty}.",
        f"- Pre-registration commit: {seen('prereg_commit')}, dated {seen('prereg_date')}.",
        f"- Digit classifier's accuracy on the held-out digits: {accuracy}.",
        "",
    ]


def render(records: list[dict[str, Any]], part: str) -> tuple[str, dict[str, Any]]:
    """The report of one part from its records, and the numbers behind it.

    Returns:
        The Markdown, and `{"records", "primary", "secondary"}` (each secondary row names its
        comparison's `number`; the rows of secondary 8 carry number 8).
    """
    records = [r for r in records if r["part"] == part]
    title = "# Conditions experiment, part (" + part + "): the pre-listed comparisons"
    if not records:
        return f"{title}\n\nNo finished runs yet.\n", {"records": 0, "primary": [], "secondary": []}
    settings = records[0]["settings"]
    last, rest = (
        max(settings["checkpoints"]),
        sorted(set(settings["checkpoints"]) - {max(settings["checkpoints"])}),
    )
    lines = [title, "", *provenance(records)]
    lines += [
        "Differences are A - B per paired seed. For FID and errors negative means A is better; for "
        "accuracy, hit rate and correlation positive means A is better (`A better` counts seeds either way). "
        "Secondary tests are two-sided and uncorrected. Decisions: better / worse (p < 0.05, the 95 % "
        "interval on one side of 0, the mean larger than B's SD), level (the interval within ± B's SD), "
        "else undecided.",
        "",
    ]
    primary_lines, primary = primary_section(records, part, settings)
    lines += primary_lines
    secondary: list[dict[str, Any]] = []
    w0 = settings["guidance"][0] if part == "b" else None
    for listed in SECONDARY[part]:
        table, rows = secondary_table(records, listed, cells(settings, part, last, w0))
        lines += [f"## Secondary {listed.number}: {listed.title}", "", *table, ""]
        secondary += rows
    extra = (_part_a_extras if part == "a" else _part_b_extras)(records, settings, last, rest)
    lines += extra[0]
    secondary += extra[1]
    return "\n".join(lines) + "\n", {"records": len(records), "primary": primary, "secondary": secondary}


def _part_a_extras(
    records: list[dict[str, Any]], settings: dict[str, Any], last: int, rest: list[int]
) -> tuple[list[str], list[dict[str, Any]]]:
    chance = records[0].get("chance", {})
    lines = [
        "## Secondary 5: per component, every arm (mean ± SD over seeds)",
        "",
        f"Chance level (each held-out digit's measured condition against another's request, a fixed "
        f"derangement): faithfulness error {_num(chance.get('faith_err'), '.3f')}, ink error "
        f"{_num(chance.get('ink_err'), '.3f')}, slant error {_num(chance.get('slant_err'), '.3f')}.",
        "",
        *arm_table(records, "ink-slant", cells(settings, "a", last), ("fid_clf", "faith_err", *COMPONENTS)),
        "## Secondary 6: condition leak per arm (mean per batch, then over seeds)",
        "",
        "Null: 0, with the null SE of one run's mean beside it. The pre-listed leak is the runner's; the "
        "library's own diagnostic, where it logs one, is shown beside it.",
        "",
        *per_run_table(
            records, [("leak_mean", "leak"), ("library_leak_mean", "library's leak")], "leak_batches"
        ),
        "## Secondary 7: distance reduction per arm; for ot-cond the weight w and the r reached",
        "",
        *per_run_table(records, [("reduction_pct_mean", "reduction %"), ("w_mean", "w"), ("w_min", "w min"),
                                 ("w_max", "w max"), ("r_mean", "r"), ("r_min", "r min"), ("r_max", "r max"),
                                 ("r_off_target", "batches with r off 0.2 by > 0.001"),
                                 ("train_s", "training s")]),
        "## Secondary 8: secondaries 1-5 at the earlier checkpoints",
        "",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for step in rest:
        for listed in SECONDARY["a"]:
            table, found = secondary_table(records, listed, cells(settings, "a", step))
            lines += [f"### Secondary {listed.number} at step {step}", "", *table, ""]
            rows += [{**r, "number": 8, "of": listed.number} for r in found]
        lines += [f"### Secondary 5 at step {step}", ""]
        lines += arm_table(
            records, "ink-slant", cells(settings, "a", step), ("fid_clf", "faith_err", *COMPONENTS)
        )
    return lines, rows


def _part_b_extras(
    records: list[dict[str, Any]], settings: dict[str, Any], last: int, rest: list[int]
) -> tuple[list[str], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    lines = [
        "## Secondary 5: does the pool matter more when blocks are small? (descriptive)",
        "",
        "Per seed, (within-p16 - within-p1 FID in classes100) - (the same in classes10). The two settings' "
        "models differ in their label embedding, so this is descriptive only.",
        "",
        "| cell | seeds | mean | 95 % CI |",
        "|---|---|---|---|",
    ]
    for step in (last, *rest):
        for w in settings["guidance"]:
            for cell in cells(settings, "b", step, w):
                s = diff_in_diff(records, cell)
                rows.append({"number": 5, **cell, **s})
                interval = f"[{_num(s['lo'])}, {_num(s['hi'])}]"
                lines.append(f"| {_cell_label(cell)} | {s['n']} | {_num(s['mean'])} | {interval} |")
    lines += [
        "",
        "## Secondary 6: prior_skew per arm and setting",
        "",
        "Once per pool over the pool's items (independent: per batch); null N(0, 1) per pool, so a run's "
        "mean has the null SE beside it. We expected every arm within 3 null SEs of 0. The "
        "per-training-batch statistic is shown beside it.",
        "",
        *per_run_table(records, [("prior_skew_mean", "prior_skew per pool"),
                                 ("prior_skew_batch_mean", "per batch")], "prior_skew_pools"),
        "## Secondary 7: distance reduction per arm (mean per pool)",
        "",
        *per_run_table(records, [("reduction_pct_mean", "reduction %"), ("train_s", "training s")]),
        "## Secondary 8: secondaries 1-4 at guidance 1, and everything at the earlier checkpoints",
        "",
    ]  # fmt: skip
    setting, a, b, metric = PRIMARY["b"]
    primary_pair = Listed(0, f"the primary pair ({a} vs {b}), FID", setting, ((a, b),), (metric,))
    plan = [(last, w, False) for w in settings["guidance"][1:]]
    plan += [(step, w, True) for step in rest for w in settings["guidance"]]
    for step, w, everything in plan:
        for listed in ((primary_pair,) if everything else ()) + SECONDARY["b"]:
            table, found = secondary_table(records, listed, cells(settings, "b", step, w))
            name = f"Secondary {listed.number}" if listed.number else "The primary pair"
            lines += [f"### {name} at step {step}, guidance {w}", "", *table, ""]
            rows += [{**r, "number": 8, "of": listed.number} for r in found]
    lines += ["### Each arm (mean ± SD over seeds)", ""]
    for setting_name in ("classes100", "classes10"):
        for step in (last, *rest):
            for w in settings["guidance"]:
                lines += [f"{setting_name}, step {step}, guidance {w}:", ""]
                metrics = (
                    ("fid_clf", "class_acc", "bucket_hit")
                    if setting_name == "classes100"
                    else ("fid_clf", "class_acc")
                )
                lines += arm_table(records, setting_name, cells(settings, "b", step, w), metrics)
    return lines, rows


def diff_in_diff(records: list[dict[str, Any]], cell: dict[str, Any]) -> dict[str, Any]:
    """Part (b)'s secondary 5 in one cell: mean and 95 % interval of the per-seed difference in FID gains."""
    per_setting = []
    for setting in ("classes100", "classes10"):
        hi, lo = values(records, setting, P16, cell, "fid_clf"), values(records, setting, P1, cell, "fid_clf")
        per_setting.append({s: hi[s] - lo[s] for s in hi if s in lo})
    big, small = per_setting
    zero = {s: 0.0 for s in big if s in small}
    return compare({s: big[s] - small[s] for s in zero}, zero, "fid_clf")
