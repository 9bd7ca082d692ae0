"""Minibatch OT for flow matching: our coupling against torchcfm's exact OTPlanSampler, same batches.

For each data kind and batch size B, one batch of data ``x0`` and Gaussian noise is paired by
  ours      couple(x0, noise, method="lsa", metric="sqeuclidean"): an exact assignment (a permutation);
  torchcfm  OTPlanSampler(method="exact").get_map(x0, noise): POT's network simplex ``ot.emd`` on
            the squared-distance cost, a B x B plan (with uniform marginals an optimal vertex is a
            permutation matrix / B); then ``sample_plan`` as torchcfm's flow matcher calls it, which
            draws B pairs from the plan *with replacement*;
  scipy     linear_sum_assignment on the float64 squared-distance cost built here: the oracle.
Reported per case: both times (median of ``--repeats``), whether POT converged (it warns
"numItermax reached" and returns a non-optimal plan when its iteration limit, 100,000 by default,
is hit), whether the two plans are the same permutation, each plan's cost relative to the oracle,
and the share of distinct data items in torchcfm's sampled batch (about 1 - 1/e = 63 % with
replacement; always 100 % for ours). Needs ``pip install pot`` and torchcfm (``pip install
torchcfm``; ``--no-deps`` is enough: this module only imports torch, NumPy and POT from it).

Examples:
  python benchmarks/torchcfm_compare.py --quick
  python benchmarks/torchcfm_compare.py --out benchmarks/results/torchcfm_compare.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from example_projects.flow_matching.targets2d import eight_gaussians  # noqa: E402
from lightning_immiscible import couple  # noqa: E402


def make_batch(kind: str, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, noise)``: 8 Gaussians in 2-D, or smooth 3x32x32 images in [-1, 1] (D = 3072)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "2d":
        x0 = eight_gaussians(b, g)
    else:
        low = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1  # blocky images: correlated pixels
        x0 = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return x0, torch.randn(x0.shape, generator=g)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The last result and the median wall time in milliseconds."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def run_case(kind: str, b: int, args: argparse.Namespace) -> dict[str, Any]:
    from torchcfm.optimal_transport import OTPlanSampler

    x0, noise = make_batch(kind, b, args.seed)
    cost = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    optimum = float(cost[rows, cols].sum())
    ours, ours_ms = timed(lambda: couple(x0, noise, method="lsa", metric="sqeuclidean"), args.repeats)
    sampler = OTPlanSampler(method="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, map_ms = timed(lambda: sampler.get_map(x0, noise), args.repeats)
    converged = not any("numItermax" in str(w.message) for w in caught)
    (xs, _), sample_ms = timed(lambda: sampler.sample_plan(x0, noise), args.repeats)
    theirs = plan.argmax(axis=1)
    is_permutation = bool(np.allclose(plan.max(axis=1), 1.0 / b) and len(set(theirs.tolist())) == b)
    ours_index = ours.index.numpy()
    distinct = len({tuple(r) for r in xs.flatten(1).numpy().round(6).tolist()}) / b
    return {
        "data": kind,
        "B": b,
        "D": int(x0[0].numel()),
        "ours_ms": round(ours_ms, 3),
        "torchcfm_get_map_ms": round(map_ms, 3),
        "torchcfm_sample_plan_ms": round(sample_ms, 3),
        "pot_converged": converged,
        "torchcfm_plan_is_permutation": is_permutation,
        "same_plan": bool(is_permutation and np.array_equal(theirs, ours_index)),
        "ours_cost_vs_optimum": float(cost[np.arange(b), ours_index].sum()) / optimum,
        "torchcfm_cost_vs_optimum": float((plan * cost).sum() * b) / optimum,
        "torchcfm_distinct_data_in_batch": round(distinct, 3),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--data", nargs="+", choices=["2d", "images"], default=["2d", "images"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="B in {64, 256}, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return parser


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'data':6} {'B':>5} {'D':>5} {'ours ms':>9} {'tcfm map':>9} {'tcfm smpl':>9} {'POT ok':>6}"
    print(head + f" {'same plan':>9} {'ours/opt':>9} {'tcfm/opt':>9} {'distinct':>8}")
    for r in rows:
        print(
            f"{r['data']:6} {r['B']:5d} {r['D']:5d} {r['ours_ms']:9.1f} {r['torchcfm_get_map_ms']:9.1f} "
            f"{r['torchcfm_sample_plan_ms']:9.1f} {r['pot_converged']!s:>6} {r['same_plan']!s:>9} "
            f"{r['ours_cost_vs_optimum']:9.6f} {r['torchcfm_cost_vs_optimum']:9.6f} "
            f"{r['torchcfm_distinct_data_in_batch']:8.3f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [64, 256], 1
    import ot

    rows = [run_case(kind, b, args) for kind in args.data for b in args.sizes]
    result = {
        "rows": rows,
        "env": {"torch": torch.__version__, "pot": ot.__version__, "python": platform.python_version()},
    }
    print(json.dumps(result, indent=1))
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
