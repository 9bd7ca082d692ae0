"""How the map's fit converges on the experiment's 4,000 training digits, per learning rate.

Chooses the fit's settings on its own convergence measure (`hit_chi2`) alone, before any FID of the
dataset-coupling sweep: for each `--lrs` value, fits a fresh map (fitting batch `--batch`) for
`--steps` steps and records `hit_chi2` and the wall time every `--check-every` steps. Trains no
model. Writes JSON and prints a table.

    python experiments/dataset_fm/fit_pilot.py --json experiments/dataset_fm/fit_pilot.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from regimes_train import load_dataset

from experiments.conditions_fm import measure
from lightning_immiscible import SemidiscreteMap


def main(argv: list[str] | None = None) -> dict:
    """Fits one map per learning rate and records its convergence."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    data, _ = load_dataset("mnist28")
    train = data[measure.split(data.shape[0]).train]
    out: dict = {"n": train.shape[0], "dim": train.shape[1], "batch": args.batch, "curves": {}}
    for lr in args.lrs:
        sd = SemidiscreteMap(train, seed=0)
        curve = [(0, sd.hit_chi2(), 0.0)]
        start = time.perf_counter()
        while sd.steps < args.steps:
            every = args.check_every
            report = sd.fit(every, batch_size=args.batch, lr=lr, tol=None, check_every=every)
            curve.append((report.steps, report.chi2[-1][1], time.perf_counter() - start))
            chi2 = report.chi2[-1][1]
            print(f"lr {lr}: step {report.steps}, chi2 {chi2:.4f}, {curve[-1][2]:.0f} s", flush=True)
        out["curves"][str(lr)] = curve
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
