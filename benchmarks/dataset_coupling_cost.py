"""What the dataset-level coupling costs: the map's search per training batch, a fitting step, memory.

For each training-set size N (items of D values, uniform in [-1, 1]) and batch size B, times
`SemidiscreteMap.assign` on a `(B, D)` noise batch (the search a DataLoader worker runs per training
batch: one `B x N` matrix product and a max), one fitting step of `--fit-batch` draws (the search at
the iterate plus the Adam update) and `hit_chi2` on `--chi2-samples` draws; next to them, for scale, an exact
batch assignment of the same B (`couple(..., method="lsa", metric="sqeuclidean")`), the batch
coupling the map replaces. Reports the map's memory (the `(N, D)` float32 items and three `(N,)`
float64 vectors). Median of `--repeats` after one warm-up, on `--threads` threads (default 1: a
DataLoader worker's). Prints a table, writes JSON. Timed runs belong on an otherwise idle machine.

    python benchmarks/dataset_coupling_cost.py --json benchmarks/results/dataset_coupling_cost_cpu.json
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_immiscible import SemidiscreteMap, couple  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000], help="items N")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512], help="training batch B")
    parser.add_argument("--dim", type=int, default=784, help="values per item D (784 = 28x28)")
    parser.add_argument("--fit-batch", type=int, default=1024, help="noise draws per fitting step")
    parser.add_argument("--chi2-samples", type=int, default=16384, help="draws of one hit_chi2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    return parser


def median_ms(fn, repeats: int) -> float:
    """Median wall time of `fn()` in ms, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(n: int, b: int, args: argparse.Namespace) -> dict[str, float]:
    """One (N, B) cell."""
    gen = torch.Generator().manual_seed(0)
    items = torch.rand(n, args.dim, generator=gen) * 2 - 1
    sd = SemidiscreteMap(items, seed=0)
    noise = torch.randn(b, args.dim, generator=gen)
    fit_noise = torch.randn(args.fit_batch, args.dim, generator=gen)
    x0 = items[:b]
    return {
        "n": n,
        "batch": b,
        "dim": args.dim,
        "search_ms": median_ms(lambda: sd.assign(noise), args.repeats),
        # a fitting step is the search of its batch plus an Adam update of N numbers (negligible)
        "fit_step_ms": median_ms(lambda: sd.hits(fit_noise), args.repeats),
        "hit_chi2_ms": median_ms(lambda: sd.hit_chi2(args.chi2_samples), 1),
        "batch_lsa_ms": median_ms(
            lambda: couple(x0, noise, method="lsa", metric="sqeuclidean"), args.repeats
        ),
        "memory_mb": (items.numel() * 4 + 3 * n * 8) / 2**20,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Measures every cell, prints the table and writes the JSON."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(n, b, args) for n in args.sizes for b in args.batches]
    print(
        f"D = {args.dim}, {args.threads} thread(s), fitting batch {args.fit_batch}, "
        f"hit_chi2 on {args.chi2_samples} draws"
    )
    print(
        "| N | B | search per batch (ms) | fitting step (ms) | hit_chi2 (ms) | batch lsa (ms) | memory (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['batch']} | {r['search_ms']:.1f} | {r['fit_step_ms']:.1f} | "
            f"{r['hit_chi2_ms']:.0f} | {r['batch_lsa_ms']:.1f} | {r['memory_mb']:.1f} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": args.threads, "machine": platform.machine(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
