"""Does immiscible coupling speed up training? Paired runs of an example, FID curves, speed-up.

Trains an example project (through its LightningCLI ``cli_main``) once per method and seed, with
identical seeds, data order, initial weights and noise pools (only the pairing differs), evaluates
FID every ``--eval-every`` steps, and writes to ``--out``:

- ``curves.json``: every run's FID curve(s) and the settings;
- ``fid_vs_steps.png``: FID vs training steps, mean and min-max band per method;
- ``report.md``: per FID key (``--metric``, several allowed), per method, FID at each evaluation
  (mean +- std over seeds) and the steps needed to reach the baseline's final FID; then **steps to
  quality**: the training steps each seed needs to reach its paired baseline's *best* FID over the
  run (not its last: a few-step FID can rise with training), the speed-up factor (baseline's step of
  its best / the method's step; geometric mean over seeds with a 95 % t-interval on the log factors),
  a two-sided sign test of "faster than the baseline" and a one-sided sign test of "more than 2x
  faster"; then, per evaluation, the paired difference to the baseline (mean +- standard error over
  seeds, in how many seeds the method was better, and a two-sided sign-test p-value).

A method is a coupling method, optionally with its metric: ``none`` (the baseline), ``lsa``,
``knn``, ``lsa-sqeuclidean`` (minibatch OT, the flow-matching example's ``ot.yaml``), ``lsa-l2``;
or a name given its own overlay with ``--method-config NAME=PATH`` (e.g. ``dataset=`` the
flow-matching example's ``configs/dataset.yaml``): that run takes the overlay's settings and
callbacks, with the run's seed set on its ``ImmiscibleCoupling``. Besides FID, ``curves.jsonl``
keeps the mean of each logged ``immiscible/*_ms`` time over the steps since the previous
evaluation, and ``sessions.jsonl`` the seconds each session spent in the callbacks' ``on_fit_start``
(a ``FitSemidiscreteMap`` fits its map there) with the fitted map's ``chi2`` and steps.

Resumable: each run lives in ``OUT/runs/{method}_seed{seed}`` with a ``last.ckpt`` written at every
evaluation; a run with ``done.json`` is skipped, an interrupted one continues from its checkpoint.
Each session of a run appends the step it started from to ``sessions.jsonl`` (``done.json`` repeats
the list), so the records say which runs were resumed and where. A run resumes exactly only where
the example's checkpoints carry every random stream it draws from (the flow-matching example's do).

``--supersede NAME... --reason TEXT`` first moves those runs' folders from ``OUT/runs`` to
``OUT/superseded`` with the reason in ``superseded.json`` (kept, out of the report), so the same
command then trains them afresh; a run already superseded is left as it is, so the command resumes.

    python benchmarks/speedup.py --example ddim \
        --config example_projects/ddim/configs/quickstart.yaml \
        --methods none lsa --seeds 0 1 2 --max-steps 600 --eval-every 100 --out runs/speedup_ddim \
        -- --fid.num_samples=256 --fid.sampling_steps=[20]

``--config`` takes several files (base, then overlays), applied before the runner's own settings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_immiscible import FitSemidiscreteMap

METHOD_ARGS = {"knn": {"k": 4}}
METRICS = ("l2", "sqeuclidean", "cosine")


def method_args(name: str) -> dict[str, Any]:
    """``"lsa-sqeuclidean"`` -> ``{"method": "lsa", "metric": "sqeuclidean"}``; ``"knn"`` adds ``k``."""
    method, _, metric = name.partition("-")
    if metric and metric not in METRICS:
        raise ValueError(f"method {name!r}: the part after '-' must be a metric of {METRICS}.")
    return {"method": method, **({"metric": metric} if metric else {}), **METHOD_ARGS.get(method, {})}


class CurveRecorder(L.Callback):
    """Appends every evaluation's FID values (every ``val/`` key) to ``curves.jsonl``, one JSON line each.

    With them, the mean of each logged ``immiscible/*_ms`` time over the training steps since the
    previous evaluation (``{"immiscible/assign_ms": ...}``; absent when nothing logged one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._times: dict[str, list[Any]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # kept as logged (a tensor on the module's device): read once per evaluation, not per step,
        # so a GPU run does not wait for the device at every step
        for key, value in trainer.callback_metrics.items():
            if key.startswith("immiscible/") and key.endswith("_ms"):
                kept = value.detach().clone() if isinstance(value, torch.Tensor) else value
                self._times.setdefault(key, []).append(kept)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        fids = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") or "/fid" in k
        }
        times = {k: statistics.mean(float(x) for x in v) for k, v in self._times.items() if v}
        self._times = {}
        if fids:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, **fids, **times}) + "\n")


class FitStartClock(L.Callback):
    """Notes when a fit session's ``on_fit_start`` hooks begin (placed before every other callback)."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()


class SessionRecorder(L.Callback):
    """Appends one line per fit session to ``sessions.jsonl``.

    ``{"start_step": s, "fit_start_s": t}``: ``s`` > 0 when the session resumed; ``t`` the seconds
    the callbacks' ``on_fit_start`` hooks took (from ``clock``; this recorder comes after them), with
    ``"map": {"steps", "chi2", "converged"}`` when a ``FitSemidiscreteMap`` fitted a map there.
    """

    def __init__(self, path: Path, clock: FitStartClock | None = None) -> None:
        self.path, self.clock = path, clock
        self.fit_start_s: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.clock is not None:
            self.fit_start_s = time.perf_counter() - self.clock.start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        line: dict[str, Any] = {"start_step": trainer.global_step}  # after the checkpoint's progress
        if self.fit_start_s is not None:
            line["fit_start_s"] = self.fit_start_s
        for cb in trainer.callbacks:
            if isinstance(cb, FitSemidiscreteMap):
                line["map"] = {"steps": cb.map.steps, "chi2": cb.chi2, "converged": cb.converged}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def read_sessions(path: Path) -> list[dict[str, Any]]:
    """The sessions a run's ``sessions.jsonl`` lists, in order (``[]`` without the file)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def supersede(out: Path, names: list[str], reason: str) -> list[Path]:
    """Moves ``out/runs/NAME`` to ``out/superseded/NAME`` with ``superseded.json`` (``{"reason"}``).

    A name whose ``superseded/`` folder exists already is left alone (the command is being run again:
    the folder under ``runs/`` is then the rerun). Returns the folders moved now.
    """
    moved = []
    for name in names:
        src, dst = out / "runs" / name, out / "superseded" / name
        if dst.exists():
            continue
        if not src.is_dir():
            raise FileNotFoundError(f"--supersede {name}: no run folder {src}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        (dst / "superseded.json").write_text(json.dumps({"reason": reason}, indent=2) + "\n")
        moved.append(dst)
    return moved


COUPLING = "lightning_immiscible.ImmiscibleCoupling"


def _overlay(run_dir: Path, method: str, seed: int, configs: dict[str, Path]) -> Path:
    """Writes the run's ``method.yaml``: the method's coupling callback, with the run's seed."""
    if method in configs:
        overlay = method_overlay(configs[method], seed)
    else:
        init = {**method_args(method), "seed": seed}
        overlay = {"trainer": {"callbacks": [{"class_path": COUPLING, "init_args": init}]}}
    path = run_dir / "method.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def method_overlay(path: Path, seed: int) -> dict[str, Any]:
    """The overlay at ``path`` with ``seed`` set on its ``ImmiscibleCoupling`` callback(s).

    Raises:
        ValueError: The overlay has no ``ImmiscibleCoupling`` callback (its noise would not be the
            seed's, so the run would not be paired with the other methods' runs).
    """
    overlay = yaml.safe_load(path.read_text()) or {}
    callbacks = (overlay.get("trainer") or {}).get("callbacks") or []
    couplings = [c for c in callbacks if isinstance(c, dict) and c.get("class_path") == COUPLING]
    if not couplings:
        raise ValueError(
            f"--method-config {path}: the overlay has no trainer.callbacks entry with class_path "
            f"{COUPLING}, so the run's seed cannot be set on its noise; add one."
        )
    for c in couplings:
        c["init_args"] = {**(c.get("init_args") or {}), "seed": seed}
    return overlay


def build_cli(args: argparse.Namespace, method: str, seed: int, run_dir: Path) -> Any:
    """The example's LightningCLI for one (method, seed) run, instantiated but not run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = [str(c) for c in (args.config if isinstance(args.config, list) else [args.config])]
    cli_args = [w for c in configs for w in ("--config", c)]
    cli_args += ["--config", str(_overlay(run_dir, method, seed, args.method_config))]
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
    sessions, clock = run_dir / "sessions.jsonl", FitStartClock()
    cli.trainer.callbacks.insert(0, clock)
    cli.trainer.callbacks.extend(
        [CurveRecorder(run_dir / "curves.jsonl"), SessionRecorder(sessions, clock), ckpt]
    )
    last = run_dir / "last.ckpt"
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    result = {"method": method, "seed": seed, "curve": _read_curve(run_dir / "curves.jsonl")}
    result["train_seconds_last_session"] = time.perf_counter() - start
    result["sessions"] = read_sessions(sessions)
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


def steps_to_quality(
    curve: list[dict[str, float]], base: list[dict[str, float]], metric: str
) -> dict[str, Any]:
    """Training steps ``curve`` needs to reach the best ``metric`` its paired baseline ever logged.

    The target is the baseline's best (lowest) value over its run, reached at ``base_steps`` (the
    baseline's first evaluation with that value). ``steps`` is the first step at which ``curve`` is at
    or below it (linear interpolation between evaluations; when the first evaluation is already at
    or below it, that step, an upper bound, flagged ``at_first_eval``), ``None`` if never.
    ``speedup`` = ``base_steps / steps``; a run that never reached it has none, only the upper
    bound ``speedup_bound`` = ``base_steps / last step`` (it would need more than its whole run).
    """
    best = min(base, key=lambda row: (row[metric], row["step"]))
    steps = steps_to_reach(curve, metric, best[metric])
    return {
        "target": best[metric],
        "base_steps": float(best["step"]),
        "steps": steps,
        "at_first_eval": steps is not None and steps == curve[0]["step"],
        "speedup": best["step"] / steps if steps else None,
        "speedup_bound": None if steps else best["step"] / curve[-1]["step"],
    }


def one_sided_sign_p(above: int, below: int) -> float:
    """Exact one-sided sign-test p of ``above`` or more successes in ``above + below`` fair trials."""
    n = above + below
    return 1.0 if n == 0 else sum(math.comb(n, k) for k in range(above, n + 1)) / 2**n


def speedup_stats(per_seed: list[dict[str, Any]], claim: float = 2.0) -> dict[str, Any]:
    """Geometric-mean speed-up over seeds with a 95 % t-interval, and the sign tests.

    A seed that never reached the target enters the mean at its upper bound (so the mean is then an
    upper estimate: ``censored`` counts those seeds) and counts as slower than 1x and than ``claim``
    (it needed more steps than its baseline's whole run). ``p_faster``: two-sided sign test of
    "faster than the baseline" (ties dropped); ``p_claim``: one-sided sign test of "more than
    ``claim`` times faster".
    """
    from scipy import stats

    factors = [r["speedup"] if r["speedup"] is not None else r["speedup_bound"] for r in per_seed]
    reached = [r["speedup"] for r in per_seed if r["speedup"] is not None]
    censored = len(per_seed) - len(reached)
    faster, slower = sum(f > 1 for f in reached), sum(f < 1 for f in reached) + censored
    above, below = sum(f > claim for f in reached), sum(f < claim for f in reached) + censored
    out: dict[str, Any] = {"n": len(per_seed), "censored": censored, "faster": faster, "slower": slower,
                           "p_faster": sign_test_p(faster, slower), "claim": claim, "above_claim": above,
                           "below_claim": below, "p_claim": one_sided_sign_p(above, below),
                           "geomean": None, "ci95": None}  # fmt: skip
    logs = [math.log(f) for f in factors if f > 0]
    if logs:
        out["geomean"] = math.exp(statistics.mean(logs))
    if len(logs) > 1:
        half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        out["ci95"] = (math.exp(statistics.mean(logs) - half), math.exp(statistics.mean(logs) + half))
    return out


def quality(seeds: dict[int, dict], base: dict[int, dict], metric: str) -> dict[str, Any]:
    """Steps to quality of one method: per seed (paired with the same seed's baseline) and overall."""
    per_seed = {}
    for seed, r in sorted(seeds.items()):
        if seed in base and base[seed]["curve"] and r["curve"]:
            per_seed[seed] = steps_to_quality(r["curve"], base[seed]["curve"], metric)
    return {"per_seed": per_seed, **speedup_stats(list(per_seed.values()))} if per_seed else {}


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
        if method != baseline:
            summary[method]["quality"] = quality(seeds, base, metric)
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
    """Writes ``report.md`` and ``fid_vs_steps.png`` for one metric; returns the Markdown."""
    text = report_section(summary, metric, settings)
    (out / "report.md").write_text(text)
    _plot(out / "fid_vs_steps.png", summary, metric)
    return text


def report_section(summary: dict[str, Any], metric: str, settings: dict[str, Any]) -> str:
    """The Markdown of one metric: FID per evaluation, steps to quality, paired differences."""
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
    lines += quality_lines(summary, metric)
    return "\n".join(lines) + "\n"


QUALITY_NOTE = (
    "Steps to quality ({metric}): per seed, the step of the same seed's baseline's best value over its run"
    " -> the step at which the method first reached that value (`-`: never; `<=`: already at its first"
    " evaluation); speed-up = the first / the second, geometric mean over seeds [95 % t-interval on log"
    " factors] (`*`: includes never-reached seeds at their upper bound); faster/slower than the baseline"
    " with a two-sided sign test; more than 2x faster with a one-sided sign test."
)


def quality_lines(summary: dict[str, Any], metric: str) -> list[str]:
    """The steps-to-quality table: per seed, the speed-up's geometric mean and 95 % CI, sign tests."""
    rows = {m: v["quality"] for m, v in summary.items() if v.get("quality")}
    if not rows:
        return []
    lines = ["", QUALITY_NOTE.format(metric=metric), ""]
    lines.append("| method | per seed | speed-up [95 % CI] | faster/slower (p) | > 2x (one-sided p) |")
    lines.append("|---|---|---:|---:|---:|")
    for method, q in rows.items():
        per_seed = ", ".join(_fmt_seed_quality(r) for r in q["per_seed"].values())
        ci = f" [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]" if q["ci95"] else ""
        mean = f"{q['geomean']:.2f}x{ci}{'*' if q['censored'] else ''}" if q["geomean"] else "-"
        lines.append(f"| {method} | {per_seed} | {mean} | {q['faster']}/{q['slower']} (p={q['p_faster']:.3f})"
                     f" | {q['above_claim']}/{q['n']} (p={q['p_claim']:.3f}) |")  # fmt: skip
    return lines


def _fmt_seed_quality(r: dict[str, Any]) -> str:
    reached = "-" if r["steps"] is None else f"{'<=' if r['at_first_eval'] else ''}{r['steps']:.0f}"
    return f"{r['base_steps']:.0f} -> {reached}"


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
    parser.add_argument("--config", type=Path, nargs="+", help="the example's base config, then overlays")
    parser.add_argument("--methods", nargs="+", default=["none", "lsa"], help="'none' is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--metric", nargs="+", default=None, help="FID key(s) to compare (default: the first val/fid* key)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/speedup"))
    parser.add_argument(
        "--supersede", nargs="+", default=[], metavar="NAME", help="runs (method_seedK) to set aside"
    )
    parser.add_argument("--reason", default="", help="why --supersede replaces them (kept with the records)")
    parser.add_argument(
        "--method-config", nargs="+", default=[], metavar="NAME=PATH",
        help="a method run from an overlay (the run's seed set on its ImmiscibleCoupling)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.extra = extra
    pairs = [item.partition("=") for item in args.method_config]
    if any(not name or not sep or not path for name, sep, path in pairs):
        parser.error("--method-config takes NAME=PATH pairs, e.g. dataset=configs/dataset.yaml")
    args.method_config = {name: Path(path) for name, _, path in pairs}
    if not args.config:
        parser.error("--config is required")
    if "none" not in args.methods:
        parser.error("--methods must include the baseline 'none'")
    if args.supersede and not args.reason:
        parser.error("--supersede needs --reason")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes) every run, then writes ``curves.json``, ``report.md`` and the plots."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for moved in supersede(args.out, args.supersede, args.reason):
        print(f"superseded: {moved}")
    runs = [run_one(args, m, s) for s in args.seeds for m in args.methods]
    metrics = args.metric or [sorted(k for k in runs[0]["curve"][0] if k.startswith("val/fid"))[0]]
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("supersede", "reason")}
    summaries = {metric: summarize(runs, metric) for metric in metrics}
    record = {"settings": settings, "metric": metrics[0], "metrics": metrics, "runs": runs}
    record |= {"summary": summaries[metrics[0]], "summaries": summaries}
    (args.out / "curves.json").write_text(json.dumps(record, indent=2))
    text = "\n".join(report_section(summaries[m], m, settings) for m in metrics)
    (args.out / "report.md").write_text(text)
    for i, metric in enumerate(metrics):
        _plot(args.out / plot_name(metric, first=i == 0), summaries[metric], metric)
    print(text)
    return summaries[metrics[0]] if len(metrics) == 1 else summaries


def plot_name(metric: str, first: bool) -> str:
    """``fid_vs_steps.png`` for the first metric, ``fid_vs_steps_<last part of the key>.png`` for others."""
    return "fid_vs_steps.png" if first else f"fid_vs_steps_{metric.rsplit('_', 1)[-1]}.png"


if __name__ == "__main__":
    main()
