"""Secondary 7 of the dataset-coupling pre-registration: the Lightning example's runs, per seed.

Reads the paired-seed runner's records (``RUNS/{arm}_seed{seed}/done.json``, written by
``benchmarks/speedup.py``) and writes Markdown: FID against the held-out digits at every evaluation,
per arm, seed and Euler step count; the memorisation measures at the final evaluation; the fitting
time with the map's steps and ``chi2``; the logged coupling times; and the mean differences
``dataset - baseline`` and ``dataset - ot`` with the per-seed values. Three seeds: descriptive, no
test. Nothing is trained here.

    python -m experiments.dataset_fm.lightning_report \
        --runs benchmarks/results/dataset_flow/runs --out docs/results/dataset_flow_report.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from example_projects.common.fid import copy_metric_name, fid_metric_name

ARMS = {"none": "independent", "lsa-sqeuclidean": "batch OT", "dataset": "dataset"}
EULER = (1, 2, 4, 8)
MEMORISATION = ("copy_share", "near_share", "distance_ratio")
PAIRS = (("dataset", "none"), ("dataset", "lsa-sqeuclidean"))


def fid_key(k: int, n: int = 1024) -> str:
    """The example's FID key at ``k`` Euler steps from ``n`` samples (``val/fid64_n1024_euler2``)."""
    return fid_metric_name(64, n, k, sampler="euler")


def memo_key(measure: str, k: int, n: int = 1024) -> str:
    """The example's memorisation key (``val/copy_share_n1024_euler2``)."""
    return copy_metric_name(measure, n, k, sampler="euler")


def load_runs(runs: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every finished run under ``runs`` (those with ``done.json``), keyed by ``(arm, seed)``."""
    out = {}
    for done in sorted(runs.glob("*_seed*/done.json")):
        r = json.loads(done.read_text())
        out[(r["method"], int(r["seed"]))] = r
    return out


def value_at(run: dict[str, Any], key: str, step: int) -> float | None:
    """``key``'s value at training step ``step`` of ``run`` (``None`` when not recorded)."""
    rows = [row for row in run["curve"] if row["step"] == step and key in row]
    return float(rows[0][key]) if rows else None


def final_step(runs: dict[tuple[str, int], dict[str, Any]]) -> int:
    """The last evaluation step every run recorded."""
    return min(max(row["step"] for row in r["curve"]) for r in runs.values())


def differences(
    runs: dict[tuple[str, int], dict[str, Any]], a: str, b: str, key: str, step: int
) -> dict[int, float]:
    """Per seed with both arms recorded, ``a``'s value of ``key`` minus ``b``'s at ``step``."""
    out = {}
    for (arm, seed), run in sorted(runs.items()):
        if arm != a or (b, seed) not in runs:
            continue
        va, vb = value_at(run, key, step), value_at(runs[(b, seed)], key, step)
        if va is not None and vb is not None:
            out[seed] = va - vb
    return out


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):+.3f} ± {sd:.3f}" if len(xs) > 1 else f"{xs[0]:+.3f}"


def _columns(runs: dict[tuple[str, int], dict[str, Any]]) -> list[tuple[str, int]]:
    return sorted(runs, key=lambda am: (list(ARMS).index(am[0]) if am[0] in ARMS else 99, am[1]))


def fid_section(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """One table per Euler step count: FID per evaluation step (rows) and run (columns)."""
    cols = _columns(runs)
    steps = sorted({row["step"] for r in runs.values() for row in r["curve"]})
    lines = ["## FID against the held-out digits at every evaluation", ""]
    for k in EULER:
        lines += [f"**{k} Euler step{'s' if k > 1 else ''}** (`{fid_key(k)}`)", ""]
        lines.append("| step | " + " | ".join(f"{ARMS.get(a, a)} s{s}" for a, s in cols) + " |")
        lines.append("|---:|" + "---:|" * len(cols))
        for step in steps:
            cells = [value_at(runs[c], fid_key(k), step) for c in cols]
            lines.append(f"| {step} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    return lines


def difference_section(runs: dict[tuple[str, int], dict[str, Any]], step: int) -> list[str]:
    """The mean differences ``dataset - baseline`` and ``dataset - ot`` with per-seed values."""
    lines = [
        f"## Mean differences at the final evaluation (step {step})",
        "",
        "FID of the dataset arm minus the other arm's, per seed (negative: the dataset arm is better).",
        "",
        "| Euler steps | pair | per seed | mean ± SD | dataset better in |",
        "|---:|---|---|---:|---:|",
    ]
    for k in EULER:
        for a, b in PAIRS:
            d = differences(runs, a, b, fid_key(k), step)
            per_seed = ", ".join(f"s{s}: {v:+.3f}" for s, v in d.items())
            better = sum(v < 0 for v in d.values())
            lines.append(
                f"| {k} | {ARMS[a]} - {ARMS[b]} | {per_seed} | {_mean_sd(list(d.values()))} | "
                f"{better}/{len(d)} |"
            )
    lines += ["", "Mean difference at every evaluation (mean over the seeds with both arms):", ""]
    steps = sorted({row["step"] for r in runs.values() for row in r["curve"]})
    head = [f"{ARMS[a]} - {ARMS[b]}, {k}" for a, b in PAIRS for k in EULER]
    lines += ["| step | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    for s in steps:
        cells = []
        for a, b in PAIRS:
            for k in EULER:
                d = list(differences(runs, a, b, fid_key(k), s).values())
                cells.append(f"{statistics.mean(d):+.3f}" if d else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def memorisation_section(runs: dict[tuple[str, int], dict[str, Any]], step: int) -> list[str]:
    """The three memorisation measures at ``step``, per arm and Euler step count, per seed."""
    lines = [
        f"## Memorisation at the final evaluation (step {step})",
        "",
        "Per seed (s0, s1, s2), on the same 1,024 samples as the FID, against the 4,000 training digits"
        " with the 1,000 held-out digits as the reference.",
        "",
        "| Euler steps | arm | " + " | ".join(MEMORISATION) + " |",
        "|---:|---|" + "---|" * len(MEMORISATION),
    ]
    for k in EULER:
        for arm in ARMS:
            seeds = sorted(s for a, s in runs if a == arm)
            if not seeds:
                continue
            cells = []
            for m in MEMORISATION:
                vs = [value_at(runs[(arm, s)], memo_key(m, k), step) for s in seeds]
                cells.append(", ".join("n/a" if v is None else f"{v:.3f}" for v in vs))
            lines.append(f"| {k} | {ARMS[arm]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def cost_section(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Per run: each session's start and fit-start seconds, the map's steps and chi2, logged times.

    The fit-start seconds are those of the session's ``on_fit_start`` hooks (the map's fit); the
    times are the mean of each logged ``immiscible/*_ms`` over the run's evaluation intervals.
    """
    lines = [
        "## Cost",
        "",
        "Sessions: the step each session started from and the seconds its `on_fit_start` hooks took (the"
        " dataset arm fits its map there). Coupling times: the mean over the run's evaluation intervals"
        " of each logged `immiscible/*_ms` (each interval's value is the mean over its steps).",
        "",
        "| run | sessions (start step: fit-start s) | map steps | map chi2 | logged times (ms) |",
        "|---|---|---:|---:|---|",
    ]
    for arm, seed in _columns(runs):
        run = runs[(arm, seed)]
        sess = run.get("sessions", [])
        starts = ", ".join(f"{x['start_step']}: {x.get('fit_start_s', float('nan')):.1f}" for x in sess)
        maps = [x["map"] for x in sess if "map" in x]
        steps = ", ".join(str(m["steps"]) for m in maps) or "-"
        chi2 = ", ".join(f"{m['chi2']:.4f}" for m in maps if m.get("chi2") is not None) or "-"
        keys = sorted({k for row in run["curve"] for k in row if k.startswith("immiscible/")})
        means = {k: statistics.mean(row[k] for row in run["curve"] if k in row) for k in keys}
        times = "; ".join(f"`{k.removeprefix('immiscible/')}` {v:.2f}" for k, v in means.items())
        lines.append(f"| {ARMS.get(arm, arm)} s{seed} | {starts} | {steps} | {chi2} | {times or '-'} |")
    return [*lines, ""]


def render(runs: dict[tuple[str, int], dict[str, Any]]) -> str:
    """The whole report as Markdown."""
    missing = [f"{a}_seed{s}" for a in ARMS for s in (0, 1, 2) if (a, s) not in runs]
    step = final_step(runs)
    head = [
        "# The dataset-level coupling in the Lightning example: the runs (secondary 7)",
        "",
        "Written by `python -m experiments.dataset_fm.lightning_report --runs"
        " benchmarks/results/dataset_flow/runs --out docs/results/dataset_flow_report.md` from the"
        " runs' records; what they mean is on [the results page](dataset-coupling.md#the-lightning-example).",
        "",
    ]
    if missing:
        head += [f"Not finished: {', '.join(missing)}.", ""]
    body = fid_section(runs) + difference_section(runs, step)
    return "\n".join(head + body + memorisation_section(runs, step) + cost_section(runs))


def main(argv: list[str] | None = None) -> str:
    """Reads the records and writes (and returns) the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("benchmarks/results/dataset_flow/runs"))
    p.add_argument("--out", type=Path, default=None, help="where to write the Markdown (default: print)")
    args = p.parse_args(argv)
    text = render(load_runs(args.runs))
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
