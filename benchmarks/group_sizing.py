"""Cost model for choosing the coupling scope at a given world size (docs/multi-node.md).

For a per-rank batch b and world sizes W, prints the per-step assignment time of one coupling group
of g ranks (pool g*b: this rank's cost rows + the pool's exact solve, measured here) and the bytes
each rank sends per step (header + its padded cost rows + statistics), as a table and JSON.

    python benchmarks/group_sizing.py --batch 128 --dim 3072 --pools 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from lightning_immiscible.coupling import CouplingSpec
from lightning_immiscible.protocol import HEADER_SIZE
from lightning_immiscible.sizing import time_assignment
from lightning_immiscible.solvers import available_solvers, resolve_solver


def bytes_per_rank(pool: int, batch: int) -> int:
    """What one rank sends per step in a group pooling ``pool`` items (uniform batches)."""
    return HEADER_SIZE * 8 + batch * pool * 4 + 3 * 8


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch b")
    parser.add_argument("--dim", type=int, default=3072, help="item size D (3072 = 3x32x32)")
    parser.add_argument("--pools", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--solvers", nargs="+", default=None, help="default: auto and scipy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scipy-max", type=int, default=4096, help="largest pool timed with scipy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    solvers = args.solvers or sorted({resolve_solver("auto").name, "scipy"})
    rows = []
    for pool in args.pools:
        for solver in solvers:
            if solver == "scipy" and pool > args.scipy_max:
                continue
            times = [
                time_assignment(
                    pool, (args.dim,), args.batch, CouplingSpec(solver=solver), device=args.device, seed=s
                )
                for s in range(args.repeats)
            ]
            rows.append(
                {
                    "pool": pool,
                    "ranks_per_group": pool // args.batch,
                    "solver": solver,
                    "assign_ms": statistics.median(times),
                    "mib_sent_per_rank": bytes_per_rank(pool, args.batch) / 2**20,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "batch": args.batch,
        "dim": args.dim,
        "device": args.device,
        "solvers": available_solvers(),
        "rows": rows,
    }
    print(f"\nper-rank batch {args.batch}, D={args.dim}, device {args.device}")
    print(f"{'pool':>6} {'ranks/group':>11} {'solver':>8} {'assign ms':>10} {'MiB sent/rank':>14}")
    for r in rows:
        print(
            f"{r['pool']:>6} {r['ranks_per_group']:>11} {r['solver']:>8} {r['assign_ms']:>10.1f} "
            f"{r['mib_sent_per_rank']:>14.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
