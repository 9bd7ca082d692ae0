"""The runner of `docs/results/conditions-preregistration.md`: continuous conditions and larger pools.

Flow matching on MNIST-5k (28 x 28, flattened), split once into 1,000 held-out reference digits and
4,000 training digits. Part (a) conditions an MLP on each digit's standardised `(ink, slant)` and
compares four pairings (`independent`, `ot`, `ot-cond`, `knn`); part (b) trains the
class-conditional MLP with classifier-free guidance on 10 digit labels (`classes10`) or 10 digits x
10 ink buckets (`classes100`) and compares independent pairs with coupling within classes over
pools of 1, 4 and 16 training batches. Every arm of a seed shares its initial weights, data order,
noise, training times, label drops and evaluation noise (each from its own generator seeded by
(part, seed, stream)); pools only change which of the pool's noise draws goes with which item, and
every item stays in its own training batch.

Each finished (part, setting, arm, seed) is one JSON record under `OUT/records/` (by default
`experiments/conditions_fm/records/`); a rerun skips those, `--max-minutes` stops between runs, and
a record whose library tree hash differs from those of its part already in the folder is refused.
`--plan` prints the runs left and an estimate timed here (20 steps of each arm left); `--report`
writes every pre-listed comparison from the finished records and trains nothing. `--tiny` is a
smoke test with other settings, written under `runs/conditions_fm_tiny/`: never the pre-registered
run.

```bash
python experiments/conditions_fm/run.py --part a --plan
python experiments/conditions_fm/run.py --part a --max-minutes 120
python experiments/conditions_fm/run.py --part a --report --report-path docs/results/conditions_fm_report_a.md

python experiments/conditions_fm/run.py --part b --plan
python experiments/conditions_fm/run.py --part b --max-minutes 120
python experiments/conditions_fm/run.py --part b --report --report-path docs/results/conditions_fm_report_b.md
```
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
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
from conditional_fm import ClassTimeMLP, guided, init_weights
from regimes_metrics import FeatureClassifier, classifier_features, frechet, gaussian_stats
from regimes_train import load_dataset, stream
from torch import Tensor, nn

from example_projects.flow_matching.objective import flow_matching_loss
from example_projects.flow_matching.samplers import integrate
from experiments.conditions_fm import measure
from experiments.conditions_fm import records as rec
from experiments.conditions_fm.report import render
from lightning_immiscible import CouplingResult, CouplingSpec
from lightning_immiscible.conditional import class_noise_means, prior_skew

ROOT = Path(__file__).resolve().parents[2]
DATASET = "mnist28"
PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "a": {"ink-slant": ("independent", "ot", "ot-cond", "knn")},
    "b": {s: ("independent", "within-p1", "within-p4", "within-p16") for s in ("classes100", "classes10")},
}
STREAMS = ("init", "data", "noise", "time", "drop", "eval", "knn")
NONE = CouplingSpec("none", "sqeuclidean")
LSA = CouplingSpec("lsa", "sqeuclidean")
KNN = CouplingSpec("knn", "sqeuclidean")
#: Replaced in tests with a fake clock; `--max-minutes` reads it between runs.
clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Settings:
    """The pre-registered settings (a record made with others is refused in the same folder)."""

    seeds: int = 10
    steps: int = 6000
    checkpoints: tuple[int, ...] = (1500, 3000, 6000)
    batch: int = 128
    width: int = 512
    lr: float = 1e-3
    sampler_steps: tuple[int, ...] = (1, 2, 4, 8)
    eval_samples: int = 1000
    classifier_epochs: int = 30
    candidate_share: float = 0.2  # part a, ot-cond: the target r of C²OT's weight search
    knn_candidates: int = 4  # part a, knn: the batch's draw and 3 more
    cond_drop: float = 0.1  # part b: label drop of classifier-free guidance
    guidance: tuple[float, ...] = (2.0, 1.0)  # part b; the first is the primary scale


TINY = Settings(
    seeds=2, steps=32, checkpoints=(16, 32), batch=16, width=32, eval_samples=40, classifier_epochs=1
)


def ot_cond_spec(s: Settings) -> CouplingSpec:
    """The `ot-cond` arm: `M + w C`, `w` searched per batch for `r(w)` = 0.2 (C²OT's rule)."""
    return CouplingSpec(
        "lsa", metric="sqeuclidean", candidate_share=s.candidate_share, condition_metric="sqeuclidean"
    )


class ConditionTimeMLP(ClassTimeMLP):
    """The class-conditional MLP whose label embedding is a learned `2 -> 32 -> 32` (SiLU) embedding.

    `(B, D)` points, `(B,)` times and `(B, 2)` standardised conditions -> `(B, D)` velocities.
    """

    def __init__(self, dim: int, width: int, emb: int = 32, cond_dim: int = 2) -> None:
        super().__init__(dim, width, emb, classes=0)
        self.label = nn.Sequential(nn.Linear(cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))


@dataclass
class Context:
    """What every run of a part shares: the split data, its conditions and labels, the classifier."""

    train: Tensor  # (4000, 784)
    digits: Tensor  # (4000,)
    held: Tensor  # (1000, 784) held-out reference digits
    held_digits: Tensor
    classifier: FeatureClassifier
    reference: Any  # Gaussian statistics of the first `eval_samples` held-out digits' features
    classifier_acc: float  # on all held-out digits
    standardise: measure.Standardiser
    cond_train: Tensor  # (4000, 2) float32 standardised (ink, slant)
    cond_held: Tensor  # (1000, 2) float64 standardised
    chance: dict[str, float]
    labels: dict[str, Tensor]  # per setting, the training labels
    held_labels: dict[str, Tensor]
    edges: Tensor  # (10, 9) ink bucket edges per digit
    held_buckets: Tensor

    @property
    def dim(self) -> int:
        """Values per item."""
        return self.train.shape[1]


def classifier_name(s: Settings) -> str:
    """The cache name: `classifier-mnist28-train4000.pt` for the pre-registered 30 epochs."""
    suffix = "" if s.classifier_epochs == 30 else f"-{s.classifier_epochs}epochs"
    return f"mnist28-train4000{suffix}"


def context(cache: Path, s: Settings, classifier: FeatureClassifier | None = None) -> Context:
    """The split, conditions, labels and the frozen classifier (trained on the training digits, cached).

    Args:
        cache: Where the classifier is cached.
        s: The settings.
        classifier: Use this one instead (`--plan` times with an untrained one, caching nothing).
    """
    data, labels = load_dataset(DATASET)
    assert labels is not None
    sp = measure.split(data.shape[0])
    train, digits, held, held_digits = (
        data[sp.train],
        labels[sp.train],
        data[sp.held_out],
        labels[sp.held_out],
    )
    clf = classifier or classifier_features(classifier_name(s), train, digits, cache, s.classifier_epochs)
    with torch.no_grad():
        reference = gaussian_stats(clf.features(held[: s.eval_samples]))
        acc = float((clf(held).argmax(1) == held_digits).float().mean())
    raw_train, raw_held = measure.ink_and_slant(train), measure.ink_and_slant(held)
    std = measure.Standardiser.fit(raw_train)
    edges = measure.ink_bucket_edges(raw_train[:, 0], digits)
    buckets = measure.ink_bucket(raw_train[:, 0], digits, edges)
    held_buckets = measure.ink_bucket(raw_held[:, 0], held_digits, edges)
    return Context(
        train=train,
        digits=digits,
        held=held,
        held_digits=held_digits,
        classifier=clf,
        reference=reference,
        classifier_acc=acc,
        standardise=std,
        cond_train=std(raw_train).float(),
        cond_held=std(raw_held),
        chance=measure.chance_level(std(raw_held)),
        labels={"classes10": digits, "classes100": measure.classes100(digits, buckets)},
        held_labels={"classes10": held_digits, "classes100": measure.classes100(held_digits, held_buckets)},
        edges=edges,
        held_buckets=held_buckets,
    )


def classes(setting: str) -> int:
    """Labels of a part (b) setting (the null label is this number)."""
    return {"classes10": 10, "classes100": 100}[setting]


def pool_batches(arm: str) -> int:
    """Training batches per coupled pool (`within-pk`: k; every other arm: 1)."""
    return int(arm.split("-p")[1]) if arm.startswith("within-p") else 1


def couple_pool(
    spec: CouplingSpec, x0s: list[Tensor], noises: list[Tensor], labels: list[Tensor]
) -> tuple[list[Tensor], CouplingResult]:
    """Couples a pool of consecutive training batches within classes in one call, split back per batch.

    The pool's noise is its batches' draws concatenated; every item stays in its own batch.

    Returns:
        Each batch's coupled noise, and the pool's result (its `prior_skew` is the pool's).
    """
    res = spec.couple(torch.cat(x0s), torch.cat(noises), torch.cat(labels))
    return list(res.noise.split([x.shape[0] for x in x0s])), res


def couple_a(
    arm: str, x0: Tensor, noise: Tensor, cond: Tensor, s: Settings, knn_gen: torch.Generator
) -> tuple[Tensor, dict[str, Any]]:
    """Part (a): one batch's coupled noise and its diagnostics (the runner's leak and the library's)."""
    if arm == "independent":
        res = NONE.couple(x0, noise)
    elif arm == "ot":
        res = dataclasses.replace(LSA, within_condition=False).couple(x0, noise, cond)
    elif arm == "ot-cond":
        res = ot_cond_spec(s).couple(x0, noise, cond)
    elif arm == "knn":
        extra = torch.randn(x0.shape[0], s.knn_candidates - 1, x0.shape[1], generator=knn_gen)
        res = KNN.couple(x0, torch.cat([noise[:, None], extra], dim=1))
    else:
        raise ValueError(f"unknown part (a) arm {arm!r}")
    diag = {
        "leak": measure.condition_leak(x0, cond, res.noise),
        "library_leak": getattr(res, "condition_leak", None),
        "reduction": res.reduction_pct,
        "w": getattr(res, "condition_weight", None),
        "r": getattr(res, "candidate_share", None),
    }
    return res.noise, diag


def couple_b(
    arm: str, x0s: list[Tensor], noises: list[Tensor], labels: list[Tensor]
) -> tuple[list[Tensor], dict[str, Any]]:
    """Part (b): a pool's coupled noise per batch, its `prior_skew` and reduction, and each batch's skew."""
    if arm == "independent":  # a pool of one batch: the statistic per batch
        res = NONE.couple(x0s[0], noises[0], labels[0])
        coupled = [res.noise]
    else:
        coupled, res = couple_pool(LSA, x0s, noises, labels)
    per_batch = [
        prior_skew(x, y, *class_noise_means(n, y)) for x, y, n in zip(x0s, labels, coupled, strict=True)
    ]
    return coupled, {"prior_skew": res.prior_skew, "reduction": res.reduction_pct, "batch_skews": per_batch}


@torch.no_grad()
def evaluate(
    part: str, setting: str, model: nn.Module, noise: Tensor, s: Settings, ctx: Context
) -> list[dict[str, Any]]:
    """Samples for the held-out digits' conditions (one per digit) and scores them, per cell."""
    n, clf, rows = noise.shape[0], ctx.classifier, []
    model.eval()
    if part == "a":
        cond, cond32 = ctx.cond_held[:n], ctx.cond_held[:n].float()
        for k in s.sampler_steps:
            x = integrate(lambda x, t: model(x, t, cond32), noise, k).clamp(-1, 1)
            measured = ctx.standardise(measure.ink_and_slant(x))
            fid = frechet(clf.features(x), ctx.reference)
            rows.append({"euler_steps": k, "fid_clf": fid, **measure.faithfulness(measured, cond)})
    else:
        y, digits = ctx.held_labels[setting][:n], ctx.held_digits[:n]
        for w in s.guidance:
            for k in s.sampler_steps:
                x = integrate(guided(model, y, w, classes(setting)), noise, k).clamp(-1, 1)
                row = {"guidance": w, "euler_steps": k, "fid_clf": frechet(clf.features(x), ctx.reference)}
                row["class_acc"] = float((clf(x).argmax(1) == digits).float().mean())
                if setting == "classes100":
                    bucket = measure.ink_bucket(measure.ink_and_slant(x)[:, 0], digits, ctx.edges)
                    row["bucket_hit"] = float((bucket == ctx.held_buckets[:n]).float().mean())
                rows.append(row)
    model.train()
    return rows


def _mean(xs: list[float | None]) -> float | None:
    kept = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(kept) if kept else None


def _summaries(part: str, diags: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """A run's per-batch (part a) or per-pool (part b) diagnostics, summarised for its record."""
    out: dict[str, Any] = {"reduction_pct_mean": _mean([d["reduction"] for d in diags])}
    if part == "b":
        skews = [d["prior_skew"] for d in diags if d["prior_skew"] is not None]
        batch = [x for d in diags for x in d["batch_skews"] if x is not None]
        out |= {"prior_skew_mean": _mean(skews), "prior_skew_pools": len(skews)}
        return out | {"prior_skew_batch_mean": _mean(batch), "prior_skew_batches": len(batch)}
    leaks = [d["leak"] for d in diags]
    out |= {"leak_mean": _mean(leaks), "leak_sd": statistics.stdev(leaks) if len(leaks) > 1 else None}
    out |= {"leak_batches": len(leaks), "library_leak_mean": _mean([d["library_leak"] for d in diags])}
    gaps = [abs(d["leak"] - d["library_leak"]) for d in diags if d["library_leak"] is not None]
    out["leak_library_max_diff"] = max(gaps) if gaps else None
    for key in ("w", "r"):
        xs = [d[key] for d in diags if d[key] is not None]
        out |= {
            f"{key}_mean": _mean(xs),
            f"{key}_min": min(xs, default=None),
            f"{key}_max": max(xs, default=None),
        }
    rs = [d["r"] for d in diags if d["r"] is not None]
    out["r_off_target"] = int(sum(abs(r - s.candidate_share) > 1e-3 for r in rs)) if rs else None
    return out


def run_unit(
    part: str,
    setting: str,
    arm: str,
    seed: int,
    s: Settings,
    ctx: Context,
    trace: list[dict[str, Tensor]] | None = None,
) -> dict[str, Any]:
    """Trains one (part, setting, arm, seed), evaluates it at every checkpoint and returns its record.

    Args:
        part: `"a"` or `"b"`.
        setting: `"ink-slant"` (part a), `"classes100"` or `"classes10"`.
        arm: One of the part's arms.
        seed: The paired seed.
        s: The settings.
        ctx: The part's shared data.
        trace: If given, receives what the run drew: the evaluation noise, then per step the data
            indices, the noise drawn (before coupling), the times and the label drops.
    """
    gens = {name: stream(f"conditions-{part}", seed, name) for name in STREAMS}
    base = (
        ConditionTimeMLP(ctx.dim, s.width)
        if part == "a"
        else ClassTimeMLP(ctx.dim, s.width, classes=classes(setting))
    )
    model = init_weights(base, gens["init"])
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    eval_noise = torch.randn(s.eval_samples, ctx.dim, generator=gens["eval"])
    if trace is not None:
        trace.append({"eval_noise": eval_noise})
    conditions = ctx.cond_train if part == "a" else ctx.labels[setting]
    order, pool = measure.Order(ctx.train.shape[0], gens["data"]), pool_batches(arm)
    diags, evals, step, eval_s, start = [], [], 0, 0.0, time.perf_counter()
    while step < s.steps:
        k = min(pool, s.steps - step)
        idx = [order.take(s.batch) for _ in range(k)]
        noises = [torch.randn(s.batch, ctx.dim, generator=gens["noise"]) for _ in range(k)]
        x0s, conds = [ctx.train[i] for i in idx], [conditions[i] for i in idx]
        if part == "a":
            coupled, diag = couple_a(arm, x0s[0], noises[0], conds[0], s, gens["knn"])
            coupled = [coupled]
        else:
            coupled, diag = couple_b(arm, x0s, noises, conds)
        diags.append(diag)
        for x0, noise, drawn, c, i in zip(x0s, coupled, noises, conds, idx, strict=True):
            step += 1
            t = torch.rand(s.batch, generator=gens["time"])
            if part == "b":  # dropped items kept their class for the coupling
                drop = torch.rand(s.batch, generator=gens["drop"]) < s.cond_drop
                c = torch.where(drop, torch.full_like(c, classes(setting)), c)
            if trace is not None:
                trace.append(
                    {"index": i, "noise": drawn, "time": t} | ({"drop": drop} if part == "b" else {})
                )
            loss = flow_matching_loss(lambda x, tt, c=c: model(x, tt, c), x0, noise, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in s.checkpoints:
                tick = time.perf_counter()
                evals += [{"step": step, **row} for row in evaluate(part, setting, model, eval_noise, s, ctx)]
                eval_s += time.perf_counter() - tick
    return {
        "part": part,
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "settings": asdict(s),
        "train_s": time.perf_counter() - start - eval_s,
        "eval_s": eval_s,
        "pools": len(diags),
        **_summaries(part, diags, s),
        "classifier_heldout_acc": ctx.classifier_acc,
        "chance": ctx.chance if part == "a" else None,
        "evals": evals,
    }


def units(part: str, s: Settings) -> list[tuple[str, str, int]]:
    """Every (setting, arm, seed) of a part, seed-major (paired seeds finish together)."""
    return [
        (setting, arm, seed)
        for seed in range(s.seeds)
        for setting, arms in PARTS[part].items()
        for arm in arms
    ]


def run_sweep(args: argparse.Namespace, s: Settings) -> list[Path]:
    """Runs the part's runs that have no record yet; stops between runs after `--max-minutes`."""
    records, prov = args.out / "records", rec.provenance()
    rec.check_can_add(records, prov, args.part, asdict(s))  # before any training
    deadline, ctx, done = clock() + 60 * args.max_minutes, None, []
    for setting, arm, seed in units(args.part, s):
        path = rec.record_path(records, args.part, setting, arm, seed)
        if path.exists():
            continue
        if clock() > deadline:
            print(f"--max-minutes reached; rerun the same command to resume ({path.name} next).")
            return done
        ctx = ctx or context(args.out / "cache", s)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = run_unit(args.part, setting, arm, seed, s, ctx)
        rec.check_can_add(records, prov, args.part, asdict(s))  # another process may have written
        rec.write(path, {**record, "provenance": prov, "started": started})
        print(f"{path.name}: {record['train_s']:.0f} s training, {record['eval_s']:.0f} s evaluation")
        done.append(path)
    return done


def plan(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """Prints the runs left and an estimate from 20 timed steps and one evaluation of each arm left."""
    records = args.out / "records"
    todo = [u for u in units(args.part, s) if not rec.record_path(records, args.part, *u).exists()]
    cached = (args.out / "cache" / f"classifier-{classifier_name(s)}.pt").exists()
    ctx = context(args.out / "cache", s, None if cached else FeatureClassifier(784).requires_grad_(False))
    timing = dataclasses.replace(s, seeds=1, steps=20, checkpoints=(20,))
    per_run: dict[tuple[str, str], float] = {}
    for setting, arm in dict.fromkeys((setting, arm) for setting, arm, _ in todo):
        run_unit(args.part, setting, arm, 0, timing, ctx)  # untimed: settles solver="auto"'s race
        timed = run_unit(args.part, setting, arm, 0, timing, ctx)
        train = s.steps * timed["train_s"] / timing.steps
        per_run[setting, arm] = train + len(s.checkpoints) * timed["eval_s"]
        print(f"{setting} {arm}: {1000 * timed['train_s'] / timing.steps:.1f} ms/step, one evaluation "
              f"{timed['eval_s']:.1f} s, about {per_run[setting, arm]:.0f} s per run")  # fmt: skip
    minutes = sum(per_run[setting, arm] for setting, arm, _ in todo) / 60 + (0 if cached else 1)
    total = len(units(args.part, s))
    print(f"part ({args.part}): {len(todo)} of {total} runs left in {records}")
    print(f"estimate: {minutes:.0f} min" + ("" if cached else " (including about 1 min for the classifier)"))
    return {"left": len(todo), "total": total, "per_run_s": per_run, "minutes": minutes}


def write_report(args: argparse.Namespace) -> dict[str, Any]:
    """Writes the part's report from its finished records (nothing is trained)."""
    text, result = render(rec.load(args.out / "records"), args.part)
    path = args.report_path or args.out / f"report-{args.part}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path} ({result['records']} records)")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="records/ and cache/ (default: experiments/conditions_fm; --tiny: runs/conditions_fm_tiny)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop between runs after this"
    )
    parser.add_argument("--plan", action="store_true", help="print the runs left and a timed estimate")
    parser.add_argument("--report", action="store_true", help="only write the comparisons")
    parser.add_argument("--report-path", type=Path, default=None, help="default: OUT/report-PART.md")
    parser.add_argument("--tiny", action="store_true", help="a smoke test, NOT the pre-registered run")
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Runs, plans or reports, as the command line says."""
    args = build_parser().parse_args(argv)
    s = TINY if args.tiny else Settings()
    if args.out is None:
        args.out = ROOT / ("runs/conditions_fm_tiny" if args.tiny else "experiments/conditions_fm")
    if args.plan:
        return plan(args, s)
    if args.report:
        return write_report(args)
    return run_sweep(args, s)


if __name__ == "__main__":
    main()
