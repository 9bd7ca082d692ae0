"""One unit of the regimes sweep: train every objective of one (dataset, arm, seed) and score it.

A unit trains one model per objective (flow matching, DDPM epsilon-prediction) side by side on the
same batches and the same coupled noise, and evaluates them at fixed steps with 1, 2, 4 and 8
deterministic sampler steps from a fixed evaluation noise. The record it returns holds fingerprints
(SHA-256) of everything the arms of a seed must share, so pairing is checkable after the fact.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from regimes_metrics import (
    classifier_features,
    energy_distance,
    frechet,
    gaussian_stats,
    path_straightness,
    sliced_w2,
    w2_exact,
)
from regimes_train import (
    DIMS,
    Arm,
    Settings,
    couple_block,
    draw_block,
    load_dataset,
    make_model,
    reference_sample,
    sample_path,
    stream,
    training_loss,
)
from torch import Tensor

STREAMS = ("data", "noise", "time", "knn", "control", "eval", "init-fm", "init-ddpm")


@dataclass
class DatasetContext:
    """Fixed per dataset: data `(N, D)`, reference sample `(n, D)`, classifier and its reference features."""

    name: str
    data: Tensor
    reference: Tensor
    clip: tuple[float, float]
    classifier: torch.nn.Module | None = None
    reference_stats: tuple | None = None


def dataset_context(name: str, eval_samples: int, cache: Path) -> DatasetContext:
    data, labels = load_dataset(name)
    ref = reference_sample(name, data, eval_samples)
    ctx = DatasetContext(name, data, ref, (float(data.min()), float(data.max())))
    if labels is not None:
        ctx.classifier = classifier_features(name, data, labels, cache)
        with torch.no_grad():  # the whole dataset's feature statistics, computed once
            ctx.reference_stats = gaussian_stats(ctx.classifier.features(data))
    return ctx


def score(ctx: DatasetContext, path: Tensor, straightness: bool) -> dict[str, float]:
    """Metrics of one sampling path `(K + 1, n, D)` (noise first): quality of its end, straightness.

    Straightness (per dimension) is only meaningful on the finest path: a 1-step path is straight.
    """
    x = path[-1]
    if not torch.isfinite(x).all():
        return {"sw2": float("inf"), "energy": float("inf")}
    out = {"sw2": sliced_w2(x, ctx.reference), "energy": energy_distance(x, ctx.reference)}
    if straightness:
        out["straightness"] = path_straightness(path) / x.shape[1]
    if ctx.name == "2d":
        out["w2"] = w2_exact(x, ctx.reference)
    elif ctx.classifier is not None:
        with torch.no_grad():
            feats = ctx.classifier.features(x.clamp(*ctx.clip))
        out["fd"] = frechet(feats, ctx.reference_stats)
    return out


def _hash_tensor(h: Any, t: Tensor) -> None:
    h.update(t.detach().contiguous().cpu().numpy().tobytes())


def _evaluate(ctx: DatasetContext, settings: Settings, models: dict, eval_noise: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for objective, model in models.items():
        model.eval()
        out[objective] = {
            str(k): score(
                ctx, sample_path(objective, model, eval_noise, k, ctx.clip), k == max(settings.sampler_steps)
            )
            for k in settings.sampler_steps
        }
        model.train()
    return out


def run_unit(ctx: DatasetContext, settings: Settings, arm: Arm, seed: int) -> dict[str, Any]:
    """Trains and scores one (dataset, arm, seed); returns the JSON-ready record."""
    start = time.perf_counter()
    gens = {name: stream(ctx.name, seed, name) for name in STREAMS}
    hashes = {name: hashlib.sha256() for name in ("init", "data", "noise", "time", "eval")}
    models = {
        obj: make_model(ctx.data.shape[1], settings.width, gens[f"init-{obj}"]) for obj in settings.objectives
    }
    for model in models.values():
        for p in model.parameters():
            _hash_tensor(hashes["init"], p)
    opts = {obj: torch.optim.Adam(m.parameters(), lr=settings.lr) for obj, m in models.items()}
    eval_noise = torch.randn(settings.eval_samples, ctx.data.shape[1], generator=gens["eval"])
    _hash_tensor(hashes["eval"], eval_noise)
    losses: dict[str, list[float]] = {obj: [] for obj in models}
    coupling: list[dict[str, float]] = []
    evals: dict[str, dict[str, Any]] = {obj: {} for obj in models}
    timing = {"couple_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    step = 0
    while step < settings.steps:
        block = draw_block(ctx.data, gens, settings.block)
        for name, t in (("data", block.index), ("time", block.t), ("noise", block.noise[:, :8])):
            _hash_tensor(hashes[name], t)
        tick = time.perf_counter()
        noise, stats = couple_block(arm, block, ctx.data, gens, settings.solver)
        timing["couple_s"] += time.perf_counter() - tick
        coupling.append(stats)
        for rows in torch.arange(settings.block).split(settings.batch):
            tick = time.perf_counter()
            for obj, model in models.items():
                loss = training_loss(obj, model, block.x0[rows], noise[rows], block.t[rows])
                opts[obj].zero_grad(set_to_none=True)
                loss.backward()
                opts[obj].step()
                losses[obj].append(loss.item())
            timing["train_s"] += time.perf_counter() - tick
            step += 1
            if step in settings.eval_at:
                tick = time.perf_counter()
                for obj, scores in _evaluate(ctx, settings, models, eval_noise).items():
                    evals[obj][str(step)] = scores
                timing["eval_s"] += time.perf_counter() - tick
            if step >= settings.steps:
                break
    return _record(
        ctx, settings, arm, seed, hashes, coupling, losses, evals, timing, time.perf_counter() - start
    )


def _record(ctx, settings, arm, seed, hashes, coupling, losses, evals, timing, seconds) -> dict[str, Any]:
    late = {obj: v[len(v) // 2 :] for obj, v in losses.items()}
    objectives = {
        obj: {
            "loss_mean": statistics.mean(late[obj]),
            "loss_var": statistics.variance(late[obj]) if len(late[obj]) > 1 else 0.0,
            "evals": evals[obj],
        }
        for obj in losses
    }
    return {
        "dataset": ctx.name,
        "dim": DIMS[ctx.name],
        "arm": arm.name,
        "seed": seed,
        "settings": asdict(settings),
        "fingerprint": {name: h.hexdigest() for name, h in hashes.items()},
        "coupling": {key: statistics.mean(s[key] for s in coupling) for key in coupling[0]},
        "objectives": objectives,
        "timing": timing,
        "seconds": seconds,
    }
