"""Pre-registered evidence: coupling within classes for class-conditional flow matching with guidance.

The design, the arms, the metrics and the comparisons are fixed on
`docs/results/conditional-preregistration.md`, written before any run; the defaults below are that
design. Class-conditional flow matching on MNIST-5k (28 x 28, flattened), a label-conditioned MLP
trained with classifier-free guidance's label drop, three arms that differ only in how each batch's
noise is paired with its data: `independent` (no coupling), `ot` (exact assignment across the
whole batch, plain minibatch OT) and `ot-within` (the same assignment within each class). Every arm
of a seed shares its initial weights, data order, noise, training times, label drops and
evaluation noise (each from its own generator seeded by (seed, stream)).

Each finished (arm, seed) is one JSON file under `OUT/records/`; a rerun skips those, so the sweep
resumes across sessions, and `--max-minutes` stops it between units. `--plan` prints the units and
an estimate timed here; `--report` (re)writes the comparisons from the finished records.

```bash
python benchmarks/conditional_fm.py --plan                 # the units and the estimated time
python benchmarks/conditional_fm.py --max-minutes 120      # run (or resume) the pre-registered sweep
python benchmarks/conditional_fm.py --report               # the pre-listed comparisons, from the records
```
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from conditional_fm_report import write_report
from regimes_metrics import classifier_features, frechet, gaussian_stats
from regimes_train import load_dataset, reference_sample, stream
from torch import Tensor, nn

from example_projects.flow_matching.objective import flow_matching_loss
from example_projects.flow_matching.samplers import integrate
from lightning_immiscible import CouplingSpec

DATASET = "mnist28"
ARMS: dict[str, CouplingSpec] = {
    "independent": CouplingSpec("none", "sqeuclidean"),
    "ot": CouplingSpec("lsa", "sqeuclidean", within_condition=False),
    "ot-within": CouplingSpec("lsa", "sqeuclidean"),
}
NULL = 10  # the "no class" label of classifier-free guidance


@dataclass(frozen=True)
class Settings:
    """The pre-registered settings (changing one invalidates the finished records)."""

    seeds: int = 6
    steps: int = 6000
    checkpoints: tuple[int, ...] = (1500, 3000, 6000)
    batch: int = 128
    width: int = 512
    lr: float = 1e-3
    cond_drop: float = 0.1
    guidance: tuple[float, ...] = (2.0, 1.0)  # the first is the primary scale
    sampler_steps: tuple[int, ...] = (1, 2, 4, 8)
    eval_samples: int = 1000


class ClassTimeMLP(nn.Module):
    """`(B, D)` points, `(B,)` times in [0, 1] and `(B,)` labels (10 = none) -> `(B, D)` velocities."""

    def __init__(self, dim: int, width: int, emb: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, 6.9, emb // 2)))
        self.label = nn.Embedding(classes + 1, emb)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * emb, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        angle = t.float()[:, None] * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos(), self.label(y)], dim=1))


def init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draws every parameter of `model` from `generator` only: uniform in `+-1/sqrt(last dim)`."""
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / p.shape[-1] ** 0.5
            p.uniform_(-bound, bound, generator=generator)
    return model


def make_model(dim: int, width: int, generator: torch.Generator, classes: int = 10) -> nn.Module:
    """A `ClassTimeMLP` (`classes` labels and the null label) whose weights come from `generator` only."""
    return init_weights(ClassTimeMLP(dim, width, classes=classes), generator)


def guided(model: nn.Module, y: Tensor, scale: float, null: int = NULL) -> Any:
    """The velocity with classifier-free guidance `v_u + w (v_c - v_u)` (`w = 1`: conditional only)."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(x, t, y)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        v_c, v_u = v.chunk(2)
        return v_u + scale * (v_c - v_u)

    return velocity


@torch.no_grad()
def evaluate(model: nn.Module, s: Settings, seed: int, ctx: dict[str, Any]) -> list[dict[str, float]]:
    """FID in the digit classifier's feature space and class accuracy, per guidance and Euler steps."""
    gen = stream(DATASET, seed, "eval")
    noise = torch.randn(s.eval_samples, ctx["dim"], generator=gen)
    y = torch.arange(s.eval_samples) % 10  # balanced classes
    rows = []
    model.eval()
    for w in s.guidance:
        for steps in s.sampler_steps:
            x = integrate(guided(model, y, w), noise, steps).clamp(-1, 1)
            clf = ctx["classifier"]
            fid = frechet(clf.features(x), ctx["reference"])
            acc = float((clf(x).argmax(1) == y).float().mean())
            rows.append({"guidance": w, "euler_steps": steps, "fid_clf": fid, "class_acc": acc})
    model.train()
    return rows


def run_unit(arm: str, seed: int, s: Settings, ctx: dict[str, Any]) -> dict[str, Any]:
    """Trains one (arm, seed) and evaluates it at every checkpoint; returns its record."""
    spec, data, labels = ARMS[arm], ctx["data"], ctx["labels"]
    gens = {n: stream(DATASET, seed, n) for n in ("init", "data", "noise", "time", "drop")}
    model = make_model(ctx["dim"], s.width, gens["init"])
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    skews, reductions, evals, start = [], [], [], time.perf_counter()
    for step in range(1, s.steps + 1):
        idx = torch.randint(data.shape[0], (s.batch,), generator=gens["data"])
        x0, y = data[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gens["noise"])
        t = torch.rand(s.batch, generator=gens["time"])
        drop = torch.rand(s.batch, generator=gens["drop"]) < s.cond_drop
        res = spec.couple(x0, noise, y)  # labels before the drop: dropped items keep their class
        skews.append(res.prior_skew)
        reductions.append(res.reduction_pct)
        y_in = torch.where(drop, torch.full_like(y, NULL), y)
        loss = flow_matching_loss(lambda x, tt, y_in=y_in: model(x, tt, y_in), x0, res.noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in s.checkpoints:
            evals += [{"step": step, **row} for row in evaluate(model, s, seed, ctx)]
    valid = [v for v in skews if v is not None]
    return {
        "arm": arm,
        "seed": seed,
        "settings": asdict(s),
        "prior_skew_mean": sum(valid) / len(valid),
        "prior_skew_batches": len(valid),
        "reduction_pct_mean": sum(reductions) / len(reductions),
        "train_s": time.perf_counter() - start,
        "evals": evals,
    }


def context(out: Path) -> dict[str, Any]:
    """Data, labels, the frozen digit classifier and the reference feature statistics."""
    data, labels = load_dataset(DATASET)
    classifier = classifier_features(DATASET, data, labels, out / "cache")
    ref = reference_sample(DATASET, data, 1000)
    with torch.no_grad():
        reference = gaussian_stats(classifier.features(ref))
    return {
        "data": data,
        "labels": labels,
        "dim": data.shape[1],
        "classifier": classifier,
        "reference": reference,
    }


def record_path(out: Path, arm: str, seed: int) -> Path:
    return out / "records" / f"{arm}-seed{seed}.json"


def run_sweep(args: argparse.Namespace, s: Settings) -> list[Path]:
    """Runs the units that have no record yet (seed-major, so paired seeds finish together)."""
    ctx, deadline, done = context(args.out), time.monotonic() + 60 * args.max_minutes, []
    for seed in range(s.seeds):
        for arm in ARMS:
            path = record_path(args.out, arm, seed)
            if path.exists():
                if json.loads(path.read_text())["settings"] != json.loads(json.dumps(asdict(s))):
                    raise SystemExit(f"{path} was made with other settings; use another --out.")
                continue
            if time.monotonic() > deadline:
                print(f"--max-minutes reached; rerun the same command to resume ({path.name} next).")
                return done
            record = run_unit(arm, seed, s, ctx)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
            path.with_suffix(".tmp").replace(path)
            print(f"{path.name}: {record['train_s']:.0f} s, prior_skew {record['prior_skew_mean']:+.3f}")
            done.append(path)
    return done


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/conditional_fm"), help="records and cache")
    parser.add_argument("--max-minutes", type=float, default=float("inf"))
    parser.add_argument("--plan", action="store_true", help="print the units and a timed estimate")
    parser.add_argument("--report", action="store_true", help="only write the comparisons")
    parser.add_argument("--report-path", type=Path, default=None, help="default: RUNS/report.md")
    parser.add_argument("--tiny", action="store_true", help="a smoke test, NOT the pre-registered run")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    """The arguments, and the settings: the pre-registered ones unless `--tiny`."""
    args = build_parser().parse_args(argv)
    args.out = args.runs
    s = Settings()
    if args.tiny:
        s = Settings(seeds=2, steps=4, checkpoints=(2, 4), batch=16, width=32, eval_samples=40)
    return args, s


def plan(args: argparse.Namespace, s: Settings) -> float:
    """Times 20 training steps of the slowest arm here and prints the estimate of the whole sweep."""
    ctx = context(args.out)
    timing = Settings(seeds=1, steps=20, checkpoints=(), batch=s.batch, width=s.width)
    per_step = run_unit("ot-within", 0, timing, ctx)["train_s"] / timing.steps
    todo = [(a, r) for r in range(s.seeds) for a in ARMS if not record_path(args.out, a, r).exists()]
    minutes = len(todo) * s.steps * per_step / 60
    print(f"{len(todo)} of {s.seeds * len(ARMS)} units to run, about {minutes:.0f} min of training here")
    return minutes


def main(argv: list[str] | None = None) -> Any:
    args, s = parse_args(argv)
    if args.plan:
        return plan(args, s)
    if not args.report:
        run_sweep(args, s)
    return write_report(args.out, args.report_path or args.out / "report.md", list(ARMS))


if __name__ == "__main__":
    main()
