"""Assignment speed: our couple() against the reference implementations, side by side in one run.

Compares, per batch size B and data dimension D, on natural-image-like data (1/f random fields)
against Gaussian noise:
  paper      the published approach re-implemented from its description: fp16 broadcast
             difference [B, B, D] + vector_norm, scipy linear_sum_assignment on float64
             (only where B*B*D*2 bytes fits --paper-mem-gb);
  cdist      the community port: fp32 torch.cdist + scipy on the raw cost;
  torchcfm   OTPlanSampler(method="exact") if torchcfm is installed;
  ours:*     couple(method="lsa", solver=...) for every registered solver, and knn (k=4).
Reports cost-matrix, solver and total time (median after warm-up), peak memory (CPU: sampled RSS
increase; CUDA: max_memory_allocated), the distance reduction and the share of the exact optimum's
reduction each one achieves, plus the time ratio against `cdist`. Prints a table, writes JSON.

With `--families`, instead: every registered solver on the same cost of each data family (2-D
points, digits, MNIST, latents, images) at B = 128..2048, with the exact optimum checked and the
solver `solver="auto"` picks (benchmarks/solver_families.py).

With `--split`, instead: one `couple()` call split into the distance GEMM, the solver and
everything else, at B = 512, 1024, 1536 and D = 3072 (benchmarks/call_split.py).

`ours:auto` is `couple(x0, noise)` with every argument at its default (the NaN/Inf check on,
`solver="auto"` after its per-process race, which is run before the timing): the call a plain
user makes, and the one the check lines compare with `cdist` (the community port).

Examples:
  python benchmarks/assignment.py --quick
  python benchmarks/assignment.py --split --out benchmarks/results/call_split_cpu.json
  python benchmarks/assignment.py --sizes 1024 1536 --dims 3072 --only cdist ours:auto --no-step-time
  python benchmarks/assignment.py --families --quick
  python benchmarks/assignment.py --families --threads 1 --out benchmarks/results/solver_families_cpu.json
  python benchmarks/assignment.py --out benchmarks/results/assignment_cpu.json
  python benchmarks/assignment.py --device cuda --out gpu/assignment_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The package imports Lightning only with its Lightning adapters: this script needs torch, NumPy and
# SciPy alone, so it also runs on a GPU machine without Lightning.
from lightning_immiscible.coupling import couple  # noqa: E402
from lightning_immiscible.process_race import AUTO_RACE  # noqa: E402
from lightning_immiscible.solver_race import RACE_ROUNDS, RACE_WARMUP  # noqa: E402
from lightning_immiscible.solvers import SOLVERS, available_solvers, choose_exact_solver  # noqa: E402
from lightning_immiscible.workers import CouplingCollate, split_coupled_batch  # noqa: E402

SHAPES = {3072: (3, 32, 32), 4096: (4, 32, 32), 12288: (3, 64, 64)}


def natural_images(b: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(b, *SHAPES[d]) 1/f random fields: images in [-1, 1] (D=3072/12288), unit-std latents (4096)."""
    c, h, w = SHAPES.get(d, (1, 1, d))
    fy, fx = torch.fft.fftfreq(h), torch.fft.fftfreq(w)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt().clamp_min(1.0 / max(h, w))
    z = torch.complex(torch.randn(b, c, h, w, generator=gen), torch.randn(b, c, h, w, generator=gen))
    field = torch.fft.ifft2(z / radius).real
    field = field / field.flatten(1).std(1).view(-1, 1, 1, 1)
    if c == 4:  # latents: unit std, unclipped, per-channel offsets like SD-VAE latents
        return field + 0.3 * torch.randn(b, c, 1, 1, generator=gen)
    shift = 0.4 * torch.rand(b, 1, 1, 1, generator=gen) - 0.2
    return (0.5 * field + shift).clamp(-1.0, 1.0)


class PeakMemory:
    """Peak memory increase of a block: CUDA max_memory_allocated, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, (self._rss() - base) / 2**20)
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _scipy(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    col = np.empty(len(rows), dtype=np.int64)
    col[rows] = cols
    return col


def paper_impl(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """Published approach: fp16 [B, B, D] difference, vector_norm, scipy on float64."""
    start = time.perf_counter()
    x, n = x0.flatten(1).half(), noise.flatten(1).half()
    dist = torch.linalg.vector_norm(x[:, None, :] - n[None, :, :], dim=2)
    cost = dist.float().cpu().numpy().astype(np.float64)
    mid = time.perf_counter()
    return _scipy(cost), (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3


def cdist_impl(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """Community port: fp32 torch.cdist + scipy on the raw cost."""
    start = time.perf_counter()
    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).cpu().numpy()
    mid = time.perf_counter()
    return _scipy(cost), (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3


def torchcfm_impl(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """torchcfm's exact OT plan (POT emd); the map's row argmax as the assignment."""
    from torchcfm.optimal_transport import OTPlanSampler

    start = time.perf_counter()
    plan = OTPlanSampler(method="exact").get_map(x0, noise)
    return np.asarray(plan).argmax(1).astype(np.int64), 0.0, (time.perf_counter() - start) * 1e3


def ours_impl(solver: str, method: str = "lsa") -> Callable[..., tuple[np.ndarray, float, float]]:
    def run(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
        if method == "knn":
            noise = torch.stack([noise, noise.roll(1, 0), noise.roll(2, 0), noise.roll(3, 0)], 1)
        res = couple(x0, noise, method=method, solver=solver)
        return res.index.cpu().numpy(), res.cost_ms, res.solve_ms

    return run


def ours_default(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """`couple(x0, noise)` as a plain user calls it: every argument at its default."""
    res = couple(x0, noise)
    return res.index.cpu().numpy(), res.cost_ms, res.solve_ms


def finish_auto_race(x0: torch.Tensor, noise: torch.Tensor) -> str:
    """Runs `solver="auto"`'s per-process race for this shape (so that the timed calls are the
    steady state a training loop sees) and returns the solver it decided on."""
    AUTO_RACE.reset()  # as in a fresh process: earlier shapes do not spend this one's race batches
    for _ in range(RACE_WARMUP + RACE_ROUNDS):
        couple(x0, noise)
    b, d = x0.shape[0], x0[0].numel()
    return AUTO_RACE.decided.get((b, d, "l2"), choose_exact_solver(b, d))


def _call(fn: Callable, x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, tuple[float, ...]]:
    _sync(x0.device)
    start = time.perf_counter()
    col, cost_ms, solve_ms = fn(x0, noise)
    _sync(x0.device)
    return col, (cost_ms, solve_ms, (time.perf_counter() - start) * 1e3)


def timed_round_robin(
    impls: dict[str, Callable], x0: torch.Tensor, noise: torch.Tensor, repeats: int
) -> dict:
    """Warm-up each implementation, then time them interleaved (round-robin), `repeats` rounds.

    Interleaving spreads load changes of a shared machine evenly over the implementations, so
    their ratios stay meaningful. Peak memory is measured on the warm-up call only: the CPU RSS
    sampler is a thread that would otherwise steal a core from the timed calls.
    """
    cols, peaks, failed = {}, {}, {}
    for name, fn in list(impls.items()):
        try:
            with PeakMemory(x0.device) as mem:
                cols[name] = fn(x0, noise)[0]
            peaks[name] = mem.peak_mb
        except (RuntimeError, MemoryError, ValueError) as err:  # e.g. CUDA OOM: record, go on
            failed[name] = f"failed: {type(err).__name__}: {str(err)[:120]}"
            print(f"  {name}: {failed[name]}", flush=True)
            impls = {k: v for k, v in impls.items() if k != name}
            if x0.device.type == "cuda":
                torch.cuda.empty_cache()
    rows = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            cols[name], times = _call(fn, x0, noise)
            rows[name].append(times)
    out: dict[str, Any] = {name: {"skipped": why} for name, why in failed.items()}
    for name in impls:
        med = [statistics.median(r[j] for r in rows[name]) for j in range(3)]
        out[name] = {"cost_ms": med[0], "solve_ms": med[1], "total_ms": med[2], "peak_mb": peaks[name],
                     "col": cols[name]}  # fmt: skip
    return out


def implementations(device: torch.device) -> dict[str, Callable]:
    impls: dict[str, Callable] = {"paper": paper_impl, "cdist": cdist_impl}
    try:
        import torchcfm  # noqa: F401

        impls["torchcfm"] = torchcfm_impl
    except ImportError:
        pass
    impls["ours:auto"] = ours_default
    for name in available_solvers():
        impls[f"ours:{name}"] = ours_impl(name)
    impls["ours:knn4"] = ours_impl("auto", "knn")
    return impls


def evaluate(x0: torch.Tensor, noise: torch.Tensor, col: np.ndarray, knn: bool) -> float:
    """Mean L2 distance of the returned pairs, in float64."""
    x = x0.flatten(1).double().cpu()
    if knn:
        cands = torch.stack([noise, noise.roll(1, 0), noise.roll(2, 0), noise.roll(3, 0)], 1)
        paired = cands.flatten(2).double().cpu()[torch.arange(len(col)), torch.from_numpy(col)]
    else:
        paired = noise.flatten(1).double().cpu()[torch.from_numpy(col)]
    return float((x - paired).norm(dim=1).mean())


def run_case(b: int, d: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1000 * b + d)
    x0 = natural_images(b, d, gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    before = evaluate(x0, noise, np.arange(b), knn=False)
    results, todo = [], {}
    for name, fn in implementations(device).items():
        if args.only and not any(s in name for s in args.only):
            continue
        if name == "paper" and b * b * d * 2 / 2**30 > args.paper_mem_gb:
            print(f"skipped paper at B={b} D={d}: needs {b * b * d * 2 / 2**30:.1f} GB", flush=True)
            results.append({"impl": name, "B": b, "D": d, "skipped": "broadcast exceeds --paper-mem-gb"})
        elif name == "cdist" and b > args.max_scipy_raw:
            results.append({"impl": name, "B": b, "D": d, "skipped": "B > --max-scipy-raw"})
        else:
            todo[name] = fn
    repeats = args.repeats if b < 2048 else max(1, args.repeats - 1)
    if "ours:auto" in todo:
        print(f"  B={b:5d} D={d:5d} ours:auto raced: uses {finish_auto_race(x0, noise)}", flush=True)
    for name, row in timed_round_robin(todo, x0, noise, repeats).items():
        if "skipped" in row:
            results.append({"impl": name, "B": b, "D": d, **row})
            continue
        after = evaluate(x0, noise, row.pop("col"), knn=name.endswith("knn4"))
        results.append({"impl": name, "B": b, "D": d, "before": before, "after": after, **row})
        print(f"  B={b:5d} D={d:5d} {name:12s} total {row['total_ms']:9.1f} ms", flush=True)
    return _annotate(results, before)


def _annotate(results: list[dict[str, Any]], before: float) -> list[dict[str, Any]]:
    """Adds the reduction, the share of the exact reduction, the gap and the ratio vs `cdist`."""
    names = {"cdist", *(f"ours:{n}" for n, s in SOLVERS.items() if s.exact)}
    exact = [r["after"] for r in results if "after" in r and r["impl"] in names]
    optimum = min(exact) if exact else min(r["after"] for r in results if "after" in r)
    ref = next((r for r in results if r["impl"] == "cdist" and "total_ms" in r), None)
    for r in results:
        if "after" not in r:
            continue
        r["reduction_pct"] = 100 * (before - r["after"]) / before
        r["share_of_exact_pct"] = 100 * (before - r["after"]) / (before - optimum)
        r["rel_gap"] = (r["after"] - optimum) / optimum
        if ref is not None:
            r["ratio_vs_cdist"] = r["total_ms"] / ref["total_ms"]
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'B':>5} {'D':>6} {'impl':12} {'cost ms':>9} {'solve ms':>9} {'total ms':>9} {'x cdist':>8}"
    print(head + f" {'peak MB':>8} {'reduct %':>8} {'of exact':>8} {'rel gap':>9}")
    for r in results:
        if "skipped" in r:
            print(f"{r['B']:5d} {r['D']:6d} {r['impl']:12} skipped: {r['skipped']}")
            continue
        ratio = f"{r['ratio_vs_cdist']:8.3f}" if "ratio_vs_cdist" in r else f"{'-':>8}"
        print(
            f"{r['B']:5d} {r['D']:6d} {r['impl']:12} {r['cost_ms']:9.1f} {r['solve_ms']:9.1f} "
            f"{r['total_ms']:9.1f} {ratio} {r['peak_mb']:8.0f} {r['reduction_pct']:8.3f} "
            f"{r['share_of_exact_pct']:7.1f}% {r['rel_gap']:9.1e}"
        )


def _first(batch: list[torch.Tensor]) -> torch.Tensor:
    return batch[0]


def _denoiser(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU()]
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(width, 3, 3, padding=1))


def _train_loop(loader: Any, device: torch.device, mode: str, steps: int) -> dict[str, float]:
    """Per training step of a conv denoiser (means over `steps` after 2 warm-up steps), in ms.

    Returns `step_ms` (wall), `wait_ms` (blocked on the DataLoader), `work_ms` (step_ms - wait_ms:
    what the training loop itself spends) and `cpu_ms` (CPU time of the main process).
    """
    gen = torch.Generator(device).manual_seed(0)
    # CPU: a tiny net (this machine has 2 cores); CUDA: about 100 ms/step at B=1024 on an H100.
    net = _denoiser(16, 2) if device.type == "cpu" else _denoiser(192, 6)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    it, start, cpu, wait = iter(loader), 0.0, 0.0, 0.0
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            start, cpu, wait = time.perf_counter(), time.process_time(), 0.0
        fetch = time.perf_counter()
        inner, noise = split_coupled_batch(next(it))
        wait += time.perf_counter() - fetch
        x0 = (inner[0] if isinstance(inner, list | tuple) else inner).to(device, non_blocking=True)
        if noise is None:
            noise = torch.randn(x0.shape, generator=gen, device=device)
            if mode == "in-step":
                noise = couple(x0, noise, method="lsa").noise
        loss = torch.nn.functional.mse_loss(net(0.7 * x0 + 0.7 * noise.to(device)), noise.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    ms = {"step_ms": wall, "wait_ms": wait, "work_ms": wall - wait, "cpu_ms": cpu}
    return {k: v * 1e3 / steps for k, v in ms.items()}


def step_time_section(device: torch.device, b: int = 1024, steps: int = 12) -> dict[str, Any]:
    """Training-step time without coupling, with coupling in the step, and in DataLoader workers."""
    import os

    from torch.utils.data import DataLoader, TensorDataset

    workers = 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
    data = TensorDataset(natural_images(b * (steps + 2), 3072, torch.Generator().manual_seed(7)))
    out = {}
    for mode in ("none", "in-step", "workers"):
        collate = CouplingCollate("lsa", seed=0, data_fn=_first) if mode == "workers" else None
        loader = DataLoader(data, batch_size=b, num_workers=workers, collate_fn=collate, prefetch_factor=2,
                            pin_memory=device.type == "cuda")  # fmt: skip
        out[mode] = _train_loop(loader, device, mode, steps)
        print(
            f"  B={b} D=3072 coupling {mode:8s}: " + ", ".join(f"{k} {v:7.1f}" for k, v in out[mode].items())
        )
    out["num_workers"] = workers
    return out


def render_markdown(out: dict[str, Any]) -> str:
    """A saved run as Markdown tables (one per D), the target checks and the step times."""
    lines = [f"Device: {out['device']} ({out['card']}), torch {out['torch']}, {out['threads']} threads.", ""]
    for d in sorted({r["D"] for r in out["results"]}):
        lines += [f"**D = {d}** (times: median ms; x cdist = total / total of cdist+scipy)", ""]
        head = [
            "B",
            "impl",
            "cost ms",
            "solve ms",
            "total ms",
            "x cdist",
            "peak MB",
            "reduction %",
            "of exact",
        ]
        lines += ["| " + " | ".join([*head, "rel gap"]) + " |", "|---:|---|" + "---:|" * 8]
        for r in (r for r in out["results"] if r["D"] == d):
            if "skipped" in r:
                lines.append(f"| {r['B']} | {r['impl']} | skipped: {r['skipped']} |||||||")
                continue
            cells = [r["B"], r["impl"], f"{r['cost_ms']:.1f}", f"{r['solve_ms']:.1f}", f"{r['total_ms']:.1f}"]
            cells += [f"{r['ratio_vs_cdist']:.3f}" if "ratio_vs_cdist" in r else "-", f"{r['peak_mb']:.0f}"]
            cells += [f"{r['reduction_pct']:.3f}", f"{r['share_of_exact_pct']:.1f} %", f"{r['rel_gap']:.1e}"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    lines += [f"- {t}" for t in out.get("targets", [])]
    step = dict(out.get("step_time", {}))
    workers = step.pop("num_workers", 1)
    for mode, ms in step.items():
        cells = ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) if isinstance(ms, dict) else f"{ms:.1f}"
        lines.append(f"- training step (B=1024, D=3072, {workers} loader workers), coupling {mode}: {cells}")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    lines = []
    by = {(r["impl"], r["B"], r["D"]): r for r in results if "total_ms" in r}
    for b, d in sorted({(r["B"], r["D"]) for r in results}):
        auto = "ours:auto" if ("ours:auto", b, d) in by else f"ours:{choose_exact_solver(b, d)}"
        ours, ref = by.get((auto, b, d)), by.get(("cdist", b, d))
        if ours and ref and b >= 1024:
            ok = ours["total_ms"] <= 0.3 * ref["total_ms"]
            lines.append(f"B={b} D={d}: {auto} total {ours['total_ms']:.0f} ms = "
                         f"{ours['total_ms'] / ref['total_ms']:.2f}x cdist+scipy (target <= 0.30: "
                         f"{'met' if ok else 'MISSED'}); rel gap {ours['rel_gap']:.1e} "
                         f"({'same optimum' if abs(ours['rel_gap']) < 1e-6 else 'NOT optimal'})")  # fmt: skip
        exact = [r for (n, bb, dd), r in by.items() if (bb, dd) == (b, d) and n.startswith("ours:")
                 and n[5:] in SOLVERS and SOLVERS[n[5:]].exact]  # fmt: skip
        greedy = by.get(("ours:greedy", b, d))
        if greedy and exact and b >= 2048:
            fastest = min(exact, key=lambda r: r["solve_ms"])
            frac = greedy["solve_ms"] / fastest["solve_ms"]
            ok = frac <= 0.25 and greedy["share_of_exact_pct"] >= 95
            lines.append(f"B={b} D={d}: greedy solve {greedy['solve_ms']:.0f} ms = {frac:.2f}x "
                         f"{fastest['impl']}, {greedy['share_of_exact_pct']:.1f} % of the exact reduction "
                         f"(target <= 0.25x and >= 95 %: {'met' if ok else 'MISSED'})")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="128..2048 (--split: 512 1024 1536)")
    p.add_argument("--dims", type=int, nargs="+", default=[3072, 4096, 12288])
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (B=2048: one fewer)")
    p.add_argument("--quick", action="store_true", help="B in {128, 256, 512}, D=3072, 2 repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--paper-mem-gb", type=float, default=None, help="CPU default 3, CUDA default 40")
    p.add_argument("--max-scipy-raw", type=int, default=4096, help="largest B for the cdist+scipy reference")
    p.add_argument("--only", nargs="*", default=None, help="substrings of implementation names to run")
    p.add_argument("--step-time", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--step-time-only", action="store_true", help="only the training-step section")
    p.add_argument("--steps", type=int, default=12, help="timed steps per step-time variant")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--render", type=Path, default=None, help="print a saved JSON as Markdown and exit")
    fam = p.add_argument_group("solver families (--families)")
    fam.add_argument("--families", nargs="*", default=None, help="data families to run (none named: all)")
    fam.add_argument("--instances", type=int, default=6, help="independent batches per (family, B)")
    fam.add_argument(
        "--slow-cell-s", type=float, default=8.0, help="half the batches where one batch takes longer"
    )
    fam.add_argument(
        "--min-round-s", type=float, default=0.15, help="per batch: keep timing rounds until this much time"
    )
    fam.add_argument(
        "--single-call-s", type=float, default=1.0, help="a solver slower than this is called once"
    )
    fam.add_argument(
        "--cap-s", type=float, default=12.0, help="skip a solver at 2B when 8x its time at B exceeds this"
    )
    p.add_argument("--split", action="store_true", help="split one couple() call: GEMM, solver, the rest")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [512, 1024, 1536] if args.split else [128, 256, 512, 1024, 2048]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but torch.cuda.is_available() is False here; use --device cpu")
    if args.step_time_only:
        args.sizes, args.step_time = [], True
    if args.quick and args.split:
        args.sizes, args.repeats = [64, 128], 1
    elif args.quick and args.families is not None:
        args.sizes, args.repeats, args.min_round_s, args.instances = [64, 128], 1, 0.0, 2
    elif args.quick:
        args.sizes, args.dims, args.repeats = [128, 256, 512], [3072], 2
    if args.paper_mem_gb is None:
        args.paper_mem_gb = 40.0 if args.device.startswith("cuda") else 3.0
    return args


def families_main(args: argparse.Namespace, card: str) -> dict[str, Any]:
    """The `--families` section: solver speed and exactness per data family (solver_families.py)."""
    import solver_families

    unknown = set(args.families) - set(solver_families.FAMILIES)
    if unknown:
        raise SystemExit(
            f"unknown --families {sorted(unknown)}; choose from {list(solver_families.FAMILIES)}"
        )
    args.families = args.families or list(solver_families.FAMILIES)
    out = {"card": card, "argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.update(solver_families.run(args))
    print(solver_families.render_families(out))
    _write(out, args.out)
    return out


def split_main(args: argparse.Namespace, card: str) -> dict[str, Any]:
    """The `--split` section: one couple() call as GEMM + solver + the rest (call_split.py)."""
    import call_split

    out = {"card": card, "argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"device cpu ({card}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    out.update(call_split.run(args.sizes, args.dims[0], args.repeats, natural_images))
    print(call_split.render_split(out))
    _write(out, args.out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling solver_families module
    if args.render:
        saved = json.loads(args.render.read_text())
        if "summary" in saved:
            import solver_families

            print(solver_families.render_families(saved))
        elif "split" in saved:
            import call_split

            print(call_split.render_split(saved))
        else:
            print(render_markdown(saved))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if args.families is not None:
        return families_main(args, card)
    if args.split:
        return split_main(args, card)
    print(f"device {device} ({card}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"solvers {available_solvers()}; auto (D > 64) -> {choose_exact_solver(1024, 3072)}")
    try:
        import torchcfm  # noqa: F401
    except ImportError:
        print("skipped torchcfm: not installed")
    results: list[dict[str, Any]] = []
    out: dict[str, Any] = {"device": str(device), "card": card, "argv": sys.argv[1:], "results": results}
    out["torch"], out["threads"] = torch.__version__, torch.get_num_threads()
    for d in args.dims:
        for b in args.sizes:
            results.extend(run_case(b, d, args, device))
            _write(out, args.out)  # partial results survive a timeout
    print_table(results)
    out["targets"] = targets(results)
    print("\n".join(out["targets"]))
    if args.step_time:
        out["step_time"] = step_time_section(device, steps=args.steps)
    _write(out, args.out)
    return out


def _write(out: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
