"""Generates the figures and the table of docs/how-it-works.md.

    python docs/scripts/make_figures.py --out docs/assets

Writes ``toy_pairing.png`` (random vs immiscible pairing of 2-D points and noise),
``reduction_vs_batch.png`` and ``reduction_vs_batch.json`` (mean data-noise distance reduction of
the exact assignment vs batch size on Gaussian data, next to the embedded MNIST-5k digits, 32x32,
and the paper's CIFAR-10 values), and the ``knn`` tilt on MNIST-5k.

The MNIST-5k curve is read from the committed ``benchmarks/distance_table.py`` result
(``--distance-table``, default ``docs/results/distance_table_mnist5k.json``), so that every page
quotes one measurement of it. Batches are drawn at random: the embedded digits are sorted by class,
and consecutive slices would couple single-digit batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lightning_immiscible import couple


def toy_pairing(path: Path, n: int = 24, seed: int = 0) -> dict:
    """Two data clusters in 2-D, Gaussian noise, random pairing vs the assignment."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-2.0, 1.5], [2.0, -1.5]])
    x0 = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 2, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    res = couple(x0, noise, method="lsa")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
    for ax, paired, title in ((axes[0], noise, "random pairing"), (axes[1], res.noise, "immiscible pairing")):
        for a, b in zip(x0, paired, strict=True):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=0.8, zorder=1)
        ax.scatter(
            x0[:, 0],
            x0[:, 1],
            c=["C0" if i % 2 == 0 else "C1" for i in range(n)],
            s=28,
            zorder=2,
            label="data",
        )
        ax.scatter(paired[:, 0], paired[:, 1], marker="x", c="k", s=22, zorder=3, label="noise")
        mean = float(torch.linalg.vector_norm(x0 - paired, dim=1).mean())
        ax.set_title(f"{title}: mean distance {mean:.2f}")
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"cost_before": res.cost_before, "cost_after": res.cost_after, "reduction_pct": res.reduction_pct}


ROOT = Path(__file__).resolve().parents[2]
DISTANCE_TABLE = ROOT / "docs" / "results" / "distance_table_mnist5k.json"


def reduction_vs_batch(path: Path, sizes: list[int], repeats: int, distance_table: Path) -> dict:
    """Mean (and s.d.) distance reduction (%) of lsa vs batch size on Gaussian data, plotted with
    the MNIST-5k rows of ``distance_table`` and the paper's CIFAR-10 values."""
    gen = torch.Generator().manual_seed(2)
    table: dict[str, dict[int, dict[str, float]]] = {"gaussian (1x32x32)": {}}
    for b in sizes:
        red, ms = [], []
        for _ in range(repeats):
            x0 = torch.randn(b, 1, 32, 32, generator=gen)
            res = couple(x0, torch.randn(x0.shape, generator=gen), method="lsa")
            red.append(res.reduction_pct)
            ms.append(res.assign_ms)
        table["gaussian (1x32x32)"][b] = {
            "reduction_pct": statistics.mean(red),
            "reduction_std": statistics.pstdev(red),
            "assign_ms": statistics.median(ms),
        }
    mnist = {r["batch"]: r for r in json.loads(distance_table.read_text())["rows"]}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(sizes, [table["gaussian (1x32x32)"][b]["reduction_pct"] for b in sizes], marker="o",
            label="Gaussian data (1x32x32)")  # fmt: skip
    ax.errorbar(list(mnist), [r["reduction_pct"] for r in mnist.values()],
                yerr=[r["reduction_std"] for r in mnist.values()], marker="o", capsize=3,
                label="MNIST-5k (1x32x32), distance_table.py")  # fmt: skip
    paper = {128: 1.93, 256: 2.16, 512: 2.32, 1024: 2.44}
    ax.plot(list(paper), list(paper.values()), "k--", marker="s", label="paper, CIFAR-10 (Table 2)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (items per assignment)")
    ax.set_ylabel("mean distance reduction (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return table


def knn_tilt(ks: list[int], batch: int = 256, repeats: int = 4) -> dict:
    """knn on MNIST-5k: distance reduction, and how much of it comes from picking shorter noise.

    ``norm_only`` picks the shortest of the k candidates without looking at the data: the part of
    the reduction it reproduces is the distribution tilt, not a data-aware pairing.
    """
    # The example projects are not installed with the package: import them from the clone's root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from example_projects.common.data import mnist5k_tensor

    digits = mnist5k_tensor(32)[0]
    gen = torch.Generator().manual_seed(3)
    table = {}
    for k in ks:
        red, norm_only, sq_norm = [], [], []
        for _ in range(repeats):
            x0 = digits[torch.randperm(len(digits), generator=gen)[:batch]]  # random: sorted by class
            cand = torch.randn((batch, k, *x0.shape[1:]), generator=gen)
            res = couple(x0, cand, method="knn")
            shortest = cand[torch.arange(batch), cand.flatten(2).square().sum(2).argmin(1)]
            base = float(torch.linalg.vector_norm((x0 - cand[:, 0]).flatten(1), dim=1).mean())
            short = float(torch.linalg.vector_norm((x0 - shortest).flatten(1), dim=1).mean())
            red.append(res.reduction_pct)
            norm_only.append(100 * (base - short) / base)
            sq_norm.append(float(res.noise.square().mean()))
        table[k] = {
            "reduction_pct": statistics.mean(red),
            "reduction_std": statistics.pstdev(red),
            "norm_only_reduction_pct": statistics.mean(norm_only),
            "mean_sq_noise_per_dim": statistics.mean(sq_norm),
        }
    return table


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/assets"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--distance-table", type=Path, default=DISTANCE_TABLE,
                        help="the MNIST-5k rows to plot (benchmarks/distance_table.py --json)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "toy": toy_pairing(args.out / "toy_pairing.png"),
        "reduction_vs_batch": reduction_vs_batch(
            args.out / "reduction_vs_batch.png", args.sizes, args.repeats, args.distance_table
        ),
        "knn_tilt_mnist5k_b256": knn_tilt([1, 2, 4, 8, 16]),
        "command": " ".join(
            ["python docs/scripts/make_figures.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    (args.out / "reduction_vs_batch.json").write_text(json.dumps(result, indent=2))
    for name, rows in result["reduction_vs_batch"].items():
        print(name, {b: round(v["reduction_pct"], 2) for b, v in rows.items()})
    for k, row in result["knn_tilt_mnist5k_b256"].items():
        print("knn k =", k, {key: round(v, 3) for key, v in row.items()})
    return result


if __name__ == "__main__":
    main()
