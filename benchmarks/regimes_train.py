"""Training side of the regimes sweep: data sources, paired random streams, coupling arms, tiny models.

Every arm of one (dataset, seed) draws the same data indices, the same noise pool, the same
training times and the same initial weights, each from its own `torch.Generator` seeded from
(dataset, seed, stream name); the arms differ only in how the pool's noise is paired with the data.
The coupling happens on blocks of `block` items (the largest pool) that the next `block / batch`
optimizer steps consume in order, so a pool larger than the per-step batch couples items that
several steps (or, under DDP, several ranks) train on.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from example_projects.flow_matching.objective import flow_matching_loss
from example_projects.flow_matching.samplers import integrate
from example_projects.flow_matching.targets2d import eight_gaussians
from lightning_immiscible import couple
from lightning_immiscible.costs import paired_distance

DIMS = {"2d": 2, "digits64": 64, "mnist14": 196, "mnist28": 784}
ARM_METHODS = ("none", "lsa-l2", "lsa-sq", "knn", "normctrl")


@dataclass(frozen=True)
class Arm:
    """One coupling arm: `name` is `none`, `lsa-l2-p64`, `lsa-sq-p1024`, `knn4` or `normctrl`."""

    name: str
    method: str
    metric: str = "l2"
    pool: int = 0
    k: int = 4

    @staticmethod
    def parse(name: str) -> Arm:
        if name in ("none", "normctrl"):
            return Arm(name, name)
        if name.startswith("knn"):
            return Arm(name, "knn", k=int(name[3:]))
        method, metric, pool = name.split("-")
        if method != "lsa" or metric not in ("l2", "sq") or not pool.startswith("p"):
            raise ValueError(f"Unknown arm {name!r}: use none, normctrl, knnK or lsa-{{l2,sq}}-pP.")
        return Arm(name, "lsa", "sqeuclidean" if metric == "sq" else "l2", int(pool[1:]))


@dataclass
class Settings:
    """What one training unit (dataset, arm, seed) does; identical for every arm of a dataset."""

    dataset: str
    steps: int
    batch: int = 256
    block: int = 1024
    width: int = 256
    lr: float = 1e-3
    eval_at: tuple[int, ...] = ()
    eval_samples: int = 1000
    sampler_steps: tuple[int, ...] = (1, 2, 4, 8)
    objectives: tuple[str, ...] = ("fm", "ddpm")
    control_k: int = 4
    solver: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block % self.batch:
            raise ValueError(f"block ({self.block}) must be a multiple of batch ({self.batch}).")
        self.eval_at = tuple(self.eval_at) or (self.steps,)


def load_dataset(name: str) -> tuple[Tensor, Tensor | None]:
    """`(N, D)` float data (images in [-1, 1]) and labels (`None` for 2-D points)."""
    if name == "2d":  # a fixed finite sample of the target, so every source streams the same way
        return eight_gaussians(20000, torch.Generator().manual_seed(20240601)), None
    if name == "digits64":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0
        return x, torch.as_tensor(digits.target, dtype=torch.long)
    if name in ("mnist14", "mnist28"):
        from example_projects.common.data import mnist5k_tensor

        images, labels = mnist5k_tensor(int(name[5:]))
        return images.flatten(1), labels
    raise ValueError(f"Unknown dataset {name!r}; choose from {sorted(DIMS)}.")


def reference_sample(name: str, data: Tensor, n: int) -> Tensor:
    """`(n, D)` fixed real sample the generated samples are compared with (same for every arm)."""
    g = torch.Generator().manual_seed(7)
    if name == "2d":  # fresh target points, not the training sample
        return eight_gaussians(n, g)
    return data[torch.randperm(data.shape[0], generator=g)[:n]]


def stream(dataset: str, seed: int, name: str) -> torch.Generator:
    """A generator for one random stream of one paired seed (independent of the arm)."""
    digest = hashlib.sha256(f"{dataset}/{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class TimeMLP(nn.Module):
    """`(B, D)` points and `(B,)` times in [0, 1] -> `(B, D)`: a small MLP with a sinusoidal time input."""

    def __init__(self, dim: int, width: int, depth: int = 3, emb: int = 32) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), emb // 2)))
        layers: list[nn.Module] = []
        sizes = [dim + emb] + [width] * depth
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angle = t.float()[:, None] * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))


def make_model(dim: int, width: int, generator: torch.Generator) -> TimeMLP:
    """A `TimeMLP` whose weights come from `generator` only (PyTorch's default uniform bounds)."""
    model = TimeMLP(dim, width)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def alpha_bar(t: Tensor) -> Tensor:
    """Cosine schedule `cos^2(pi t / 2)`, kept in [1e-3, 1] so the 1-step DDIM inverse is defined."""
    return torch.cos(t * math.pi / 2).square().clamp(1e-3, 1.0)


def ddpm_loss(model: nn.Module, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Epsilon-prediction loss with the same `noise` building `x_t` and the target."""
    ab = alpha_bar(t)[:, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return (model(xt, t) - noise).square().mean()


def ddim_path(model: nn.Module, noise: Tensor, steps: int, clip: tuple[float, float]) -> Tensor:
    """Deterministic DDIM from `t = 1` to `0`: `(steps + 1, n, D)` path; x0 estimates clipped to `clip`."""
    grid = torch.linspace(1.0, 0.0, steps + 1)
    x, path = noise, [noise]
    for t, s in itertools.pairwise(grid):
        ab_t, ab_s = alpha_bar(t), alpha_bar(s) if s > 0 else torch.tensor(1.0)
        eps = model(x, x.new_full((x.shape[0],), float(t)))
        x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(*clip)
        x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
        path.append(x)
    return torch.stack(path)


def sample_path(
    objective: str, model: nn.Module, noise: Tensor, steps: int, clip: tuple[float, float]
) -> Tensor:
    """`(steps + 1, n, D)` deterministic sampling path of either objective, noise first."""
    with torch.no_grad():
        if objective == "fm":
            return integrate(model, noise, steps, return_path=True)
        return ddim_path(model, noise, steps, clip)


def training_loss(objective: str, model: nn.Module, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    if objective == "fm":
        return flow_matching_loss(model, x0, noise, t)
    return ddpm_loss(model, x0, noise, t)


@dataclass
class Block:
    """One block of the shared streams: data indices `(n,)`, data `(n, D)`, noise `(n, D)`, times `(n,)`."""

    index: Tensor
    x0: Tensor
    noise: Tensor
    t: Tensor


def draw_block(data: Tensor, gens: dict[str, torch.Generator], n: int) -> Block:
    """The next block of the arm-independent streams (data order, noise pool, training times)."""
    index = torch.randint(data.shape[0], (n,), generator=gens["data"])
    noise = torch.randn(n, data.shape[1], generator=gens["noise"])
    return Block(index, data[index], noise, torch.rand(n, generator=gens["time"]))


def _pct(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before > 0 else 0.0


def _lsa_chunks(arm: Arm, x0: Tensor, noise: Tensor, solver: str) -> tuple[Tensor, float]:
    """Couples consecutive chunks of `arm.pool` items independently; returns noise and reduction %."""
    out, before, after = [], 0.0, 0.0
    for start in range(0, x0.shape[0], arm.pool):
        res = couple(
            x0[start : start + arm.pool],
            noise[start : start + arm.pool],
            method="lsa",
            metric=arm.metric,
            solver=solver,
        )
        out.append(res.noise)
        before, after = before + res.cost_before, after + res.cost_after
    return torch.cat(out), _pct(before, after)


def norm_matched_noise(noise: Tensor, data: Tensor, gen: torch.Generator, k: int) -> Tensor:
    """`noise`'s directions with the norms `knn` picks for an independent batch of decoy data.

    The decoys are `noise.shape[0]` items drawn from the same dataset, each with its own `k` fresh
    candidates from `gen`; `knn` selects one per decoy, and only the selected vectors' norms are kept.
    So the norms have exactly the distribution `knn` gives on this dataset, the directions are those of
    i.i.d. Gaussian noise (uniform), and nothing depends on the data item the noise is paired with.
    """
    decoys = data[torch.randint(data.shape[0], (noise.shape[0],), generator=gen)]
    candidates = torch.randn(noise.shape[0], k, noise.shape[1], generator=gen)
    norms = couple(decoys, candidates, method="knn", metric="l2").noise.norm(dim=1, keepdim=True)
    return noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms


def couple_block(
    arm: Arm, block: Block, data: Tensor, gens: dict[str, torch.Generator], solver: str
) -> tuple[Tensor, dict[str, float]]:
    """The noise this arm trains `block` with, and its coupling statistics.

    `reduction_pct` is the distance reduction in the arm's own metric, as `couple()` and the callback
    report it (0 for `none`); `reduction_l2_pct` is the same in plain L2 for every arm, comparable
    across arms. `noise_sq_norm` is the mean `||n||^2 / D` and `cos_to_data` the mean cosine between
    each item and its noise (both ~1 and ~0 for Gaussian noise independent of the data).
    """
    x0, noise = block.x0, block.noise
    reduction = 0.0
    if arm.method == "lsa":
        used, reduction = _lsa_chunks(arm, x0, noise, solver)
    elif arm.method == "knn":
        extra = torch.randn(x0.shape[0], arm.k - 1, x0.shape[1], generator=gens["knn"])
        res = couple(x0, torch.cat([noise[:, None], extra], dim=1), method="knn", metric="l2")
        used, reduction = res.noise, _pct(res.cost_before, res.cost_after)
    elif arm.method == "normctrl":
        used = norm_matched_noise(noise, data, gens["control"], arm.k)
    else:
        used = noise
    l2_before, l2_after = paired_distance(x0, noise).mean(), paired_distance(x0, used).mean()
    reduction_l2 = _pct(float(l2_before), float(l2_after))
    if arm.method == "normctrl":
        reduction = reduction_l2
    cos = torch.nn.functional.cosine_similarity(x0, used, dim=1).mean()
    stats = {
        "reduction_pct": reduction,
        "reduction_l2_pct": reduction_l2,
        "noise_sq_norm": float(used.square().mean()),
        "cos_to_data": float(cos),
    }
    return used, stats
