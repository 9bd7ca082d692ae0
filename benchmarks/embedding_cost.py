"""What an embedding condition costs: the condition weight search and the assignment of M + w C.

For each pool size B and condition width E, couples the same data (D values per item, whose mean
depends on the condition) and noise with `couple()` twice: without a condition (one assignment of
the data-noise cost M) and with the `(B, E)` embedding (`M + w C`, `w` by the candidate-pair rule,
[embedding][lightning_immiscible.embedding]). Then splits the embedding's extra work on the same
float64 M: the condition costs C (one Gram product), the weight search (`r(w)` counted once per
step of the doubling and the bisection: the count of evaluations is reported), the solve of
`M + w C` next to the solve of M alone, and the `condition_leak` diagnostic (an SVD of the `(B, E)`
centred conditions and two projections of the data and noise), which every call with an embedding
computes, whatever the method. Both calls use the exact solver `solver="auto"` picks for
(B, D) by its rule (named, so that no timing race runs). Median of `--repeats` after one warm-up;
on one thread (torch and the BLAS NumPy uses) unless `--threads` says otherwise. Prints a table,
writes JSON. Timed runs belong on an otherwise idle machine.

    python benchmarks/embedding_cost.py --json benchmarks/results/embedding_cost_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

THREADS = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), None)
if THREADS is None and "--threads" in sys.argv[:-1]:
    THREADS = sys.argv[sys.argv.index("--threads") + 1]
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before NumPy loads
    os.environ.setdefault(_name, THREADS or "1")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_immiscible import embedding  # noqa: E402
from lightning_immiscible.costs import cost_matrix  # noqa: E402
from lightning_immiscible.coupling import CouplingSpec  # noqa: E402
from lightning_immiscible.solvers import choose_exact_solver, solve  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 512], help="condition widths E")
    parser.add_argument("--dim", type=int, default=784, help="values per item D (784 = 28x28)")
    parser.add_argument("--metric", default="l2", help="the data-noise metric (the coupling's default)")
    parser.add_argument(
        "--condition-metrics",
        nargs="+",
        default=["sqeuclidean", "cosine"],
        choices=embedding.CONDITION_METRICS,
    )
    parser.add_argument("--share", type=float, default=0.2, help="candidate_share")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def batch(b: int, e: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x0, condition, noise)`: data whose mean is a linear map of a standard normal condition."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, e, generator=gen)
    lift = torch.randn(e, d, generator=gen) / e**0.5
    x0 = (0.5 * z @ lift + 0.5 * torch.randn(b, d, generator=gen)).clamp(-1, 1)
    return x0, z, torch.randn(b, d, generator=gen)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class Counted:
    """Counts the calls of `embedding.candidate_share` (each is one pass over the B x B entries)."""

    def __init__(self) -> None:
        self.calls, self.inner = 0, embedding.candidate_share

    def __call__(self, *args: object) -> float:
        self.calls += 1
        return self.inner(*args)


def measure(b: int, e: int, cmetric: str, args: argparse.Namespace) -> dict:
    """Median times (ms) of one cell: whole calls with and without the condition, and the parts."""
    solver = choose_exact_solver(b, args.dim)
    plain = CouplingSpec("lsa", args.metric, solver=solver)
    spec = CouplingSpec(
        "lsa", args.metric, solver=solver, candidate_share=args.share, condition_metric=cmetric
    )
    keys = (
        "plain_ms",
        "embedded_ms",
        "condition_cost_ms",
        "search_ms",
        "solve_weighted_ms",
        "solve_plain_ms",
        "leak_ms",
    )
    runs: dict[str, list[float]] = {k: [] for k in keys}
    evaluations, weights, shares = [], [], []
    for seed in range(args.repeats + 1):  # the first repeat warms up and is dropped
        x0, z, noise = batch(b, e, args.dim, seed)
        start = time.perf_counter()
        plain.couple(x0, noise)
        times = {"plain_ms": _ms(start)}
        start = time.perf_counter()
        res = spec.couple(x0, noise, z)
        times["embedded_ms"] = _ms(start)
        m = cost_matrix(x0, noise, args.metric).double().numpy()
        start = time.perf_counter()
        c = embedding.condition_costs(z.double().numpy(), cmetric)
        times["condition_cost_ms"] = _ms(start)
        counted = Counted()
        embedding.candidate_share = counted
        try:
            start = time.perf_counter()
            w, _ = embedding.search_weight(m, c, args.share)
            times["search_ms"] = _ms(start)
        finally:
            embedding.candidate_share = counted.inner
        start = time.perf_counter()
        solve(m + w * c, solver, dim=args.dim)
        times["solve_weighted_ms"] = _ms(start)
        start = time.perf_counter()
        solve(m, solver, dim=args.dim)
        times["solve_plain_ms"] = _ms(start)
        start = time.perf_counter()
        embedding.condition_leak(x0, z, res.noise)
        times["leak_ms"] = _ms(start)
        if seed:
            for k in keys:
                runs[k].append(times[k])
            evaluations.append(counted.calls)
            weights.append(res.condition_weight)
            shares.append(res.candidate_share)
    row: dict = {"B": b, "E": e, "condition_metric": cmetric, "solver": solver}
    row |= {k: statistics.median(v) for k, v in runs.items()}
    row["extra_ms"] = row["embedded_ms"] - row["plain_ms"]
    row["evaluations"] = statistics.median(evaluations)
    row["weight"], row["share"] = statistics.median(weights), statistics.median(shares)
    return row


def render(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| B | E | condition metric | solver | couple() plain ms | with condition ms | C ms | search ms "
        "(r(w) evaluations) | solve M + wC ms | solve M ms | leak ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['E']} | {r['condition_metric']} | {r['solver']} | {r['plain_ms']:.1f} | "
            f"{r['embedded_ms']:.1f} | {r['condition_cost_ms']:.1f} | {r['search_ms']:.1f} "
            f"({r['evaluations']:.0f}) | {r['solve_weighted_ms']:.1f} | {r['solve_plain_ms']:.1f} | "
            f"{r['leak_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for b in args.batches:
        for e in args.widths:
            for cmetric in args.condition_metrics:
                rows.append(measure(b, e, cmetric, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "dim": args.dim, "metric": args.metric, "candidate_share": args.share, "repeats": args.repeats,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "numpy": np.__version__, "rows": rows,
    }  # fmt: skip
    print(f"\nD={args.dim}, metric {args.metric}, {args.threads} thread(s), median of {args.repeats}")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
