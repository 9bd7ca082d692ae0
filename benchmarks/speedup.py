"""Does immiscible coupling speed up training? Paired runs of an example, FID curves, speed-up.

Trains an example project (through its LightningCLI ``cli_main``) once per method and seed, with
identical seeds, data order, initial weights and noise pools (only the pairing differs), evaluates
FID every ``--eval-every`` steps, and writes to ``--out``:

- ``curves.json``: every run's FID curve(s) and the settings;
- ``fid_vs_steps.png``: FID vs training steps, mean and min-max band per method;
- ``report.md``: per method, FID at each evaluation (mean +- std over seeds) and the steps needed to
  reach the baseline's final FID, with the speed-up factor (per seed, paired with that seed's
  baseline) and its spread; then, per evaluation, the paired difference to the baseline (mean +-
  standard error over seeds, in how many seeds the method was better, and a two-sided sign-test
  p-value), which tells a consistent effect from seed-to-seed noise.

Resumable: each run lives in ``OUT/runs/{method}_seed{seed}`` with a ``last.ckpt`` written at every
evaluation; a run with ``done.json`` is skipped, an interrupted one continues from its checkpoint.

    python benchmarks/speedup.py --example ddim \
        --config example_projects/ddim/configs/quickstart.yaml \
        --methods none lsa --seeds 0 1 2 --max-steps 600 --eval-every 100 --out runs/speedup_ddim \
        -- --fid.num_samples=256 --fid.sampling_steps=[20]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

METHOD_ARGS = {"knn": {"k": 4}}


class CurveRecorder(L.Callback):
    """Appends the FID values of every evaluation to ``curves.jsonl`` (one JSON object per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        fids = {k: float(v) for k, v in trainer.callback_metrics.items() if "/fid" in k}
        if fids:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, **fids}) + "\n")


def _overlay(run_dir: Path, method: str, seed: int) -> Path:
    init = {"method": method, "seed": seed, **METHOD_ARGS.get(method, {})}
    args = "{" + ", ".join(f"{k}: {v}" for k, v in init.items()) + "}"
    path = run_dir / "method.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_immiscible.ImmiscibleCoupling\n"
        f"      init_args: {args}\n"
    )
    return path


def build_cli(args: argparse.Namespace, method: str, seed: int, run_dir: Path) -> Any:
    """The example's LightningCLI for one (method, seed) run, instantiated but not run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cli_args = ["--config", str(args.config), "--config", str(_overlay(run_dir, method, seed))]
    cli_args += [
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.max_steps}",
        "--trainer.max_epochs=-1",
        "--trainer.check_val_every_n_epoch=null",
        f"--trainer.val_check_interval={args.eval_every}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=false",
        *args.extra,
    ]
    # The example projects are not installed with the package: import them from the clone's root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return importlib.import_module(f"example_projects.{args.example}").cli_main(cli_args, run=False)


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Trains one (method, seed) run to ``max_steps`` (or continues it) and returns its curve."""
    run_dir = args.out / "runs" / f"{method}_seed{seed}"
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    cli = build_cli(args, method, seed, run_dir)
    ckpt = ModelCheckpoint(
        dirpath=run_dir, filename="eval-{step}", save_last=True, every_n_train_steps=args.eval_every
    )
    cli.trainer.callbacks.extend([CurveRecorder(run_dir / "curves.jsonl"), ckpt])
    last = run_dir / "last.ckpt"
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    result = {"method": method, "seed": seed, "curve": _read_curve(run_dir / "curves.jsonl")}
    result["train_seconds_last_session"] = time.perf_counter() - start
    done.write_text(json.dumps(result, indent=2))
    return result


def _read_curve(path: Path) -> list[dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        rows[int(row["step"])] = row  # a re-run evaluation replaces the interrupted one
    return [rows[s] for s in sorted(rows)]


def steps_to_reach(curve: list[dict[str, float]], metric: str, target: float) -> float | None:
    """First training step at which ``metric`` <= ``target`` (linear interpolation between evals)."""
    prev = None
    for row in curve:
        if row[metric] <= target:
            if prev is None or prev[metric] == row[metric]:
                return float(row["step"])
            frac = (prev[metric] - target) / (prev[metric] - row[metric])
            return prev["step"] + frac * (row["step"] - prev["step"])
        prev = row
    return None


def summarize(runs: list[dict[str, Any]], metric: str, baseline: str = "none") -> dict[str, Any]:
    """Per method: FID per step (mean, std, min, max) and steps/speed-up vs the paired baseline."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    base = by_method[baseline]
    summary: dict[str, Any] = {}
    for method, seeds in by_method.items():
        steps = sorted({row["step"] for r in seeds.values() for row in r["curve"]})
        fid = {}
        for s in steps:
            values = [row[metric] for r in seeds.values() for row in r["curve"] if row["step"] == s]
            fid[s] = {"mean": statistics.mean(values), "std": statistics.pstdev(values), "min": min(values),
                      "max": max(values), "n": len(values)}  # fmt: skip
        speedups, reach = [], []
        for seed, r in seeds.items():
            if seed not in base or not base[seed]["curve"] or not r["curve"]:
                continue
            final = base[seed]["curve"][-1]
            needed = steps_to_reach(r["curve"], metric, final[metric])
            reach.append(needed)
            if needed:
                speedups.append(final["step"] / needed)
        summary[method] = {"fid": fid, "steps_to_baseline_final": reach, "speedup": speedups}
    for method, by_step in paired_differences(runs, metric, baseline).items():
        summary[method]["paired"] = by_step
    return summary


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign-test p-value for ``better`` vs ``worse`` paired outcomes (ties dropped)."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_differences(
    runs: list[dict[str, Any]], metric: str, baseline: str = "none"
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per method and evaluation step: ``metric`` minus the same seed's baseline (negative = better).

    Returns ``{method: {step: {"mean", "sem", "n", "better", "worse", "p"}}}`` for every method but
    the baseline, over the seeds where both runs evaluated that step.
    """
    curves = {(r["method"], r["seed"]): {row["step"]: row[metric] for row in r["curve"]} for r in runs}
    out: dict[str, dict[int, list[float]]] = {}
    for (method, seed), curve in sorted(curves.items()):
        base = curves.get((baseline, seed))
        if method == baseline or base is None:
            continue
        for step, value in curve.items():
            if step in base:
                out.setdefault(method, {}).setdefault(step, []).append(value - base[step])
    return {
        method: {step: paired_stats(diffs[step]) for step in sorted(diffs)} for method, diffs in out.items()
    }


def paired_stats(diffs: list[float]) -> dict[str, Any]:
    """Mean, standard error, count, sign counts (negative = better) and sign-test p of paired differences."""
    better, worse = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": statistics.mean(diffs), "sem": sem, "n": len(diffs), "better": better, "worse": worse,
            "p": sign_test_p(better, worse)}  # fmt: skip


def _fmt_speedup(values: list[float], n: int) -> str:
    if not values:
        return f"not reached (0/{n} seeds)"
    text = f"{statistics.mean(values):.2f}x"
    if len(values) > 1:
        text += f" (min {min(values):.2f}, max {max(values):.2f})"
    return text + ("" if len(values) == n else f", reached in {len(values)}/{n} seeds")


def write_report(out: Path, summary: dict[str, Any], metric: str, settings: dict[str, Any]) -> str:
    """Writes ``report.md`` and ``fid_vs_steps.png``; returns the Markdown."""
    steps = sorted({s for m in summary.values() for s in m["fid"]})
    lines = [f"FID metric: `{metric}`; settings: `{json.dumps(settings)}`", ""]
    lines.append(
        "| method | "
        + " | ".join(f"step {s}" for s in steps)
        + " | steps to baseline's final FID | speed-up |"
    )
    lines.append("|---|" + "---:|" * (len(steps) + 2))
    for method, m in summary.items():
        cells = [
            f"{m['fid'][s]['mean']:.2f} ± {m['fid'][s]['std']:.2f}" if s in m["fid"] else "" for s in steps
        ]
        reach = [f"{r:.0f}" if r else "-" for r in m["steps_to_baseline_final"]]
        n = len(m["steps_to_baseline_final"])
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {', '.join(reach)} | {_fmt_speedup(m['speedup'], n)} |"
        )
    paired = {m: v["paired"] for m, v in summary.items() if v.get("paired")}  # the baseline has none
    if paired:
        lines += [
            "",
            f"Paired difference to the baseline ({metric}, method minus baseline, same seed; negative ="
            " method better): mean ± standard error, better in k of n seeds, two-sided sign-test p.",
            "",
        ]
        lines.append("| method | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for method, by_step in paired.items():
            cells = [_fmt_paired(by_step[s]) if s in by_step else "" for s in steps]
            lines.append(f"| {method} − none | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _plot(out / "fid_vs_steps.png", summary, metric)
    return text


def _fmt_paired(row: dict[str, Any]) -> str:
    sem = "" if row["sem"] is None else f" ± {row['sem']:.2f}"
    return f"{row['mean']:+.2f}{sem} ({row['better']}/{row['n']}, p={row['p']:.2f})"


def _plot(path: Path, summary: dict[str, Any], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, m in summary.items():
        steps = sorted(m["fid"])
        ax.plot(steps, [m["fid"][s]["mean"] for s in steps], marker="o", label=method)
        ax.fill_between(
            steps, [m["fid"][s]["min"] for s in steps], [m["fid"][s]["max"] for s in steps], alpha=0.2
        )
    ax.set_xlabel("training steps")
    ax.set_ylabel(metric)
    ax.legend(title="method (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", default="ddim", help="example_projects.<name> with a cli_main")
    parser.add_argument("--config", type=Path, required=True, help="the example's base config")
    parser.add_argument("--methods", nargs="+", default=["none", "lsa"], help="'none' is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--metric", default=None, help="FID key to compare (default: the first val/fid* key)")
    parser.add_argument("--out", type=Path, default=Path("runs/speedup"))
    args = parser.parse_args(argv)
    args.extra = extra
    if "none" not in args.methods:
        parser.error("--methods must include the baseline 'none'")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args, m, s) for s in args.seeds for m in args.methods]
    metric = args.metric or sorted(k for k in runs[0]["curve"][0] if k.startswith("val/fid"))[0]
    settings = {k: str(v) for k, v in vars(args).items()}
    summary = summarize(runs, metric)
    (args.out / "curves.json").write_text(json.dumps({"settings": settings, "metric": metric, "runs": runs,
                                                      "summary": summary}, indent=2))  # fmt: skip
    print(write_report(args.out, summary, metric, settings))
    return summary


if __name__ == "__main__":
    main()
