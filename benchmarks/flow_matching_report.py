"""The pre-listed comparisons of the flow-matching paired runs, as one Markdown report and one figure.

The runs, the primary comparison and every secondary one are fixed on
`docs/results/flow-matching-preregistration.md`, written before any run; this script renders them
in that order from the finished runs' records, and runs the one measurement the sweep itself does
not make (the FID's sampling scatter):

- `benchmarks/results/speedup_flow/runs/<method>_seed<k>/done.json`: the 3,000-step runs
  (`none` and `lsa-sqeuclidean` on seeds 0-5, `lsa-l2` on seeds 0-2), written by `speedup.py`;
- `benchmarks/results/speedup_flow_long/runs/.../done.json`: the 9,000-step pair (seed 0);
- `benchmarks/results/speedup_flow/sampling_scatter.json`: the baseline's seed-0 final checkpoint
  evaluated with 5 sample seeds (`--scatter` writes it).

A run without `done.json` (not finished yet) is left out and counted: the report says how many of
the planned runs it covers and calls itself interim until all of them are in, so it can be rendered
while the sweep is under way. Records set aside by `speedup.py --supersede` (`superseded/`) are listed
with their reason and enter no comparison.

After the primary come readings of it that the pre-registration did not list
(`flow_matching_readings.py`): its bounds from the evaluations alone (no interpolation), the factor
at shorter training budgets, the target loosened to one sampling SD of the baseline's best, each
run's sessions (which runs were resumed) and the primary without the pairs that include a resumed run.

    python benchmarks/flow_matching_report.py             # docs/results/flow_matching_report.md + figure
    python benchmarks/flow_matching_report.py --scatter   # the sampling scatter (about 8 min alone)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import flow_matching_readings as readings  # noqa: E402
from conditional_fm_report import summary as mean_interval  # noqa: E402
from speedup import paired_stats, quality, read_sessions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "results"
BASE, OT, L2 = "none", "lsa-sqeuclidean", "lsa-l2"
NAMES = {BASE: "independent pairs", OT: "minibatch OT", L2: "Immiscible's L2 assignment"}
PLAN = {BASE: (0, 1, 2, 3, 4, 5), OT: (0, 1, 2, 3, 4, 5), L2: (0, 1, 2)}
LONG_PLAN = {BASE: (0,), OT: (0,)}
SAMPLER_STEPS = (1, 2, 4, 8)
PRIMARY_STEPS = 2
SCATTER_SEEDS = (1, 2, 3, 4, 5)
ALPHA = 0.05
CENSORED_NOTE = "; an upper estimate (it includes seeds that never reached the target)"
SCATTER_COMMAND = "python benchmarks/flow_matching_report.py --scatter"


def key(steps: int) -> str:
    """The logged FID key of ``steps`` Euler steps: ``val/fid64_n1024_euler{steps}``."""
    return f"val/fid64_n1024_euler{steps}"


def load_runs(folder: Path, where: str = "runs") -> list[dict[str, Any]]:
    """Every finished run (its ``done.json``) under ``folder/runs``, sorted by method and seed.

    Each run's ``sessions`` are its ``done.json``'s, or, for a run finished before the runner recorded
    them, those of a ``sessions.jsonl`` beside it (``None`` without either: not recorded). ``where``:
    ``superseded`` reads the records set aside, each with the ``reason`` of its ``superseded.json``.
    """
    runs = []
    for path in sorted((folder / where).glob("*/done.json")):
        run = json.loads(path.read_text())
        if "sessions" not in run:
            run["sessions"] = read_sessions(path.parent / "sessions.jsonl") or None
        if (note := path.parent / "superseded.json").is_file():
            run["reason"] = json.loads(note.read_text())["reason"]
        runs.append(run)
    return sorted(runs, key=lambda r: (r["method"], r["seed"]))


def by_method(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {seed: run}}``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["method"], {})[r["seed"]] = r
    return out


def value_at(run: dict[str, Any], metric: str, step: int) -> float | None:
    """``metric`` at evaluation ``step`` of ``run``, or ``None`` if it has no such evaluation."""
    return next((row[metric] for row in run["curve"] if row["step"] == step), None)


def values_at(runs: dict[int, dict[str, Any]], metric: str, step: int) -> list[float]:
    """``metric`` at evaluation ``step`` of every run that has it (seed order)."""
    return [v for _, r in sorted(runs.items()) if (v := value_at(r, metric, step)) is not None]


def seed_spread(runs: dict[int, dict[str, Any]], metric: str, step: int) -> float | None:
    """Sample standard deviation over seeds of ``metric`` at ``step`` (``None`` below 2 seeds)."""
    values = values_at(runs, metric, step)
    return statistics.stdev(values) if len(values) > 1 else None


def seed_pairs(
    arm: dict[int, dict], base: dict[int, dict], metric: str, step: int
) -> list[tuple[float, float]]:
    """``(arm, baseline)`` values of ``metric`` at ``step``, per seed where both runs have it (seed order)."""
    pairs = [
        (value_at(arm[s], metric, step), value_at(base[s], metric, step))
        for s in sorted(set(arm) & set(base))
    ]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def paired_cell(arm: dict[int, dict], base: dict[int, dict], metric: str, step: int) -> dict[str, Any] | None:
    """Arm minus the same seed's baseline at ``step`` (negative = arm better), over seeds with both."""
    diffs = [a - b for a, b in seed_pairs(arm, base, metric, step)]
    return paired_stats(diffs) if diffs else None


def relative_cell(
    arm: dict[int, dict], base: dict[int, dict], metric: str, step: int
) -> dict[str, Any] | None:
    """Mean over seeds of arm / same seed's baseline - 1 at ``step``, with a 95 % t-interval.

    Returns ``{"mean", "ci95", "n"}`` (``ci95`` is ``None`` below 2 seeds), or ``None`` without a pair.
    """
    ratios = [a / b - 1 for a, b in seed_pairs(arm, base, metric, step) if b]
    if not ratios:
        return None
    s = mean_interval(ratios)
    return {"mean": s["mean"], "ci95": (s["lo"], s["hi"]) if s["n"] > 1 else None, "n": s["n"]}


def is_real(cell: dict[str, Any], floor: float | None) -> bool:
    """The pre-registered bar: the paired sign test passes *and* the mean exceeds the noise floor.

    ``floor`` is the baseline's seed-to-seed standard deviation at that evaluation and step count;
    without one (fewer than 2 baseline seeds) nothing is called real.
    """
    return floor is not None and cell["p"] < ALPHA and abs(cell["mean"]) > floor


def baseline_rise(base: dict[int, dict], metric: str) -> dict[str, Any]:
    """Per seed: where the baseline's best ``metric`` came, and how far its last value is above it.

    ``before_last`` counts the seeds whose best (lowest) value came before their last evaluation;
    ``excess`` is last minus best per seed (0 where the last evaluation is the best).
    """
    per_seed = {}
    for seed, r in sorted(base.items()):
        best = min(r["curve"], key=lambda row: (row[metric], row["step"]))
        last = r["curve"][-1]
        per_seed[seed] = {
            "best_step": best["step"],
            "best": best[metric],
            "last": last[metric],
            "excess": last[metric] - best[metric],
            "before_last": best["step"] < last["step"],
        }
    return {"per_seed": per_seed, "before_last": sum(v["before_last"] for v in per_seed.values())}


def verdict(diff: float, spread: float | None) -> str:
    """The pre-registered reading of the 3x-longer pair at one step count.

    ``diff`` = OT minus baseline at 9,000 steps; ``spread`` = the 3,000-step baseline's seed-to-seed
    standard deviation at its last evaluation. Lower by more than ``spread``: persists; lower by
    less: shrinks; higher (or equal): reverses.
    """
    if diff >= 0:
        return "reverses"
    if spread is None:
        return "lower (no spread to compare with)"
    return "persists" if -diff > spread else "shrinks"


def scatter_summary(scatter: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Per sampler step count: mean and sample standard deviation of the FID over the sample seeds."""
    out = {}
    for k in SAMPLER_STEPS:
        values = [row[key(k)] for row in scatter["evaluations"]]
        out[k] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "n": len(values),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _count_line(runs: dict[str, dict[int, dict]], plan: dict[str, tuple[int, ...]]) -> tuple[str, bool]:
    parts, complete = [], True
    for method, seeds in plan.items():
        have = [s for s in seeds if s in runs.get(method, {})]
        complete &= len(have) == len(seeds)
        parts.append(f"`{method}` {len(have)} of {len(seeds)} (seeds {', '.join(map(str, have)) or 'none'})")
    return "; ".join(parts), complete


def _quality_table(arm: dict[int, dict], base: dict[int, dict], steps_list: tuple[int, ...]) -> list[str]:
    lines = [
        "| Euler steps | per seed: baseline's best at step -> arm reached it at | speed-up, geometric mean "
        "[95 % CI] | faster / slower (two-sided p) | > 2x (one-sided p) |",
        "|---|---|---:|---:|---:|",
    ]
    for k in steps_list:
        q = quality(arm, base, key(k))
        if not q:
            lines.append(f"| {k} | no paired seed finished | | | |")
            continue
        per_seed = ", ".join(
            f"s{seed}: {r['base_steps']:.0f} -> "
            + ("never" if r["steps"] is None else f"{'<=' if r['at_first_eval'] else ''}{r['steps']:.0f}")
            for seed, r in q["per_seed"].items()
        )
        ci = f" [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]" if q["ci95"] else ""
        early = sum(r["steps"] is not None and r["at_first_eval"] for r in q["per_seed"].values())
        notes = [" (upper estimate)"] * bool(q["censored"]) + [
            f" (a lower estimate: {early} of {q['n']} reached it by the first evaluation)"
        ] * bool(early)
        mean = f"{q['geomean']:.2f}x{ci}{''.join(notes)}" if q["geomean"] else "-"
        lines.append(
            f"| {k} | {per_seed} | {mean} | {q['faster']} / {q['slower']} (p = {q['p_faster']:.3f}) | "
            f"{q['above_claim']} of {q['n']} (p = {q['p_claim']:.3f}) |"
        )
    return lines


def primary_section(runs: dict[str, dict[int, dict]], complete: bool) -> list[str]:
    """The one primary comparison and its decision."""
    lines = ["## Primary: steps to quality at 2 Euler steps, minibatch OT against independent pairs", ""]
    arm, base = runs.get(OT, {}), runs.get(BASE, {})
    q = quality(arm, base, key(PRIMARY_STEPS)) if arm and base else {}
    if not q:
        return [*lines, "No paired seed has finished yet.", ""]
    lines += [
        f"Per seed, the best `{key(PRIMARY_STEPS)}` the baseline reached in its 3,000 steps, the step",
        "where it first did, and the first step at which the OT run of the same seed reached it (linear",
        "between evaluations; `<=`: already at its first evaluation, an upper bound; `never`: not within",
        "3,000 steps).",
        "",
        "| seed | baseline's best | at step | OT reached it at | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for seed, r in q["per_seed"].items():
        reached = "never" if r["steps"] is None else f"{'<=' if r['at_first_eval'] else ''}{r['steps']:.0f}"
        factor = f"{r['speedup']:.2f}x" if r["speedup"] else f"< {r['speedup_bound']:.2f}x"
        lines.append(f"| {seed} | {r['target']:.4f} | {r['base_steps']:.0f} | {reached} | {factor} |")
    ci = f" (95 % CI {q['ci95'][0]:.2f}x to {q['ci95'][1]:.2f}x)" if q["ci95"] else ""
    lines += [
        "",
        f"- Geometric-mean speed-up over {q['n']} seeds: **{q['geomean']:.2f}x**{ci}"
        f"{CENSORED_NOTE if q['censored'] else ''}.",
        f"- Faster than the baseline at all: {q['faster']} of {q['n']} seeds, two-sided sign test "
        f"p = {q['p_faster']:.3f}.",
        f"- More than 2x faster: {q['above_claim']} of {q['n']} seeds, one-sided sign test "
        f"p = {q['p_claim']:.3f}.",
    ]
    if not complete:
        decision = f"not decided yet: {q['n']} of the 6 pre-registered seed pairs have finished."
    elif q["p_claim"] < ALPHA:
        decision = (
            "**supported**: OT pairs reached the baseline's best 2-step FID more than 2x sooner (p < 0.05)."
        )
    else:
        decision = f"**not supported** by the pre-registered rule (one-sided p = {q['p_claim']:.3f} >= 0.05)."
    return [*lines, f'- The claim "at least 2x fewer steps, p < 0.05": {decision}', ""]


def paired_section(runs: dict[str, dict[int, dict]], arm_name: str, steps: list[int]) -> list[str]:
    """Arm minus baseline at every evaluation and sampler step count, with the noise-floor mark."""
    arm, base = runs.get(arm_name, {}), runs.get(BASE, {})
    lines = [f"### `{arm_name}` minus `none`", ""]
    if not arm or not base:
        return [*lines, "No paired seed has finished yet.", ""]
    lines += [
        "| training step | " + " | ".join(f"{k} Euler step{'s' * (k > 1)}" for k in SAMPLER_STEPS) + " |",
        "|---:|" + "---:|" * len(SAMPLER_STEPS),
    ]
    real = 0
    for step in steps:
        cells = []
        for k in SAMPLER_STEPS:
            cell = paired_cell(arm, base, key(k), step)
            if cell is None:
                cells.append("")
                continue
            mark = is_real(cell, seed_spread(base, key(k), step))
            real += mark
            sem = "" if cell["sem"] is None else f" ± {cell['sem']:.4f}"
            cells.append(
                f"{cell['mean']:+.4f}{sem} ({cell['better']}/{cell['n']}, p = {cell['p']:.2f})"
                + (" **R**" if mark else "")
            )
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return [*lines, "", f"Cells marked **R** (real by the pre-registered bar): {real}.", ""]


def relative_section(runs: dict[str, dict[int, dict]], steps: list[int]) -> list[str]:
    """Not pre-listed: OT's FID relative to the same seed's baseline, in %, at every evaluation."""
    lines = [
        "## Reading (not pre-listed): OT's FID relative to the baseline",
        "",
        "Mean over seeds of OT / the same seed's baseline - 1, in %, with a 95 % t-interval (negative = OT",
        "better). The same records as Secondary 3, read as a ratio.",
        "",
        "| training step | " + " | ".join(f"{k} Euler step{'s' * (k > 1)}" for k in SAMPLER_STEPS) + " |",
        "|---:|" + "---:|" * len(SAMPLER_STEPS),
    ]
    arm, base = runs.get(OT, {}), runs.get(BASE, {})
    for step in steps:
        cells = []
        for k in SAMPLER_STEPS:
            c = relative_cell(arm, base, key(k), step)
            ci = (
                ""
                if c is None or c["ci95"] is None
                else f" [{100 * c['ci95'][0]:+.0f}, {100 * c['ci95'][1]:+.0f}]"
            )
            cells.append("" if c is None else f"{100 * c['mean']:+.0f} %{ci}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def ot_vs_l2_section(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Secondary 4: OT minus L2 on the seeds both finished, at the last evaluation."""
    lines = ["## Secondary 4: minibatch OT against the L2 assignment (seeds 0-2, last evaluation)", ""]
    ot, l2 = runs.get(OT, {}), runs.get(L2, {})
    seeds = sorted(set(ot) & set(l2))
    if not seeds:
        return [*lines, "No seed has both runs finished yet.", ""]
    last = max(row["step"] for s in seeds for row in ot[s]["curve"])
    lines += [
        f"`lsa-sqeuclidean` minus `lsa-l2` at step {last}, seeds {', '.join(map(str, seeds))} "
        "(negative = OT better): mean ± standard error (OT better in k of n, two-sided sign test).",
        "",
        "| Euler steps | OT - L2 |",
        "|---:|---:|",
    ]
    for k in SAMPLER_STEPS:
        cell = paired_cell(ot, l2, key(k), last)
        if cell is None:
            lines.append(f"| {k} | |")
            continue
        sem = "" if cell["sem"] is None else f" ± {cell['sem']:.4f}"
        lines.append(
            f"| {k} | {cell['mean']:+.4f}{sem} ({cell['better']}/{cell['n']}, p = {cell['p']:.2f}) |"
        )
    return [*lines, ""]


def rise_section(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Secondary 5: does the baseline's few-step FID rise after its best?"""
    base = runs.get(BASE, {})
    lines = ["## Secondary 5: the baseline's rise", ""]
    if not base:
        return [*lines, "No baseline run has finished yet.", ""]
    lines += [
        "Per seed: the step of the baseline's best value, and its last value minus its best (0: the last",
        "evaluation was its best).",
        "",
        "| Euler steps | best before the last evaluation | last minus best, per seed |",
        "|---:|---:|---|",
    ]
    for k in (1, 2):
        rise = baseline_rise(base, key(k))
        per_seed = ", ".join(
            f"s{s}: {v['excess']:+.4f} (best at {v['best_step']})" for s, v in rise["per_seed"].items()
        )
        lines.append(f"| {k} | {rise['before_last']} of {len(rise['per_seed'])} | {per_seed} |")
    return [*lines, ""]


def floor_section(
    runs: dict[str, dict[int, dict]], steps: list[int], scatter: dict[str, Any] | None
) -> list[str]:
    """Secondary 6: the baseline's seed-to-seed standard deviation and the FID's sampling scatter."""
    base = runs.get(BASE, {})
    lines = [
        "## Secondary 6: the noise floor",
        "",
        f"The baseline's sample standard deviation over its {len(base)} finished seeds, next to its mean:",
        "",
        "| training step | "
        + " | ".join(f"{k} step{'s' * (k > 1)}: mean (sd)" for k in SAMPLER_STEPS)
        + " |",
        "|---:|" + "---:|" * len(SAMPLER_STEPS),
    ]
    for step in steps:
        cells = []
        for k in SAMPLER_STEPS:
            values = values_at(base, key(k), step)
            sd = statistics.stdev(values) if len(values) > 1 else None
            cells.append(f"{statistics.mean(values):.4f} ({_f(sd)})" if values else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    if scatter is None:
        return [*lines, f"Sampling scatter: not measured yet (`{SCATTER_COMMAND}`).", ""]
    s = scatter_summary(scatter)
    lines += [
        f"Sampling scatter alone: the baseline's seed-0 final checkpoint evaluated with sample seeds "
        f"{', '.join(str(e['sample_seed']) for e in scatter['evaluations'])}"
        " (same weights, new starting noise):",
        "",
        "| Euler steps | mean | sd over sample seeds |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in s.items()]
    return [*lines, ""]


def long_section(long_runs: dict[str, dict[int, dict]], runs: dict[str, dict[int, dict]]) -> list[str]:
    """Secondary 7: the 3x-longer pair, its paired difference per evaluation and the reading."""
    lines = ["## Secondary 7: does it last? (seed 0, 9,000 steps)", ""]
    base, ot = long_runs.get(BASE, {}), long_runs.get(OT, {})
    if 0 not in base or 0 not in ot:
        return [*lines, "Not finished yet.", ""]
    steps = [row["step"] for row in base[0]["curve"]]
    lines += [
        "![FID against training steps, seed 0: the 9,000-step pair thick, the same seed's 3,000-step"
        " runs thin (log scale)](flow_matching_long.png)",
        "",
        "OT minus baseline, seed 0 (negative = OT better):",
        "",
        "| training step | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in SAMPLER_STEPS) + " |",
        "|---:|" + "---:|" * len(SAMPLER_STEPS),
    ]
    for step in steps:
        cells = [
            f"{value_at(ot[0], key(k), step) - value_at(base[0], key(k), step):+.4f}" for k in SAMPLER_STEPS
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    last = steps[-1]
    short_base = runs.get(BASE, {})
    short_last = max((row["step"] for r in short_base.values() for row in r["curve"]), default=None)
    lines += [
        "",
        "| Euler steps | OT - baseline at the last step | 3,000-step baseline's sd over seeds | reading |",
        "|---:|---:|---:|---|",
    ]
    for k in (1, 2):
        diff = value_at(ot[0], key(k), last) - value_at(base[0], key(k), last)
        spread = seed_spread(short_base, key(k), short_last) if short_last else None
        lines.append(f"| {k} | {diff:+.4f} | {_f(spread)} | {verdict(diff, spread)} |")
    lines += ["", "Steps to quality in the long pair (the baseline's best over 9,000 steps):", ""]
    return lines + _quality_table(ot, base, (1, 2)) + [""]


def arms_section(runs: dict[str, dict[int, dict]], steps: list[int]) -> list[str]:
    """Each arm's mean FID over its finished seeds at every evaluation (context)."""
    lines = ["## Each arm: mean FID over its finished seeds (sd)", ""]
    for k in SAMPLER_STEPS:
        lines += [
            f"{k} Euler step{'s' * (k > 1)}:",
            "",
            "| training step | " + " | ".join(f"`{m}`" for m in runs) + " |",
            "|---:|" + "---:|" * len(runs),
        ]
        for step in steps:
            cells = []
            for seeds in runs.values():
                values = values_at(seeds, key(k), step)
                sd = f" ({statistics.stdev(values):.4f})" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.4f}{sd}" if values else "")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def readings_sections(
    runs: dict[str, dict[int, dict]],
    long_runs: dict[str, dict[int, dict]],
    superseded: list[dict[str, Any]],
    scatter: dict[str, Any] | None,
) -> list[str]:
    """The primary read without interpolation, at shorter budgets, on the plateau; the run history."""
    arm, base = runs.get(OT, {}), runs.get(BASE, {})
    metric = key(PRIMARY_STEPS)
    sd = scatter_summary(scatter)[PRIMARY_STEPS]["std"] if scatter else None
    groups = {
        "3,000 steps": [r for seeds in runs.values() for _, r in sorted(seeds.items())],
        "9,000 steps": [r for seeds in long_runs.values() for _, r in sorted(seeds.items())],
    }
    return [
        *readings.bounds_section(arm, base, {k: key(k) for k in SAMPLER_STEPS}, PRIMARY_STEPS),
        *readings.budget_section(arm, base, metric),
        *readings.plateau_section(arm, base, metric, sd),
        *readings.history_section(groups, superseded),
        *readings.unresumed_section(arm, base, metric),
    ]


def render(
    runs_list: list[dict],
    long_list: list[dict],
    scatter: dict[str, Any] | None,
    superseded: list[dict] | None = None,
) -> str:
    """The whole report: the primary, readings of it, then the secondaries in the pre-registration's order."""
    runs = {m: by_method(runs_list).get(m, {}) for m in PLAN if m in by_method(runs_list)}
    long_runs = by_method(long_list)
    counted, complete = _count_line(runs, PLAN)
    long_counted, long_complete = _count_line(long_runs, LONG_PLAN)
    all_done = complete and long_complete and scatter is not None
    steps = sorted({row["step"] for seeds in runs.values() for r in seeds.values() for row in r["curve"]})
    lines = [
        "# Flow matching, paired seeds: the runner's report",
        "",
        "Rendered by `python benchmarks/flow_matching_report.py` from the finished runs' records under",
        "`benchmarks/results/speedup_flow` and `benchmarks/results/speedup_flow_long`; the design is",
        "[the pre-registration](flow-matching-preregistration.md). FID here is `val/fid64_n1024_euler<k>`:",
        "1,024 samples of the EMA weights at k Euler steps against 1,024 training digits, on the 64-channel",
        "Inception layer (small numbers; it tracks progress within this experiment, not comparable with",
        "published FIDs). Lower is better; every difference is an arm minus the same seed's baseline.",
        "",
        (
            "**Complete**: every pre-registered run has finished."
            if all_done
            else "**Interim**: not every pre-registered run has finished. The primary comparison is"
            " decided once its 12 runs are in; a comparison whose runs are missing says so."
        ),
        "",
        f"- 3,000-step runs finished: {counted}.",
        f"- 9,000-step pair finished: {long_counted}.",
        f"- Sampling scatter: {'measured' if scatter else 'not measured yet'}.",
        "",
    ]
    primary_done = all(set(PLAN[m]) <= set(runs.get(m, {})) for m in (BASE, OT))
    if runs:
        lines += [
            "![FID against training steps at 1, 2, 4 and 8 Euler steps: every run thin, each arm's"
            " mean thick](flow_matching_curves.png)",
            "",
        ]
    lines += primary_section(runs, primary_done)
    lines += readings_sections(runs, long_runs, superseded or [], scatter)
    lines += ["## Secondary 1: steps to quality at 1, 4 and 8 Euler steps, minibatch OT", ""]
    lines += [*_quality_table(runs.get(OT, {}), runs.get(BASE, {}), (1, 4, 8)), ""]
    lines += ["## Secondary 2: steps to quality, the L2 assignment (3 seeds: a description, p >= 0.25)", ""]
    lines += [*_quality_table(runs.get(L2, {}), runs.get(BASE, {}), SAMPLER_STEPS), ""]
    lines += [
        "## Secondary 3: paired FID differences at every evaluation",
        "",
        "Arm minus the same seed's baseline: mean ± standard error (arm better in k of n seeds, two-sided",
        "sign test). **R**: real by the pre-registered bar (sign test p < 0.05 *and* |mean| larger than",
        "the baseline's seed-to-seed sd at that point, Secondary 6); with 6 seeds that needs 6 of 6.",
        "",
    ]
    lines += paired_section(runs, OT, steps) + paired_section(runs, L2, steps) + relative_section(runs, steps)
    lines += ot_vs_l2_section(runs) + rise_section(runs) + floor_section(runs, steps, scatter)
    lines += long_section(long_runs, runs) + arms_section(runs, steps)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Figure


#: Figure layout: 2 x 2 panels, fonts sized for a phone. A 390 px wide phone shows the figure about
#: 360 px wide (1 point of FONT_PT is then about 0.8 px: 13-point ticks read about 10 px tall); a wide
#: screen shows it at most 600 px wide (docs/stylesheets/extra.css).
FIG_SIZE = (6.0, 6.4)
FONT_PT = 14
FIG_DPI = 150


def _panels() -> tuple[Any, Any]:
    """Four axes in 2 x 2, one per Euler step count, titled; one y label for all, x labels below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, grid = plt.subplots(2, 2, figsize=FIG_SIZE, layout="constrained")
    axes = grid.ravel()
    for ax, k in zip(axes, SAMPLER_STEPS, strict=True):
        ax.set_title(f"{k} Euler step{'s' * (k > 1)}", fontsize=FONT_PT + 1)
        ax.tick_params(labelsize=FONT_PT - 1)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.grid(alpha=0.3)
    for ax in grid[1]:
        ax.set_xlabel("training steps", fontsize=FONT_PT)
    fig.supylabel("FID (64-channel Inception, 1,024 samples)", fontsize=FONT_PT)
    return fig, axes


def _save(fig: Any, axes: Any, path: Path) -> Path:
    """One legend under the panels (one column: it stays readable on a phone), then the PNG."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=1, frameon=False, fontsize=FONT_PT - 1)
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def figure(runs_list: list[dict], path: Path) -> Path:
    """FID against training steps at 1, 2, 4 and 8 Euler steps: every run thin, each arm's mean thick."""
    runs = by_method(runs_list)
    colors = {BASE: "tab:gray", OT: "tab:blue", L2: "tab:orange"}
    fig, axes = _panels()
    for ax, k in zip(axes, SAMPLER_STEPS, strict=True):
        for method in [m for m in PLAN if m in runs]:
            seeds = runs[method]
            for r in seeds.values():
                ax.plot(
                    [row["step"] for row in r["curve"]],
                    [row[key(k)] for row in r["curve"]],
                    color=colors.get(method, "k"),
                    alpha=0.25,
                    lw=0.8,
                )
            steps = sorted({row["step"] for r in seeds.values() for row in r["curve"]})
            means = [statistics.mean(values_at(seeds, key(k), s)) for s in steps]
            ax.plot(
                steps,
                means,
                color=colors.get(method, "k"),
                lw=2,
                marker="o",
                ms=3,
                label=f"{NAMES.get(method, method)} ({len(seeds)} seeds)",
            )
    return _save(fig, axes, path)


def long_figure(long_list: list[dict], runs_list: list[dict], path: Path) -> Path:
    """The 9,000-step pair (thick) beside the same seed's 3,000-step runs (thin), per Euler step count."""
    long_runs, runs = by_method(long_list), by_method(runs_list)
    colors = {BASE: "tab:gray", OT: "tab:blue"}
    fig, axes = _panels()
    for ax, k in zip(axes, SAMPLER_STEPS, strict=True):
        for method, color in colors.items():
            for seeds, lw, label in (
                (runs.get(method, {}), 0.8, "3,000 steps"),
                (long_runs.get(method, {}), 2, "9,000 steps"),
            ):
                if 0 not in seeds:
                    continue
                curve = seeds[0]["curve"]
                ax.plot(
                    [row["step"] for row in curve],
                    [row[key(k)] for row in curve],
                    color=color,
                    lw=lw,
                    marker="o",
                    ms=3 if lw > 1 else 2,
                    alpha=1.0 if lw > 1 else 0.6,
                    label=f"{NAMES[method]}, seed 0, {label}",
                )
        _log_axis(ax)
    return _save(fig, axes, path)


def _log_axis(ax: Any) -> None:
    """A log y axis labelled in plain decimals (0.05, not 5 x 10^-2) at 1-2-3-5 steps, at most 6 of them."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 3, 4, 5, 6, 8), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) <= 6:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------
# The sampling scatter


def scatter_args(sample_seed: int, ckpt: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The pre-registered ``validate`` command's arguments for one sample seed, then ``extra``."""
    configs = ROOT / "example_projects" / "flow_matching" / "configs"
    return [
        "validate",
        *("--config", str(configs / "quickstart.yaml")),
        *("--config", str(configs / "compare.yaml")),
        *("--config", str(configs / "baseline.yaml")),
        *("--ckpt_path", str(ckpt)),
        "--fid.samplers=[euler1, euler2, euler4, euler8]",
        "--fid.num_samples=1024",
        f"--fid.seed={sample_seed}",
        *extra,
    ]


def measure_scatter(
    ckpt: Path,
    out: Path,
    seeds: tuple[int, ...] = SCATTER_SEEDS,
    extra: tuple[str, ...] = ("--trainer.logger=false",),
) -> dict[str, Any]:
    """Evaluates ``ckpt`` once per sample seed with the example's ``validate``; writes ``out`` (JSON).

    Only the starting noise of the FID's samples changes between seeds (same weights, same real
    digits), so the spread is the FID's own sampling scatter. ``extra`` goes after the registered
    arguments (the default only turns the logger off: no ``lightning_logs`` folder).
    """
    from example_projects.flow_matching import cli_main

    evaluations = []
    for s in seeds:
        cli = cli_main(scatter_args(s, ckpt, extra))
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "/fid" in k}
        evaluations.append({"sample_seed": s, **metrics})
    name = str(ckpt.resolve().relative_to(ROOT)) if ckpt.resolve().is_relative_to(ROOT) else str(ckpt)
    record = {"checkpoint": name, "evaluations": evaluations}
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=Path, default=RESULTS / "speedup_flow", help="the 3,000-step runs' --out"
    )
    parser.add_argument(
        "--long", type=Path, default=RESULTS / "speedup_flow_long", help="the 9,000-step pair's --out"
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the report and the figure go")
    parser.add_argument("--scatter", action="store_true", help="measure the sampling scatter first")
    args = parser.parse_args(argv)
    scatter_path = args.runs / "sampling_scatter.json"
    if args.scatter:
        measure_scatter(args.runs / "runs" / "none_seed0" / "last.ckpt", scatter_path)
    scatter = json.loads(scatter_path.read_text()) if scatter_path.is_file() else None
    runs, long_list = load_runs(args.runs), load_runs(args.long)
    superseded = load_runs(args.runs, "superseded") + load_runs(args.long, "superseded")
    text = render(runs, long_list, scatter, superseded)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "flow_matching_report.md").write_text(text)
    if runs:
        figure(runs, args.docs / "flow_matching_curves.png")
    if all(0 in by_method(long_list).get(m, {}) for m in LONG_PLAN):
        long_figure(long_list, runs, args.docs / "flow_matching_long.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
