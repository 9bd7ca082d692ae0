"""What the conditions experiment measures on digits: the split, ink and slant, buckets, leak, errors.

Everything here follows `docs/results/conditions-preregistration.md` and is pure torch (no model,
no library call), so each piece has its own oracle in `tests/test_conditions_fm.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Each component's per-sample error is clipped here (in training SDs); no ink at all counts here.
CLIP = 5.0
#: The split: `torch.randperm(5000)` with a generator seeded 7; the first 1,000 are held out.
SPLIT_SEED = 7
HELD_OUT = 1000
#: Ink buckets per digit in `classes100` (deciles of ink within each digit).
BUCKETS = 10


@dataclass(frozen=True)
class Split:
    """Indices of the held-out reference digits and of the training digits (into the 5,000)."""

    held_out: Tensor
    train: Tensor


def split(n: int, held_out: int = HELD_OUT) -> Split:
    """The fixed split: a permutation from a generator seeded 7, its first `held_out` held out.

    Args:
        n: The number of digits (5,000).
        held_out: How many are held out (1,000).

    Returns:
        The held-out indices (the earlier runner's reference digits) and the other ones.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return Split(held_out=perm[:held_out], train=perm[held_out:])


def ink_and_slant(x: Tensor) -> Tensor:
    """`(n, 2)` float64 `(ink, slant)` of `(n, S*S)` square images in [-1, 1].

    With `p = (x + 1) / 2`, row index `r` and column index `c`: ink is `mean(p)`; slant is
    `-mu11 / mu02` with the intensity-weighted central moments `mu11 = sum p (r - r̄)(c - c̄)` and
    `mu02 = sum p (r - r̄)^2`: the horizontal shear per row, positive when the top leans right
    (rows count downward). An image without ink, or with all its ink in one row, has `mu02 = 0`
    and a NaN slant.
    """
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"images must be square, got {x.shape[1]} values per item.")
    p = ((x.double() + 1) / 2).reshape(-1, side, side)
    mass = p.sum((1, 2))
    idx = torch.arange(side, dtype=torch.float64)
    rows, cols = p.sum(2), p.sum(1)  # (n, side): mass per row, per column
    dr = idx - ((rows * idx).sum(1) / mass)[:, None]
    dc = idx - ((cols * idx).sum(1) / mass)[:, None]
    mu11 = torch.einsum("nrc,nr,nc->n", p, dr, dc)
    mu02 = (rows * dr.square()).sum(1)
    slant = torch.where(mu02 > 0, -mu11 / mu02, torch.full_like(mu02, math.nan))
    return torch.stack([p.mean((1, 2)), slant], dim=1)


@dataclass(frozen=True)
class Standardiser:
    """Each condition component's mean and SD over the training digits (SD with Bessel's correction)."""

    mean: Tensor
    sd: Tensor

    @classmethod
    def fit(cls, raw: Tensor) -> Standardiser:
        """From the `(n, 2)` raw conditions of the training digits."""
        return cls(mean=raw.mean(0), sd=raw.std(0))

    def __call__(self, raw: Tensor) -> Tensor:
        """`(n, 2)` raw conditions in training SD units around the training mean (float64)."""
        return (raw - self.mean) / self.sd


def faithfulness(measured: Tensor, requested: Tensor) -> dict[str, float]:
    """How far samples' measured conditions lie from those they were asked for (standardised units).

    Per sample and component: `|measured - requested|`, clipped at `CLIP`; a non-finite measurement
    (no ink, a slant of 0/0) counts at the clip. The error per sample is the mean over the two
    components; the metric is its mean over the samples. Beside it: each component's mean error
    and the Pearson correlation between requested and measured values over the samples whose
    measurement is finite (the unclipped values; `nonfinite` counts those left out).

    Args:
        measured: `(n, 2)` standardised `(ink, slant)` measured on the samples.
        requested: `(n, 2)` standardised conditions the samples were asked for.

    Returns:
        `faith_err`, `ink_err`, `slant_err`, `corr_ink`, `corr_slant`, `nonfinite`.
    """
    measured, requested = measured.double(), requested.double()
    finite = torch.isfinite(measured)
    gap = torch.where(finite, (measured - requested).abs().clamp(max=CLIP), CLIP)
    out = {"faith_err": float(gap.mean(1).mean()), "ink_err": float(gap[:, 0].mean())}
    out["slant_err"] = float(gap[:, 1].mean())
    for j, name in enumerate(("corr_ink", "corr_slant")):
        keep = finite[:, j]
        out[name] = pearson(measured[keep, j], requested[keep, j])
    out["nonfinite"] = int((~finite).any(1).sum())
    return out


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two `(n,)` samples (NaN with fewer than two or no spread)."""
    if a.numel() < 2:
        return math.nan
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def derangement(n: int) -> Tensor:
    """The fixed derangement of the chance level: item `i` is compared with item `i + 1` (cyclic)."""
    if n < 2:
        raise ValueError("a derangement needs at least two items.")
    return torch.roll(torch.arange(n), -1)


def chance_level(held_out_std: Tensor) -> dict[str, float]:
    """The faithfulness error of each held-out digit's measured condition against another's request."""
    return faithfulness(held_out_std, held_out_std[derangement(held_out_std.shape[0])])


def condition_leak(x0: Tensor, condition: Tensor, noise: Tensor) -> float:
    """The pre-registered leak of a batch's coupled noise toward what its conditions predict.

    Centre the batch's data and conditions, fit the data on the conditions by least squares
    (`v_i`: item `i`'s fitted data offset) and return `sum_i <noise_i, v_i> / sqrt(sum_i |v_i|^2)`
    (float64). Exactly `N(0, 1)` when the noise is i.i.d. `N(0, I)` and independent of data and
    conditions.

    Args:
        x0: `(B, D)` data.
        condition: `(B, C)` conditions (here the standardised `(ink, slant)`).
        noise: `(B, D)` the noise paired with each item.

    Returns:
        The leak (NaN when the conditions explain nothing: `v = 0`).
    """
    x = x0.double().flatten(1)
    c = condition.double().reshape(condition.shape[0], -1)
    x, c = x - x.mean(0), c - c.mean(0)
    coef = torch.linalg.lstsq(c, x, driver="gelsd").solution  # (C, D)
    v = c @ coef
    norm = float(v.norm())
    return float((noise.double().flatten(1) * v).sum()) / norm if norm > 0 else math.nan


def ink_bucket_edges(ink: Tensor, digits: Tensor, buckets: int = BUCKETS) -> Tensor:
    """`(10, buckets - 1)` inner edges: the deciles of ink within each digit (from training digits)."""
    qs = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]
    return torch.stack([torch.quantile(ink[digits == d].double(), qs) for d in range(10)])


def ink_bucket(ink: Tensor, digits: Tensor, edges: Tensor) -> Tensor:
    """`(n,)` bucket of each ink within its digit: how many of that digit's inner edges are <= it."""
    return (ink.double()[:, None] >= edges[digits].double()).sum(1)


def classes100(digits: Tensor, buckets: Tensor) -> Tensor:
    """The `classes100` label: digit x 10 ink buckets (`10 * digit + bucket`)."""
    return digits * BUCKETS + buckets


class Order:
    """The data order: successive random permutations of `n` items, cut into batches.

    A batch may straddle two permutations. Draws come from `generator` only.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.left = torch.empty(0, dtype=torch.long)

    def take(self, batch: int) -> Tensor:
        """The next `batch` indices."""
        while self.left.numel() < batch:
            self.left = torch.cat([self.left, torch.randperm(self.n, generator=self.generator)])
        out, self.left = self.left[:batch], self.left[batch:]
        return out
