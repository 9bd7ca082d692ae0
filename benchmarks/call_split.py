"""Where one `couple()` call's time goes: the distance GEMM, the solver, and everything else.

Run through `python benchmarks/assignment.py --split` (see docs/performance.md, "Where a couple()
call's time goes"). Per batch size B (default 512, 1024, 1536) and D = 3,072 (natural-image-like
data against Gaussian noise, as in the main table), three things are timed on the same tensors,
interleaved round-robin (so that a load change hits the parts of one round alike), `--repeats`
rounds after a warm-up; medians over the rounds are reported:

- `call`: `couple(x0, noise, solver=name)` with every other argument at its default (L2, the
  NaN/Inf check on), `name` being the exact solver the fixed rule picks for the shape;
- `gemm`: the bare `x @ noise.T` matmul of the flattened float32 tensors (the cross term of the
  cost, the one part no implementation of the L2 coupling can skip);
- `solver`: the registered solver's function alone on the same float64 cost.

`rest = call - gemm - solver` (per round, then its median and the median of its share of the call)
is everything else: the checks, the squared norms and the rest of
the cost matrix, the float64 copy handed to the solver, the gather of the paired noise and the
before/after distances. The budget: `rest <= 10 %` of the call at B >= 1024.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from lightning_immiscible.costs import cost_matrix
from lightning_immiscible.coupling import couple
from lightning_immiscible.solvers import SOLVERS, choose_exact_solver

#: The documented ceiling of `rest / call` at B >= BUDGET_FROM.
REST_BUDGET = 0.10
BUDGET_FROM = 1024


def _ms(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def split_case(x0: torch.Tensor, noise: torch.Tensor, repeats: int) -> dict[str, Any]:
    """One (B, D): median ms of the call, the GEMM, the solver and the rest, and the rest's share."""
    b, d = x0.shape[0], x0[0].numel()
    name = choose_exact_solver(b, d)
    xf, nf = x0.reshape(b, -1).float().contiguous(), noise.reshape(b, -1).float().contiguous()
    cost = cost_matrix(x0, noise).double().numpy()
    parts: dict[str, Any] = {
        "call": lambda: couple(x0, noise, solver=name),
        "gemm": lambda: xf @ nf.T,
        "solver": lambda: SOLVERS[name].fn(cost),
    }
    for fn in parts.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in parts}
    in_call: list[tuple[float, float]] = []
    for _ in range(repeats):
        for key, fn in parts.items():
            if key == "call":
                start = time.perf_counter()
                res = fn()
                times[key].append((time.perf_counter() - start) * 1e3)
                in_call.append((res.cost_ms, res.solve_ms))
            else:
                times[key].append(_ms(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    rests = [c - g - s for c, g, s in zip(times["call"], times["gemm"], times["solver"], strict=True)]
    return {
        "B": b,
        "D": d,
        "solver": name,
        "call_ms": med["call"],
        "gemm_ms": med["gemm"],
        "solver_ms": med["solver"],
        "rest_ms": statistics.median(rests),
        "rest_share": statistics.median(r / c for r, c in zip(rests, times["call"], strict=True)),
        "in_call_cost_ms": statistics.median(c for c, _ in in_call),
        "in_call_solve_ms": statistics.median(s for _, s in in_call),
        "repeats": repeats,
    }


def run(sizes: list[int], dim: int, repeats: int, images: Any) -> dict[str, Any]:
    """`split_case` for each B at `dim`; `images(b, d, gen)` draws the data."""
    rows = []
    for b in sizes:
        gen = torch.Generator().manual_seed(1000 * b + dim)
        x0 = images(b, dim, gen)
        noise = torch.randn(x0.shape, generator=gen)
        rows.append(split_case(x0, noise, repeats))
        print(split_line(rows[-1]), flush=True)
    checks = [budget_line(r) for r in rows if r["B"] >= BUDGET_FROM]
    return {"split": rows, "split_checks": checks}


def split_line(r: dict[str, Any]) -> str:
    return (
        f"  B={r['B']:5d} D={r['D']:5d} call {r['call_ms']:7.1f} ms = GEMM {r['gemm_ms']:6.1f} + "
        f"{r['solver']} {r['solver_ms']:6.1f} + rest {r['rest_ms']:5.1f} ({100 * r['rest_share']:.1f} %)"
    )


def budget_line(r: dict[str, Any]) -> str:
    ok = r["rest_share"] <= REST_BUDGET
    return (
        f"B={r['B']} D={r['D']}: rest {r['rest_ms']:.1f} ms = {100 * r['rest_share']:.1f} % of the "
        f"{r['call_ms']:.1f} ms call (budget <= {100 * REST_BUDGET:.0f} %: {'met' if ok else 'MISSED'})"
    )


def render_split(out: dict[str, Any]) -> str:
    """The split as a Markdown table plus the budget lines."""
    lines = [
        "| B | D | solver | call ms | GEMM ms | solver ms | rest ms | rest share |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["split"]:
        cells = [r["B"], r["D"], r["solver"], *(f"{r[k]:.1f}" for k in ("call_ms", "gemm_ms", "solver_ms"))]
        cells += [f"{r['rest_ms']:.1f}", f"{100 * r['rest_share']:.1f} %"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", *[f"- {c}" for c in out.get("split_checks", [])]]
    return "\n".join(lines)
