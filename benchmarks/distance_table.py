"""Table-2-style report: data-noise distance reduction and assignment time vs batch size.

The paper's Table 2 (CIFAR-10): -1.93 / -2.16 / -2.32 / -2.44 % distance and 5.4 / 6.7 / 8.8 /
22.8 ms (A6000, fp16) at B = 128 / 256 / 512 / 1024. This script measures the same on the embedded
MNIST-5k digits or on any dataset the example data modules open (``--dataset folder --root DIR``,
``--dataset cifar10 --root DIR``), with our exact ``lsa`` (``solver=auto``), and prints a Markdown
table next to the paper's values (also written as JSON with ``--json``).

    python benchmarks/distance_table.py --dataset mnist5k --sizes 128 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lightning_immiscible import couple
from lightning_immiscible.solvers import resolve_solver

PAPER = {128: (1.93, 5.4), 256: (2.16, 6.7), 512: (2.32, 8.8), 1024: (2.44, 22.8)}


def load_images(dataset: str, root: str | None, image_size: int, limit: int) -> torch.Tensor:
    """``(N, C, S, S)`` images in ``[-1, 1]`` from the example data modules (first ``limit``)."""
    # The example projects are not installed with the package: import them from the clone's root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from example_projects.common.data import mnist5k_tensor, open_dataset

    if dataset == "mnist5k":
        return mnist5k_tensor(image_size)[0][:limit]
    channels = 1 if dataset == "mnist" else 3
    data = open_dataset(dataset, root, image_size, channels, download=False)
    count = min(limit, len(data))
    return torch.stack([data[i][0] for i in range(count)])


def measure(images: torch.Tensor, sizes: list[int], repeats: int, device: str, seed: int = 0) -> list[dict]:
    """Mean reduction (%) and median assignment time (ms) of ``lsa`` per batch size."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in sizes:
        reductions, times = [], []
        for _ in range(repeats):
            idx = torch.randperm(len(images), generator=gen)[:b]
            x0 = images[idx].to(device)
            res = couple(x0, torch.randn(x0.shape, generator=gen).to(device), method="lsa")
            reductions.append(res.reduction_pct)
            times.append(res.assign_ms)
        rows.append(
            {
                "batch": b,
                "reduction_pct": statistics.mean(reductions),
                "reduction_std": statistics.pstdev(reductions),
                "assign_ms": statistics.median(times),
                "paper_reduction_pct": PAPER.get(b, (None, None))[0],
                "paper_assign_ms": PAPER.get(b, (None, None))[1],
            }
        )
    return rows


def to_markdown(rows: list[dict], title: str) -> str:
    """The rows as a Markdown table beside the paper's values."""
    lines = [
        f"{title}",
        "",
        "| batch | distance reduction (ours) | assignment ms (ours) | paper: reduction | paper: ms (A6000) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper_red = f"{r['paper_reduction_pct']:.2f} %" if r["paper_reduction_pct"] else "-"
        paper_ms = f"{r['paper_assign_ms']:.1f}" if r["paper_assign_ms"] else "-"
        lines.append(
            f"| {r['batch']} | {r['reduction_pct']:.2f} % (± {r['reduction_std']:.2f}) | "
            f"{r['assign_ms']:.1f} | {paper_red} | {paper_ms} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist5k", help="mnist5k, folder, cifar10, celeba, mnist")
    parser.add_argument("--root", default=None, help="the dataset's directory (not for mnist5k)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    images = load_images(args.dataset, args.root, args.image_size, limit=max(args.sizes) * 2)
    if len(images) < max(args.sizes):
        parser.error(
            f"{args.dataset} has {len(images)} images, fewer than the largest batch {max(args.sizes)}"
        )
    rows = measure(images, args.sizes, args.repeats, args.device)
    title = (
        f"{args.dataset} ({tuple(images.shape[1:])}), lsa with solver={resolve_solver('auto').name} "
        f"on {args.device}, {args.repeats} batches per size"
    )
    print(to_markdown(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
