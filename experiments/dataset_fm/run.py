"""The cheap runner of `docs/results/dataset-coupling-preregistration.md`: dataset-level coupling.

Unconditional flow matching on MNIST-5k (28 x 28, flattened), split once into 1,000 held-out digits
and 4,000 training digits (the conditions experiment's split). Three arms per seed: `independent`
(the batch's items with its noise as drawn), `batch-ot` (the same items and noise, re-paired by an
exact assignment within the batch) and `dataset` (the same noise; the items are those the fitted
`SemidiscreteMap` sends it to). Every arm of a seed shares its initial weights, noise, training
times and evaluation noise; the two batch arms also share the data order. FID is computed against
the held-out digits; the memorisation measures compare each sample's distance to its nearest
training digit with that of the held-out digits.

Each finished (arm, seed) is one JSON record under `OUT/records/` (default
`experiments/dataset_fm/records/`); a rerun skips those, `--max-minutes` stops between runs, and a
record whose library tree hash differs from those in the folder is refused. `--report` writes every
pre-listed comparison from the records and trains nothing. `--tiny` is a smoke test with other
settings under `runs/dataset_fm_tiny/`, never the pre-registered run.

```bash
python experiments/dataset_fm/run.py --plan
python experiments/dataset_fm/run.py --max-minutes 120
python experiments/dataset_fm/run.py --report --report-path docs/results/dataset_fm_report.md
```
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from conditional_fm import ClassTimeMLP, init_weights
from regimes_metrics import FeatureClassifier, classifier_features, frechet, gaussian_stats
from regimes_train import load_dataset, stream
from torch import Tensor, nn

from example_projects.common.memorisation import memorisation, nearest_distance
from example_projects.flow_matching.objective import flow_matching_loss
from example_projects.flow_matching.samplers import integrate
from experiments.conditions_fm import measure
from experiments.conditions_fm import records as rec
from lightning_immiscible import CouplingSpec, SemidiscreteMap

ROOT = Path(__file__).resolve().parents[2]
DATASET = "mnist28"
PAGE = "docs/results/dataset-coupling-preregistration.md"
PART = "cheap"
ARMS = ("independent", "batch-ot", "dataset")
STREAMS = ("init", "data", "noise", "time", "eval", "fit")
LSA = CouplingSpec("lsa", "sqeuclidean")
#: Replaced in tests with a fake clock; `--max-minutes` reads it between runs.
clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Settings:
    """The pre-registered settings (a record made with others is refused in the same folder)."""

    seeds: int = 10
    steps: int = 6000
    eval_every: int = 500
    batch: int = 128
    width: int = 512
    lr: float = 1e-3
    sampler_steps: tuple[int, ...] = (1, 2, 4, 8)
    eval_samples: int = 1000
    classifier_epochs: int = 30
    fit_steps: int = 2000  # the map's fit: a fixed budget per seed (fit_pilot.json: lr 0.005 had
    fit_batch: int = 1024  # the lowest hit chi2 after 2,000 steps of 0.005, 0.02 and 0.05)
    fit_lr: float = 0.005
    fit_tol: float | None = None
    fit_check_every: int = 500

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The evaluation steps: every `eval_every` steps, the last one included."""
        return tuple(range(self.eval_every, self.steps + 1, self.eval_every))


TINY = Settings(
    seeds=2, steps=40, eval_every=20, batch=16, width=32, eval_samples=40, classifier_epochs=1,
    fit_steps=60, fit_batch=256, fit_check_every=30,
)  # fmt: skip


@dataclass
class Context:
    """The split data, the frozen classifier and the held-out digits' reference statistics."""

    train: Tensor  # (4000, 784)
    held: Tensor  # (1000, 784)
    classifier: FeatureClassifier
    reference: Any
    classifier_acc: float
    held_nn: Tensor  # (1000,) each held-out digit's distance to its nearest training digit


def context(cache: Path, s: Settings, classifier: FeatureClassifier | None = None) -> Context:
    """The split, the classifier (trained on the training digits only, cached) and the references."""
    data, labels = load_dataset(DATASET)
    assert labels is not None
    sp = measure.split(data.shape[0])
    train, held = data[sp.train], data[sp.held_out]
    suffix = "" if s.classifier_epochs == 30 else f"-{s.classifier_epochs}epochs"
    clf = classifier or classifier_features(
        f"mnist28-train4000{suffix}", train, labels[sp.train], cache, s.classifier_epochs
    )
    with torch.no_grad():
        reference = gaussian_stats(clf.features(held[: s.eval_samples]))
        acc = float((clf(held).argmax(1) == labels[sp.held_out]).float().mean())
    return Context(train, held, clf, reference, acc, nearest_distance(held, train))


def fit_map(ctx: Context, s: Settings, seed: int) -> tuple[SemidiscreteMap, dict[str, Any]]:
    """The seed's map, fitted from its own stream; its fitting time and convergence."""
    fit_seed = int(torch.randint(2**62, (1,), generator=stream("dataset-fm", seed, "fit")))
    sd = SemidiscreteMap(ctx.train, seed=fit_seed)
    start = time.perf_counter()
    report = sd.fit(
        s.fit_steps, batch_size=s.fit_batch, lr=s.fit_lr, tol=s.fit_tol, check_every=s.fit_check_every
    )
    return sd, {
        "fit_s": time.perf_counter() - start,
        "fit_steps": report.steps,
        "fit_converged": report.converged,
        "fit_chi2": report.chi2,
    }


@torch.no_grad()
def evaluate(model: nn.Module, noise: Tensor, s: Settings, ctx: Context, final: bool) -> list[dict[str, Any]]:
    """FID against the held-out digits per Euler step count; at the final evaluation, memorisation."""
    rows, null = [], torch.zeros(noise.shape[0], dtype=torch.long)
    model.eval()
    for k in s.sampler_steps:
        x = integrate(lambda x, t: model(x, t, null), noise, k).clamp(-1, 1)
        row: dict[str, Any] = {
            "euler_steps": k,
            "fid_clf": frechet(ctx.classifier.features(x), ctx.reference),
        }
        if final:
            row |= memorisation(x, ctx.train, ctx.held_nn)
        rows.append(row)
    model.train()
    return rows


def run_unit(
    arm: str, seed: int, s: Settings, ctx: Context, sd: SemidiscreteMap | None = None
) -> dict[str, Any]:
    """Trains one (arm, seed), evaluates it every `eval_every` steps and returns its record.

    Args:
        arm: `independent`, `batch-ot` or `dataset`.
        seed: The paired seed.
        s: The settings.
        ctx: The shared data.
        sd: The seed's fitted map (the `dataset` arm only).
    """
    gens = {name: stream("dataset-fm", seed, name) for name in STREAMS}
    model = init_weights(ClassTimeMLP(ctx.train.shape[1], s.width, classes=0), gens["init"])
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    eval_noise = torch.randn(s.eval_samples, ctx.train.shape[1], generator=gens["eval"])
    order, null = measure.Order(ctx.train.shape[0], gens["data"]), torch.zeros(s.batch, dtype=torch.long)
    evals, distinct, eval_s, start = [], [], 0.0, time.perf_counter()
    for step in range(1, s.steps + 1):
        noise = torch.randn(s.batch, ctx.train.shape[1], generator=gens["noise"])
        t = torch.rand(s.batch, generator=gens["time"])
        if arm == "dataset":
            assert sd is not None
            idx = sd.assign(noise)
        else:
            idx = order.take(s.batch)
        x0 = ctx.train[idx]
        if arm == "batch-ot":
            noise = LSA.couple(x0, noise).noise
        distinct.append(int(idx.unique().numel()))
        loss = flow_matching_loss(lambda x, tt: model(x, tt, null), x0, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in s.checkpoints:
            tick = time.perf_counter()
            rows = evaluate(model, eval_noise, s, ctx, final=step == s.steps)
            evals += [{"step": step, **row} for row in rows]
            eval_s += time.perf_counter() - tick
    return {
        "part": PART,
        "arm": arm,
        "seed": seed,
        "settings": asdict(s),
        "train_s": time.perf_counter() - start - eval_s,
        "eval_s": eval_s,
        "distinct_items_mean": sum(distinct) / len(distinct),
        "classifier_heldout_acc": ctx.classifier_acc,
        "held_nn_median": float(torch.quantile(ctx.held_nn, 0.5)),
        "held_nn_min": float(ctx.held_nn.min()),
        "evals": evals,
    }


def units(s: Settings) -> list[tuple[str, int]]:
    """Every (arm, seed), seed-major (paired seeds finish together)."""
    return [(arm, seed) for seed in range(s.seeds) for arm in ARMS]


def record_path(records: Path, arm: str, seed: int) -> Path:
    """The record of one (arm, seed)."""
    return records / f"{arm}-seed{seed}.json"


def provenance() -> dict[str, Any]:
    """The conditions runner's provenance, tied to this experiment's page."""
    prov = rec.provenance()
    page = (rec.git("log", "-1", "--format=%H %cI", "--", PAGE) or " ").split(" ")
    return prov | {"prereg_commit": page[0] or None, "prereg_date": page[1] or None}


def run_sweep(args: argparse.Namespace, s: Settings) -> list[Path]:
    """Runs the (arm, seed)s that have no record yet; stops between runs after `--max-minutes`."""
    records, prov = args.out / "records", provenance()
    rec.check_can_add(records, prov, PART, asdict(s))
    deadline, ctx, done, maps = clock() + 60 * args.max_minutes, None, [], {}
    for arm, seed in units(s):
        path = record_path(records, arm, seed)
        if path.exists():
            continue
        if clock() > deadline:
            print(f"--max-minutes reached; rerun the same command to resume ({path.name} next).")
            return done
        ctx = ctx or context(args.out / "cache", s)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        fit: dict[str, Any] = {}
        if arm == "dataset":
            maps[seed], fit = fit_map(ctx, s, seed)
        record = run_unit(arm, seed, s, ctx, maps.get(seed)) | fit
        rec.check_can_add(records, prov, PART, asdict(s))
        rec.write(path, {**record, "provenance": prov, "started": started})
        print(
            f"{path.name}: {record['train_s']:.0f} s training, {record['eval_s']:.0f} s evaluation",
            flush=True,
        )
        done.append(path)
    return done


def plan(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """Prints the runs left and an estimate: 20 timed steps of each arm, one evaluation, one fit."""
    records = args.out / "records"
    todo = [u for u in units(s) if not record_path(records, *u).exists()]
    cached = (args.out / "cache" / "classifier-mnist28-train4000.pt").exists()
    ctx = context(args.out / "cache", s, None if cached else FeatureClassifier(784).requires_grad_(False))
    timing = dataclasses.replace(s, steps=20, eval_every=20, fit_steps=100, fit_tol=None, fit_check_every=100)
    sd, fit = fit_map(ctx, timing, 0)
    per_run: dict[str, float] = {}
    for arm in ARMS:
        timed = run_unit(arm, 0, timing, ctx, sd)
        per_run[arm] = s.steps * timed["train_s"] / timing.steps + len(s.checkpoints) * timed["eval_s"]
        print(
            f"{arm}: {1000 * timed['train_s'] / timing.steps:.1f} ms/step, "
            f"one evaluation {timed['eval_s']:.1f} s"
        )
    fit_s = fit["fit_s"] / timing.fit_steps * s.fit_steps
    print(f"fit: {1000 * fit['fit_s'] / timing.fit_steps:.1f} ms/step, at most {fit_s / 60:.1f} min per seed")
    minutes = (sum(per_run[arm] + (fit_s if arm == "dataset" else 0) for arm, _ in todo)) / 60
    print(f"{len(todo)} of {len(units(s))} runs left in {records}; estimate: at most {minutes:.0f} min")
    return {"left": len(todo), "per_run_s": per_run, "fit_s": fit_s, "minutes": minutes}


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="records/ and cache/")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop between runs after this"
    )
    parser.add_argument("--plan", action="store_true", help="print the runs left and a timed estimate")
    parser.add_argument("--report", action="store_true", help="only write the comparisons")
    parser.add_argument("--report-path", type=Path, default=None, help="default: OUT/report.md")
    parser.add_argument("--tiny", action="store_true", help="a smoke test, NOT the pre-registered run")
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Runs, plans or reports, as the command line says."""
    args = build_parser().parse_args(argv)
    s = TINY if args.tiny else Settings()
    if args.out is None:
        args.out = ROOT / ("runs/dataset_fm_tiny" if args.tiny else "experiments/dataset_fm")
    if args.plan:
        return plan(args, s)
    if args.report:
        from experiments.dataset_fm.report import write_report

        return write_report(rec.load(args.out / "records"), args.report_path or args.out / "report.md")
    return run_sweep(args, s)


if __name__ == "__main__":
    main()
