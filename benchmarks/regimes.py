"""Where does noise-data coupling change training? A resumable, paired sweep over regimes.

Trains small time-conditioned MLPs with flow matching and DDPM epsilon-prediction on data of growing
dimension (2-D 8 Gaussians, 8x8 digits, MNIST-5k at 14x14 and 28x28), with arms that differ only in
how each block's noise pool is paired with its data: `none`, exact assignment (`lsa`, with `l2` or
`sqeuclidean`) over pools of 64, 256 or 1024 items, `knn` (k=4), and a norm-matched control. Every arm
of a seed shares initial weights, data order, noise pool, training times and evaluation noise.

Each finished (dataset, arm, seed) is one JSON file under `OUT/records/`; a rerun skips those, so the
sweep resumes across sessions, and `--max-minutes` stops it cleanly between units. `--plan` prints the
units and an estimate timed on this machine; `--report` only (re)writes the report from the records.

```bash
python benchmarks/regimes.py --plan --workers 2                # the units and the estimated time
python benchmarks/regimes.py --workers 2 --max-minutes 125     # run (or resume) the pre-registered sweep
python benchmarks/regimes.py --report                          # rewrite the report from what has finished
```
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from regimes_report import write_report
from regimes_train import DIMS, Arm, Settings, couple_block, draw_block, stream
from regimes_unit import STREAMS, dataset_context, run_unit

ARMS = (
    "none",
    "lsa-l2-p64",
    "lsa-l2-p256",
    "lsa-l2-p1024",
    "lsa-sq-p64",
    "lsa-sq-p256",
    "lsa-sq-p1024",
    "knn4",
    "normctrl",
)
DATASETS = ("2d", "digits64", "mnist14", "mnist28")
# Per dataset: steps, MLP width, evaluation sample size and solver (2-D costs are near-degenerate and
# SciPy is the fastest exact solver on them today). Sized so the whole sweep fits ~2 h on 2 quiet cores.
PRESET: dict[str, dict[str, Any]] = {
    "2d": {"steps": 1000, "width": 128, "eval_samples": 512, "solver": "scipy"},
    "digits64": {"steps": 1000, "width": 256, "eval_samples": 1000, "solver": "auto"},
    "mnist14": {"steps": 1000, "width": 256, "eval_samples": 1000, "solver": "auto"},
    "mnist28": {"steps": 1000, "width": 256, "eval_samples": 1000, "solver": "auto"},
}
SEEDS = 6  # the smallest two-sided sign-test p with 6 seeds is 1/32 (with 5 it is 1/16)


def settings_for(dataset: str, args: argparse.Namespace) -> Settings:
    """The preset for `dataset` with any command-line overrides; evaluations at 1/4, 1/2 and all steps."""
    preset = dict(PRESET[dataset])
    for key in ("steps", "width", "eval_samples", "batch", "block"):
        if getattr(args, key, None) is not None:
            preset[key] = getattr(args, key)
    steps = preset["steps"]
    eval_at = tuple(sorted({max(1, steps // 4), max(1, steps // 2), steps}))
    return Settings(dataset=dataset, eval_at=eval_at, objectives=tuple(args.objectives), **preset)


def units(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(dataset, arm, seed) in run order: seed-major, so a partial sweep holds whole paired seeds.

    With `--shard i/n` only every n-th unit from the i-th on (a worker's share).
    """
    todo = [(d, a, s) for s in range(args.seeds) for d in args.datasets for a in args.arms]
    index, count = args.shard
    return todo[index::count]


def run_workers(args: argparse.Namespace, argv: list[str]) -> None:
    """Runs `--workers` single-threaded copies of this script on disjoint shards and waits for all.

    Small models train several times faster on one thread each than on threads that share cores.
    """
    shard = ["--workers=1", f"--shard={{}}/{args.workers}"]  # argparse keeps the last value given
    procs = [
        subprocess.Popen([sys.executable, __file__, *argv, shard[0], shard[1].format(i)])
        for i in range(args.workers)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); rerun the same command to resume")


def record_path(out: Path, dataset: str, arm: str, seed: int) -> Path:
    return out / "records" / dataset / arm / f"seed{seed}.json"


def _check_settings(path: Path, settings: Settings) -> None:
    saved = json.loads(path.read_text())["settings"]
    if saved != json.loads(json.dumps(asdict(settings))):
        raise SystemExit(
            f"{path} was made with other settings than this command's: use the same options to resume, "
            "or another --out for a different sweep."
        )


def run_sweep(args: argparse.Namespace) -> list[Path]:
    """Runs every unfinished unit in order; stops before a unit that would overrun `--max-minutes`."""
    out, start, contexts = Path(args.out), time.perf_counter(), {}
    seconds: dict[tuple[str, str], float] = {}
    done: list[Path] = []
    for dataset, arm, seed in units(args):
        settings, path = settings_for(dataset, args), record_path(out, dataset, arm, seed)
        if path.exists():
            _check_settings(path, settings)
            seconds[(dataset, arm)] = json.loads(path.read_text())["seconds"]
            done.append(path)
            continue
        elapsed = time.perf_counter() - start
        if (
            args.max_minutes is not None
            and elapsed + seconds.get((dataset, arm), 0.0) > 60 * args.max_minutes
        ):
            print(f"stopping before {dataset}/{arm}/seed{seed}: --max-minutes {args.max_minutes} reached")
            break
        if dataset not in contexts:
            contexts[dataset] = dataset_context(dataset, settings.eval_samples, out / "cache")
        record = run_unit(contexts[dataset], settings, Arm.parse(arm), seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)  # a unit is either finished on disk or absent: resume never reads half a record
        seconds[(dataset, arm)] = record["seconds"]
        done.append(path)
        print(f"{dataset}/{arm}/seed{seed}: {record['seconds']:.1f} s", flush=True)
    return done


def _time_unit_parts(dataset: str, args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds per optimizer step (all objectives), per evaluation, and per coupled block of each arm.

    CPU time of this single-threaded process, not wall time: on a shared machine the wall time
    counts the other jobs too, while the CPU time is about what the same work takes on an idle core.
    """
    settings = settings_for(dataset, args)
    ctx = dataset_context(dataset, settings.eval_samples, Path(args.out) / "cache")
    probe = replace(
        settings, steps=settings.block // settings.batch, eval_at=(settings.block // settings.batch,)
    )
    cpu = time.process_time()
    rec = run_unit(ctx, probe, Arm.parse("none"), 0)
    busy = (time.process_time() - cpu) / rec["seconds"]  # the share of the wall time we had a core
    parts = {"step": busy * rec["timing"]["train_s"] / probe.steps, "eval": busy * rec["timing"]["eval_s"]}
    gens = {name: stream(dataset, 0, name) for name in STREAMS}
    block = draw_block(ctx.data, gens, settings.block)
    for arm in args.arms:
        cpu = time.process_time()
        couple_block(Arm.parse(arm), block, ctx.data, gens, settings.solver)
        parts[arm] = time.process_time() - cpu
    return parts


def plan(args: argparse.Namespace) -> float:
    """Prints the units per dataset and the time they are expected to take here; returns seconds."""
    total = 0.0
    print(f"arms: {', '.join(args.arms)}\nseeds: {args.seeds}   objectives: {', '.join(args.objectives)}")
    for dataset in args.datasets:
        s, parts = settings_for(dataset, args), _time_unit_parts(dataset, args)
        blocks = -(-s.steps // (s.block // s.batch))
        per_arm = {
            arm: s.steps * parts["step"] + blocks * parts[arm] + len(s.eval_at) * parts["eval"]
            for arm in args.arms
        }
        total += args.seeds * sum(per_arm.values())
        print(
            f"\n{dataset} (D={DIMS[dataset]}): {s.steps} steps x batch {s.batch}, blocks of "
            f"{s.block}, width {s.width}, evals at {list(s.eval_at)}, {s.eval_samples} samples, "
            f"solver {s.solver}"
        )
        print(f"  per step {parts['step'] * 1e3:.1f} ms, per evaluation {parts['eval']:.1f} s")
        for arm, sec in per_arm.items():
            print(
                f"  {arm:>13}: coupling {parts[arm] * 1e3:8.1f} ms/block, "
                f"unit ~{sec:6.1f} s x {args.seeds} seeds"
            )
    print(
        f"\n{len(units(args))} units: ~{total / 60:.0f} min of CPU on one core, so ~{total / 60:.0f} min "
        f"in one process on an idle machine, ~{total / 60 / max(1, args.workers):.0f} min with --workers "
        f"{max(1, args.workers)} on as many idle cores (not counted: the one-off classifier training)"
    )
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", default="benchmarks/results/regimes", help="records, cache, report")
    p.add_argument("--plan", action="store_true", help="print the units and a timed estimate; run nothing")
    p.add_argument("--report", action="store_true", help="only write the report from finished records")
    p.add_argument("--max-minutes", type=float, default=None, help="start no unit that would end after this")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--seeds", type=int, default=SEEDS, help="paired seeds 0..N-1")
    p.add_argument("--objectives", nargs="+", default=["fm", "ddpm"], choices=["fm", "ddpm"])
    for key in ("steps", "width", "eval_samples", "batch", "block"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="override the preset")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=1, help="parallel single-threaded worker processes")
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shard = tuple(int(v) for v in args.shard.split("/"))
    if args.arms[0] != "none":
        p.error("--arms must start with none: every effect is an arm minus the none arm of the same seed")
    for arm in args.arms:
        Arm.parse(arm)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | float:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plan:
        return plan(args)
    if args.workers > 1 and not args.report:
        run_workers(args, argv)
    elif not args.report:
        run_sweep(args)
    if args.shard[1] > 1:  # a worker: the parent writes the report once all shards are done
        return {}
    return write_report(Path(args.out), args)


if __name__ == "__main__":
    main()
