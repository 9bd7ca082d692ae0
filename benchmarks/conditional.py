"""Coupling within conditions vs one assignment over the batch: time and distance reduction.

For each batch size B and number of conditions C (labels drawn uniformly, so blocks are about
B / C items), couples the same data and noise twice with `couple()`: once over the whole batch
(one B x B assignment) and once within each condition (one n_c x n_c assignment per label). Reports
the cost-matrix and solver time of each (median over repeats), the wall time of the whole call (the
per-block loop's Python overhead included) and the mean-distance reduction each keeps. Data: items
of `--dim` values around C class means (what a class-conditional batch looks like). Writes JSON
and prints a table. Timed runs belong on an otherwise idle machine.

    python benchmarks/conditional.py --batches 256 512 1024 2048 --conditions 10 100 1000 --dim 256

With ``--pool-batches k ...`` it measures pools larger than a batch instead
(`CouplingCollate(pool_batches=k).couple_pool`, what a `PooledDataLoader`'s workers run): `k`
batches of `B` items coupled within conditions in one assignment, the time per pool and per
training step (the pool's / `k`), and the reduction the pool keeps.

    python benchmarks/conditional.py --batches 64 --conditions 100 --pool-batches 1 4 16 --dim 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lightning_immiscible.coupling import CouplingSpec
from lightning_immiscible.solvers import available_solvers
from lightning_immiscible.workers import CouplingCollate


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--conditions", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dim", type=int, default=256, help="item size D (256 = 4x8x8 latents)")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--pool-batches", type=int, nargs="+", default=None, help="measure pools of k")
    return parser


def batch(b: int, conditions: int, dim: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """`(x0, noise, labels)`: `b` items around `conditions` class means, their noise and labels."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(conditions, dim, generator=gen)
    labels = torch.randint(0, conditions, (b,), generator=gen)
    x0 = means[labels] + torch.randn(b, dim, generator=gen)
    return x0.to(device), torch.randn(b, dim, generator=gen).to(device), labels.to(device)


def measure(spec: CouplingSpec, b: int, conditions: int, args: argparse.Namespace) -> dict:
    """Median times (ms) and reductions (%) of one cell, for both couplings on the same batches."""
    runs: dict[str, list[tuple[float, float, float, float]]] = {"one": [], "within": []}
    for seed in range(args.repeats + 1):  # the first repeat warms the solver up and is dropped
        x0, noise, labels = batch(b, conditions, args.dim, seed, args.device)
        for name, condition in (("one", None), ("within", labels)):
            start = time.perf_counter()
            res = spec.couple(x0, noise, condition)
            wall = (time.perf_counter() - start) * 1e3
            if seed:
                runs[name].append((res.cost_ms, res.solve_ms, wall, res.reduction_pct))
    row: dict = {"batch": b, "conditions": conditions, "blocks_mean_size": b / conditions}
    for name, values in runs.items():
        for i, key in enumerate(("cost_ms", "solve_ms", "wall_ms", "reduction_pct")):
            row[f"{name}_{key}"] = statistics.median(v[i] for v in values)
    row["wall_ratio"] = row["within_wall_ms"] / row["one_wall_ms"] if row["one_wall_ms"] else float("nan")
    return row


def measure_pool(b: int, conditions: int, k: int, args: argparse.Namespace) -> dict:
    """Median time (ms) of one pool of `k` batches of `b` items coupled within conditions, its reduction."""
    collate = CouplingCollate("lsa", solver=args.solver, pool_batches=k)
    walls, reductions = [], []
    for seed in range(args.repeats + 1):  # the first repeat warms the solver up and is dropped
        x0, noise, labels = batch(b * k, conditions, args.dim, seed, args.device)
        start = time.perf_counter()
        results = collate.couple_pool(list(x0.split(b)), list(noise.split(b)), list(labels.split(b)))
        wall = (time.perf_counter() - start) * 1e3
        before = statistics.mean(r.cost_before for r in results)
        after = statistics.mean(r.cost_after for r in results)
        if seed:
            walls.append(wall)
            reductions.append(100 * (before - after) / before)
    pool_ms = statistics.median(walls)
    return {"batch": b, "conditions": conditions, "pool_batches": k, "pool_items": b * k,
            "blocks_mean_size": b * k / conditions, "pool_ms": pool_ms, "per_step_ms": pool_ms / k,
            "reduction_pct": statistics.median(reductions)}  # fmt: skip


def pool_table(args: argparse.Namespace) -> list[dict]:
    """Measures and prints the `--pool-batches` cells."""
    rows = []
    for b in args.batches:
        for conditions in args.conditions:
            for k in args.pool_batches:
                rows.append(measure_pool(b, conditions, k, args))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nD={args.dim}, device {args.device}, solver {args.solver}, median of {args.repeats}")
    print("{:>5} {:>5} {:>4} {:>6} {:>7} {:>9} {:>9} {:>8}".format("B", "C", "k", "items", "block", "pool ms",
                                                                    "step ms", "red. %"))  # fmt: skip
    for r in rows:
        print(
            f"{r['batch']:>5} {r['conditions']:>5} {r['pool_batches']:>4} {r['pool_items']:>6} "
            f"{r['blocks_mean_size']:>7.1f} {r['pool_ms']:>9.1f} {r['per_step_ms']:>9.2f} "
            f"{r['reduction_pct']:>8.2f}"
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.pool_batches:
        result = {"dim": args.dim, "device": args.device, "solver": args.solver, "rows": pool_table(args)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    spec = CouplingSpec("lsa", solver=args.solver)
    rows = []
    for b in args.batches:
        for conditions in args.conditions:
            rows.append(measure(spec, b, conditions, args))
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"dim": args.dim, "device": args.device, "solver": args.solver, "solvers": available_solvers()}
    result["rows"] = rows
    print(f"\nD={args.dim}, device {args.device}, solver {args.solver}, median of {args.repeats}")
    head = ("B", "C", "one ms", "within ms", "ratio", "red. one %", "red. within %")
    print("{:>5} {:>5} {:>9} {:>10} {:>6} {:>11} {:>14}".format(*head))
    for r in rows:
        print(
            f"{r['batch']:>5} {r['conditions']:>5} {r['one_wall_ms']:>9.1f} {r['within_wall_ms']:>10.1f} "
            f"{r['wall_ratio']:>6.2f} {r['one_reduction_pct']:>11.2f} {r['within_reduction_pct']:>14.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
