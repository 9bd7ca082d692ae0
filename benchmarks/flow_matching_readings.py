"""Readings of the flow-matching primary comparison that the pre-registration did not list.

The pre-registered measure (``speedup.steps_to_quality``) finds the step at which an arm first reaches
its baseline's best FID by linear interpolation between evaluations. These readings say how much of
the result the evaluations themselves carry, and how it depends on choices the rule fixed:

- **bounds**: without interpolation, the arm crossed the target between its last evaluation above it
  and its first at or below it, so per seed the factor lies between ``base_steps / first at or below``
  (the lower bound) and ``base_steps / last above`` (the upper bound; none when the arm was already
  below at its first evaluation);
- **budget**: the same rule on the records truncated at each evaluation (a shorter training budget);
- **plateau**: the target loosened from the baseline's best to within ``slack`` (one sampling SD) of
  it, the baseline's step then being its first evaluation at or below the loosened target;
- **history**: which runs were resumed (until the example's checkpoints kept its random streams, a
  resumed run no longer shared its partner's data order and training times), and the primary without
  the pairs that include one.

Every function takes the FID key(s) as arguments; ``flow_matching_report.py`` renders the sections.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from speedup import speedup_stats, steps_to_reach

CLAIM = 2.0


# ---------------------------------------------------------------------------------------------
# Computations


def truncated(runs: Mapping[int, dict[str, Any]], budget: int) -> dict[int, dict[str, Any]]:
    """The runs as if they had stopped at step ``budget``: only their evaluations at or before it."""
    return {s: {**r, "curve": [row for row in r["curve"] if row["step"] <= budget]} for s, r in runs.items()}


def crossing(curve: list[dict[str, float]], metric: str, target: float) -> tuple[float | None, float | None]:
    """``(last evaluation above target, first at or below it)`` in steps, by the evaluations alone.

    ``(None, first step)`` when the first evaluation is already at or below; ``(None, None)`` if never.
    """
    before = None
    for row in curve:
        if row[metric] <= target:
            return before, float(row["step"])
        before = float(row["step"])
    return None, None


def seed_reading(
    curve: list[dict[str, float]], base: list[dict[str, float]], metric: str, slack: float = 0.0
) -> dict[str, Any]:
    """One seed: the target (the baseline's best plus ``slack``), the rule's factor and its bounds.

    ``base_steps`` is the baseline's first evaluation at or below the target (with ``slack = 0`` the
    first at its best, as in the pre-registered rule); ``steps`` the arm's interpolated crossing and
    ``speedup`` = ``base_steps / steps`` (the rule); ``lower`` = ``base_steps / at`` and ``upper`` =
    ``base_steps / before`` (``None``: unbounded, the arm was below at its first evaluation).
    A seed that never reached the target has neither; ``bound`` = ``base_steps / its last step``.
    """
    best = min(row[metric] for row in base)
    target = best + slack
    base_steps = float(next(row["step"] for row in base if row[metric] <= target))
    steps = steps_to_reach(curve, metric, target)
    before, at = crossing(curve, metric, target)
    return {
        "best": best,
        "target": target,
        "base_steps": base_steps,
        "steps": steps,
        "before": before,
        "at": at,
        "at_first_eval": at is not None and at == curve[0]["step"],
        "speedup": base_steps / steps if steps else None,
        "lower": base_steps / at if at else None,
        "upper": base_steps / before if before else None,
        "bound": None if at else base_steps / curve[-1]["step"],
    }


def reading(
    arm: Mapping[int, dict[str, Any]],
    base: Mapping[int, dict[str, Any]],
    metric: str,
    slack: float = 0.0,
    seeds: set[int] | None = None,
) -> dict[str, Any]:
    """Per seed (paired, optionally only ``seeds``) and over seeds: the rule's factor and the lower bounds.

    Returns ``{"per_seed", "rule", "lower", "ties", "rule_ties"}``: ``rule`` and ``lower`` are
    ``speedup_stats`` of the interpolated factors and of the lower bounds (never-reached seeds at their
    bound, as the rule has it; ties at exactly 2x dropped from the sign test, as the rule has it);
    ``ties`` and ``rule_ties`` count the lower bounds and the factors of exactly 2x. ``{}`` without a pair.
    """
    per_seed = {
        s: seed_reading(arm[s]["curve"], base[s]["curve"], metric, slack)
        for s in sorted(set(arm) & set(base))
        if (seeds is None or s in seeds) and arm[s]["curve"] and base[s]["curve"]
    }
    if not per_seed:
        return {}
    rule = speedup_stats([{"speedup": r["speedup"], "speedup_bound": r["bound"]} for r in per_seed.values()])
    lower = speedup_stats([{"speedup": r["lower"], "speedup_bound": r["bound"]} for r in per_seed.values()])
    ties = sum(r["lower"] == CLAIM for r in per_seed.values())
    rule_ties = sum(r["speedup"] == CLAIM for r in per_seed.values())
    return {"per_seed": per_seed, "rule": rule, "lower": lower, "ties": ties, "rule_ties": rule_ties}


def runner_up(base: Mapping[int, dict[str, Any]], metric: str) -> dict[int, dict[str, float]]:
    """Per seed: the baseline's best and second-best evaluation of ``metric`` and the gap between them."""
    out = {}
    for s, r in sorted(base.items()):
        values = sorted(row[metric] for row in r["curve"])
        out[s] = {"best": values[0], "second": values[1], "gap": values[1] - values[0]}
    return out


def was_resumed(run: dict[str, Any]) -> bool | None:
    """Whether a run's records show a session that started after step 0 (``None``: not recorded)."""
    sessions = run.get("sessions")
    return None if sessions is None else any(s["start_step"] > 0 for s in sessions)


def resumed_seeds(*arms: Mapping[int, dict[str, Any]]) -> set[int]:
    """The seeds where a run of any of ``arms`` was resumed."""
    return {s for arm in arms for s, r in arm.items() if was_resumed(r)}


# ---------------------------------------------------------------------------------------------
# Markdown


def _x(f: float | None) -> str:
    return "-" if f is None else f"{f:.2f}x"


def _mean(stats: dict[str, Any]) -> str:
    """``4.66x [3.51, 6.17]`` (geometric mean, 95 % CI), with a mark when it includes bounds."""
    if stats.get("geomean") is None:
        return "-"
    ci = f" [{stats['ci95'][0]:.2f}, {stats['ci95'][1]:.2f}]" if stats["ci95"] else ""
    return f"{stats['geomean']:.2f}x{ci}{' (upper estimate)' if stats['censored'] else ''}"


def _claim(stats: dict[str, Any], ties: int | None = None) -> str:
    tie = f"; {ties} tie{'s' * (ties > 1)} at exactly 2x, dropped" if ties else ""
    return f"{stats['above_claim']} of {stats['n']} (p = {stats['p_claim']:.3f}{tie})"


def _first_eval_note(per_seed: Mapping[int, dict[str, Any]]) -> str:
    early = sum(r["at_first_eval"] for r in per_seed.values())
    return (
        f" (a lower estimate: {early} of {len(per_seed)} reached it by the first evaluation)" if early else ""
    )


def _reached(r: dict[str, Any]) -> str:
    if r["at"] is None:
        return "never"
    return f"<= {r['at']:.0f}" if r["before"] is None else f"{r['before']:.0f} - {r['at']:.0f}"


def _bounds(r: dict[str, Any]) -> str:
    if r["at"] is None:
        return f"< {r['bound']:.2f}x"
    return f"{r['lower']:.2f}x - " + ("unbounded" if r["upper"] is None else f"{r['upper']:.2f}x")


def bounds_section(
    arm: Mapping[int, dict], base: Mapping[int, dict], metrics: Mapping[int, str], primary: int
) -> list[str]:
    """The primary per seed with its bounds from the evaluations, then every step count in one table."""
    lines = ["## Reading (not pre-listed): the primary bounded by the evaluations", ""]
    main = reading(arm, base, metrics[primary])
    if not main:
        return [*lines, "No paired seed has finished yet.", ""]
    lines += [
        "The pre-registered rule interpolates linearly between evaluations. The evaluations alone say",
        "only that the OT run crossed the target between its last evaluation above it and its first at",
        "or below it, so per seed the factor lies between the baseline's step / that first evaluation",
        "(the lower bound) and the baseline's step / the evaluation before it (the upper bound). p: the",
        "one-sided sign test of above 2x, ties at exactly 2x dropped (the rule's test).",
        "",
        "| seed | baseline's best at step | OT crossed it between steps | speed-up bounds | the rule "
        "(interpolated) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s, r in main["per_seed"].items():
        lines.append(f"| {s} | {r['base_steps']:.0f} | {_reached(r)} | {_bounds(r)} | {_x(r['speedup'])} |")
    lower, rule = main["lower"], main["rule"]
    uppers = [r["upper"] for r in main["per_seed"].values()]
    upper_gm = (
        f"{_geo(uppers):.2f}x" if uppers and all(u is not None for u in uppers) else "unbounded in some seeds"
    )
    lines += [
        "",
        f"- Lower bounds: geometric mean **{_mean(lower)}** over {lower['n']} seeds; above 2x in "
        f"{_claim(lower, main['ties'])}.",
        f"- Upper bounds: geometric mean {upper_gm}.",
        f"- The rule (interpolated, as pre-registered): {_mean(rule)}; above 2x in "
        f"{_claim(rule, main['rule_ties'])}.",
        "",
        "Every sampler step count, the same way:",
        "",
        "| Euler steps | lower bounds: geometric mean [95 % CI] | lower bound above 2x (one-sided p) "
        "| the rule: geometric mean [95 % CI] | the rule: above 2x (one-sided p) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k, metric in metrics.items():
        q = reading(arm, base, metric)
        note = _first_eval_note(q["per_seed"])
        lines.append(
            f"| {k} | {_mean(q['lower'])} | {_claim(q['lower'], q['ties'])} | {_mean(q['rule'])}{note} "
            f"| {_claim(q['rule'], q['rule_ties'])} |"
        )
    return [*lines, ""]


def _geo(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def budget_section(arm: Mapping[int, dict], base: Mapping[int, dict], metric: str) -> list[str]:
    """The primary's factor on the records truncated at each evaluation after the first."""
    lines = ["## Reading (not pre-listed): the primary at shorter training budgets", ""]
    steps = sorted({row["step"] for r in base.values() for row in r["curve"]})
    if len(steps) < 2 or not reading(arm, base, metric):
        return [*lines, "Not enough evaluations yet.", ""]
    lines += [
        "The pre-registered rule on the records cut at each evaluation, as if every run had been that",
        "long: the baseline's best within the budget, the OT run's first crossing within it.",
        "",
        "| budget (steps) | baseline's best at, per seed | the rule: geometric mean [95 % CI] | above 2x "
        "(one-sided p) | lower bounds: geometric mean | lower bound above 2x |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for budget in steps[1:]:
        q = reading(truncated(arm, budget), truncated(base, budget), metric)
        at = ", ".join(f"{r['base_steps']:.0f}" for r in q["per_seed"].values())
        note = _first_eval_note(q["per_seed"])
        lines.append(
            f"| {budget} | {at} | {_mean(q['rule'])}{note} | {_claim(q['rule'], q['rule_ties'])} | "
            f"{_x(q['lower']['geomean'])} | {_claim(q['lower'], q['ties'])} |"
        )
    return [*lines, ""]


def plateau_section(
    arm: Mapping[int, dict], base: Mapping[int, dict], metric: str, sampling_sd: float | None
) -> list[str]:
    """The baseline's best against its runner-up, and the primary with the target loosened by one SD."""
    lines = ["## Reading (not pre-listed): the target on the baseline's plateau", ""]
    if sampling_sd is None:
        return [*lines, "Needs the sampling scatter (Secondary 6), not measured yet.", ""]
    q = reading(arm, base, metric, slack=sampling_sd)
    if not q:
        return [*lines, "No paired seed has finished yet.", ""]
    second = runner_up(base, metric)
    close = sum(v["gap"] < sampling_sd for v in second.values())
    lines += [
        f"The target is the baseline's best evaluation; in {close} of {len(second)} seeds its runner-up is",
        f"within one sampling SD ({sampling_sd:.4f}, the 2-step scatter of Secondary 6) of it, so which",
        "evaluation is the best is partly sampling noise. Loosened to within one sampling SD of the best",
        "(target = best + SD; the baseline's step = its first evaluation at or below that):",
        "",
        "| seed | best | runner-up (gap) | loosened target | baseline reached it at | OT crossed it between "
        "| speed-up bounds | the rule (interpolated) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, r in q["per_seed"].items():
        v = second[s]
        lines.append(
            f"| {s} | {v['best']:.4f} | {v['second']:.4f} ({v['gap']:.4f}) | {r['target']:.4f} | "
            f"{r['base_steps']:.0f} | {_reached(r)} | {_bounds(r)} | {_x(r['speedup'])} |"
        )
    lines += [
        "",
        f"- The rule with the loosened target: {_mean(q['rule'])}; above 2x in "
        f"{_claim(q['rule'], q['rule_ties'])}.",
        f"- Lower bounds: {_mean(q['lower'])}; above 2x in {_claim(q['lower'], q['ties'])}.",
    ]
    return [*lines, ""]


def _sessions(run: dict[str, Any]) -> str:
    sessions = run.get("sessions")
    if sessions is None:
        return "not recorded"
    starts = [f"from step {s['start_step']}" for s in sessions]
    sources = sorted({s["source"] for s in sessions if s.get("source")})
    return ", then ".join(starts) + "".join(f" ({src})" for src in sources)


def history_section(
    groups: Mapping[str, list[dict[str, Any]]], superseded: list[dict[str, Any]]
) -> list[str]:
    """Every run's sessions as its records give them, and the records set aside (superseded)."""
    lines = [
        "## Run history: sessions and resumes",
        "",
        "Each run's training sessions as its records give them (`sessions` in `done.json`, written by the",
        "runner; for a run finished before it recorded them, a `sessions.jsonl` beside the record where a",
        "resume is known). Until the example's checkpoints kept its random streams, a resumed run drew its",
        "data order and training times afresh from the resume on, so from there it no longer shared them",
        "with the same seed's other arms.",
        "",
    ]
    known = [(g, r) for g, runs in groups.items() for r in runs if r.get("sessions") is not None]
    if known:
        lines += ["| runs | run | sessions |", "|---|---|---|"]
        for group, r in known:
            mark = " **resumed**" if was_resumed(r) else ""
            lines.append(f"| {group} | `{r['method']}` seed {r['seed']}{mark} | {_sessions(r)} |")
        lines.append("")
    unknown = []
    for group, runs in groups.items():
        by_method: dict[str, list[int]] = {}
        for r in runs:
            if r.get("sessions") is None:
                by_method.setdefault(r["method"], []).append(r["seed"])
        unknown += [
            f"{group}, `{m}` seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
            for m, seeds in by_method.items()
        ]
    if unknown:
        lines += [
            "Sessions not recorded (finished before the runner recorded them; no resume is noted beside",
            f"their records): {'; '.join(unknown)}.",
            "",
        ]
    if superseded:
        lines += ["Records set aside (`superseded/`, kept, in no comparison of this report):", ""]
        lines += [
            f"- `{r['method']}` seed {r['seed']}{' **resumed**' if was_resumed(r) else ''}: "
            f"{r.get('reason') or 'no reason given'}; "
            f"sessions: {_sessions(r)}."
            for r in superseded
        ]
        lines.append("")
    return lines


def unresumed_section(arm: Mapping[int, dict], base: Mapping[int, dict], metric: str) -> list[str]:
    """The primary over the seeds whose baseline and OT runs each ran in one session (or are not known)."""
    lines = ["## Reading (not pre-listed): the primary without resumed pairs", ""]
    resumed = resumed_seeds(arm, base)
    if not resumed:
        return [*lines, "No run of the primary comparison was resumed: the primary stands as it is.", ""]
    keep = set(arm) & set(base) - resumed
    q = reading(arm, base, metric, seeds=keep)
    if not q:
        return [*lines, "Every pair includes a resumed run.", ""]
    seeds, rule, lower = ", ".join(map(str, sorted(resumed))), q["rule"], q["lower"]
    lines += [
        f"Without seed{'s' * (len(resumed) > 1)} {seeds} (a resumed run in its pair), {rule['n']} seeds:",
        "",
        f"- the rule: {_mean(rule)}; above 2x in {_claim(rule, q['rule_ties'])}; faster than the baseline in "
        f"{rule['faster']} of {rule['n']} (two-sided p = {rule['p_faster']:.3f});",
        f"- lower bounds: {_mean(lower)}; above 2x in {_claim(lower, q['ties'])}.",
    ]
    return [*lines, ""]
