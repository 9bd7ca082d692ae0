"""Data-noise cost matrices: the distances the assignment minimises (pure torch, no Lightning).

The cost matrix is one matmul (`||x||^2 + ||n||^2 - 2 x.n`), never a `(b, B, D)` broadcast
tensor; half-precision inputs are norm-scaled so that fp16 cannot overflow. The squared norms it
is built from also serve as the inputs' NaN/Inf and overflow check, and the distances of the
chosen pairs are read back from the matrix
([assigned_distances][lightning_immiscible.costs.assigned_distances]): a coupling reads each input
tensor once for its checks.

Every function here reads its inputs detached: the costs and distances carry no autograd graph, and
inputs that require grad (an encoder's output) are read, never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Metric = Literal["l2", "sqeuclidean", "l1"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

METRICS: tuple[Metric, ...] = get_args(Metric)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises a `ValueError` naming the valid `choices` when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


#: Bound on a squared norm (or an l1 sum) below which fp32 costs are safe: fp32's largest value is
#: 3.4e38, and a squared distance is at most twice the sum of two squared norms.
FP32_COST_LIMIT = 1e37

#: The same bound for float64 costs (float64's largest value is 1.8e308): data whose costs could
#: exceed it cannot be costed at all (see `cost_bound`).
FP64_COST_LIMIT = 1e307

#: A pair's squared distance read from the GEMM form is trusted when it is at least this fraction of
#: the pair's squared norms (then rounding costs at most a few units of the dtype's precision,
#: relative); closer pairs are recomputed from their differences.
CANCELLATION_RATIO = 0.25


def value_ranges(*tensors: Tensor) -> list[tuple[float, float]]:
    """`(min, max)` of each tensor, in one pass over each and one device sync for all.

    NaN anywhere shows as NaN and an infinity as `inf`/`-inf` (`torch.aminmax` propagates them), so
    the same numbers serve the NaN/Inf check and the overflow decision. An empty tensor gives
    `(0.0, 0.0)`.
    """
    stats = [torch.stack(torch.aminmax(t.detach())).double() if t.numel() else None for t in tensors]
    found = [s for s in stats if s is not None]
    found = [s.to(found[0].device) for s in found]  # inputs on two devices: two numbers move
    values = iter(torch.cat(found).tolist() if found else [])
    return [(next(values), next(values)) if s is not None else (0.0, 0.0) for s in stats]


def cost_bound(ranges: list[tuple[float, float]], dim: int, metric: str) -> float:
    """An upper bound on every cost entry (and on every intermediate of the GEMM form).

    `dim * (max|x| + max|n|)` for `l1`, its square times `dim` otherwise: a squared distance over
    `dim` values is at most `dim` times the largest squared difference of two values. `inf` for a
    non-finite range (NaN/Inf inputs) or a bound beyond float64.

    Args:
        ranges: `(min, max)` of each input ([value_ranges][lightning_immiscible.costs.value_ranges]).
        dim: Values per item.
        metric: One of `METRICS`.
    """
    reach = sum(max(abs(low), abs(high)) for low, high in ranges)
    return dim * reach if metric == "l1" else dim * reach * reach  # float products overflow to inf


def range_cost_dtype(ranges: list[tuple[float, float]], dim: int, metric: str, wide: bool) -> torch.dtype:
    """[cost_dtype][lightning_immiscible.costs.cost_dtype]'s rule on precomputed `value_ranges`.

    A non-finite range (NaN/Inf inputs) gives float32, or float64 when `wide`: the input checks
    raise for such inputs before any cost is built.
    """
    if wide:
        return torch.float64
    return torch.float64 if cost_bound(ranges, dim, metric) > FP32_COST_LIMIT else torch.float32


def cost_dtype(x: Tensor, noise: Tensor, metric: str = "l2") -> torch.dtype:
    """The dtype in which the costs of `x` against `noise` are computed.

    float64 when either input is float64 (its precision is kept: near-identical rows stay apart)
    or when fp32 costs could overflow (entries so large that `D * (max|x| + max|n|)^2`, or the
    `l1` sum `D * (max|x| + max|n|)`, exceeds
    [FP32_COST_LIMIT][lightning_immiscible.costs.FP32_COST_LIMIT]); float32 otherwise. Costs one
    pass over the inputs for their largest magnitude (one device sync).

    Args:
        x: `(b, *dims)` data.
        noise: `(B, *dims)` noise.
        metric: One of `METRICS`.

    Returns:
        `torch.float64` or `torch.float32`.
    """
    if torch.float64 in (x.dtype, noise.dtype):
        return torch.float64
    if not x.numel() or not noise.numel():
        return torch.float32
    return range_cost_dtype(value_ranges(x, noise), x[0].numel(), metric, wide=False)


def norm_checked_dtype(x: Tensor, noise: Tensor) -> tuple[torch.dtype, tuple[Tensor, Tensor]] | None:
    """The `l2`/`sqeuclidean` cost's dtype and both inputs' squared norms, when the norms vouch for it.

    The norms the cost is built from are the inputs' check: a NaN or an infinity makes a row's
    norm non-finite, and the largest norms bound every cost entry (a squared distance is at most
    `2 (||x||^2 + ||n||^2)`). So float64 inputs keep float64 while
    `max ||x||^2 + max ||n||^2 <= FP64_COST_LIMIT`, and fp32 is used while that sum is at most
    `FP32_COST_LIMIT`: one pass over each input and one device sync.

    Args:
        x: `(b, *dims)` data.
        noise: `(B, *dims)` noise.

    Returns:
        `(dtype, (x_sq, n_sq))`, or `None` when a norm is not finite or too large for the dtype:
        then the inputs hold NaN/Inf, values that need float64, or values too large for any cost (a
        scan with [value_ranges][lightning_immiscible.costs.value_ranges] tells which).
    """
    wide = torch.float64 in (x.dtype, noise.dtype)
    dtype = torch.float64 if wide else torch.float32
    norms = squared_norms(x, dtype), squared_norms(noise, dtype)
    top = torch.stack([norms[0].max(), norms[1].max()]).tolist()
    limit = FP64_COST_LIMIT if wide else FP32_COST_LIMIT
    if all(math.isfinite(v) for v in top) and sum(top) <= limit:
        return dtype, norms
    return None


def resolve_precision(precision: str, device: torch.device, base: torch.dtype = torch.float32) -> torch.dtype:
    """Maps a `precision` name to the dtype of the cost matrix's matmul inputs.

    `auto` is fp16 on CUDA (tensor cores; inputs are norm-scaled so fp16 cannot overflow) and the
    cost's own dtype `base` elsewhere (half-precision matmul is several times slower than fp32 on
    CPUs). float64 costs (float64 inputs) keep a float64 matmul under `auto`.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return torch.float16 if device.type == "cuda" and base == torch.float32 else base
    return _HALF.get(precision, torch.float32)


def _gram(x: Tensor, n: Tensor, dtype: torch.dtype) -> Tensor:
    """`x @ n.T` in `x`'s dtype, `(b, B)`; a narrower matmul `dtype` sees normalised rows.

    Each row is divided by its norm before the cast, so every reduced-precision product lies in
    [-1, 1] (no overflow, full mantissa used); the norms are multiplied back in the wide dtype.
    """
    if dtype == x.dtype:
        return x @ n.T
    tiny = torch.finfo(x.dtype).tiny
    xn = torch.linalg.vector_norm(x, dim=1).clamp_min(tiny)
    nn_ = torch.linalg.vector_norm(n, dim=1).clamp_min(tiny)
    unit = (x / xn[:, None]).to(dtype) @ (n / nn_[:, None]).to(dtype).T
    return unit.to(x.dtype) * xn[:, None] * nn_[None, :]


@dataclass(frozen=True)
class CostRows:
    """Cost rows and the squared norms they were built from.

    Attributes:
        cost: `(b, B)` costs `C[i, j] = metric(x[i], noise[j])`.
        x_sq: `(b,)` squared norms of the data rows in the cost's dtype (`None` for `l1`).
        n_sq: `(B,)` squared norms of the noise rows (`None` for `l1`).
        exact: Whether the cross term was computed in the cost's dtype: then `cost` holds the
            distances up to rounding; a half-precision matmul (`precision="fp16"`/`"bf16"`, or
            `"auto"` on CUDA) holds approximations of them.
    """

    cost: Tensor
    x_sq: Tensor | None = None
    n_sq: Tensor | None = None
    exact: bool = True


def squared_norms(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`(b,)` squared L2 norms of the rows of `t` (`(b, *dims)`), accumulated in `dtype`.

    One pass over `t` and no temporary of its size. A NaN or an infinity in a row gives a non-finite
    norm, so the norms double as the inputs' NaN/Inf check.
    """
    return torch.linalg.vector_norm(t.detach().reshape(t.shape[0], -1), dim=1, dtype=dtype).square_()


def cost_rows(
    x: Tensor,
    noise: Tensor,
    metric: str = "l2",
    precision: str = "auto",
    dtype: torch.dtype | None = None,
    norms: tuple[Tensor, Tensor] | None = None,
) -> CostRows:
    """[cost_matrix][lightning_immiscible.costs.cost_matrix] with the squared norms it used.

    Args:
        x: `(b, *dims)` data.
        noise: `(B, *dims)` noise.
        metric: `l2`, `sqeuclidean` or `l1`.
        precision: Matmul input precision for `l2`/`sqeuclidean`.
        dtype: The cost's dtype (`None`: [cost_dtype][lightning_immiscible.costs.cost_dtype]).
        norms: `(b,)` and `(B,)` squared norms of `x` and `noise` in `dtype`, when the caller has
            them already ([squared_norms][lightning_immiscible.costs.squared_norms]).

    Returns:
        The [CostRows][lightning_immiscible.costs.CostRows].
    """
    check_choice("metric", metric, METRICS)
    x, noise = x.detach(), noise.detach()  # no graph through the costs; the inputs stay as they are
    dtype = dtype or cost_dtype(x, noise, metric)
    xf = x.reshape(x.shape[0], -1).to(dtype)
    nf = noise.reshape(noise.shape[0], -1).to(dtype)
    if metric == "l1":
        return CostRows(torch.cdist(xf, nf, p=1.0))
    # ||x||^2 and ||n||^2 in the cost's dtype: only the cross term sees a reduced precision.
    x_sq, n_sq = norms if norms is not None else (squared_norms(xf, dtype), squared_norms(nf, dtype))
    matmul = resolve_precision(precision, x.device, dtype)
    outer = x_sq[:, None] + n_sq[None, :]
    if matmul == dtype:  # one GEMM accumulating into the norms' sum: no (b, B) temporaries
        cost = outer.addmm_(xf, nf.T, alpha=-2.0)
    else:
        cost = outer.sub_(2.0 * _gram(xf, nf, matmul))
    cost.clamp_min_(0.0)
    return CostRows(cost.sqrt_() if metric == "l2" else cost, x_sq, n_sq, matmul == dtype)


def cost_matrix(
    x: Tensor, noise: Tensor, metric: str = "l2", precision: str = "auto", dtype: torch.dtype | None = None
) -> Tensor:
    """Pairwise data-noise distances, never through a `(b, B, D)` broadcast tensor.

    `l2` and `sqeuclidean` use `||x||^2 + ||n||^2 - 2 x.n` (a GEMM), whose cancellation costs
    relative precision: in float32, items that differ by less than about 1e-3 of their norm are
    not told apart. Pass float64 tensors to cost such data in float64.

    Args:
        x: `(b, *dims)` data (any float dtype).
        noise: `(B, *dims)` noise.
        metric: `l2` (Euclidean), `sqeuclidean` or `l1`.
        precision: Matmul input precision for `l2`/`sqeuclidean` (see
            [resolve_precision][lightning_immiscible.costs.resolve_precision]); `l1` always uses
            `torch.cdist` in the cost's dtype (no tensor-core path exists for it).
        dtype: The cost's dtype; `None` chooses it with
            [cost_dtype][lightning_immiscible.costs.cost_dtype] (float64 for float64 inputs or
            values large enough to overflow fp32, else float32). The ranks of a group pass the
            dtype they agreed on, so that their rows can be gathered.

    Returns:
        `(b, B)` tensor of `dtype` on `x`'s device: `C[i, j] = metric(x[i], noise[j])`.
    """
    return cost_rows(x, noise, metric, precision, dtype).cost


def assigned_distances(
    rows: CostRows | None, x: Tensor, noise: Tensor, cols: Tensor, metric: str = "l2", flipped: bool = False
) -> Tensor:
    """Distances (in `metric`) of the pairs `(x[i], noise[cols[i]])`, read from the cost rows.

    `rows` are the costs of `x` against `noise` (against `-noise` when `flipped`, the `flip`
    method's cost). Where they hold the pair's true distance up to rounding, it is read from
    them (an `O(b)` gather); otherwise the pair is recomputed from its difference, which has no
    cancellation: for pairs much closer than their norms (`CANCELLATION_RATIO`), for a
    half-precision cross term, and for `l1` against `-noise`. The result matches
    [paired_distance][lightning_immiscible.costs.paired_distance] to a few units of the cost
    dtype's precision (relative).

    Args:
        rows: `(b, B)` [CostRows][lightning_immiscible.costs.CostRows]; `None`: no cost was built
            (`method="none"`), every pair is computed from its difference.
        x: `(b, *dims)` the data the rows were built from.
        noise: `(B, *dims)` the noise (not negated for `flip`).
        cols: `(b,)` int64: the noise item paired with each row.
        metric: The metric of `rows`.
        flipped: Whether `rows` were built against `-noise`.

    Returns:
        `(b,)` distances in the cost's dtype.
    """
    x, noise = x.detach(), noise.detach()
    if rows is None:
        return paired_distance(x, noise.index_select(0, cols), metric)
    dtype = rows.cost.dtype
    picked = rows.cost.gather(1, cols[:, None].to(rows.cost.device))[:, 0]
    if metric == "l1" or rows.x_sq is None or rows.n_sq is None or not rows.exact:
        if metric == "l1" and not flipped:
            return picked
        return paired_distance(x, noise.index_select(0, cols), metric, dtype)
    norms = rows.x_sq + rows.n_sq.index_select(0, cols)
    sq = picked.square() if metric == "l2" else picked.clone()
    if flipped:  # ||x - n||^2 + ||x + n||^2 = 2 (||x||^2 + ||n||^2)
        sq = (2.0 * norms).sub_(sq)
    close = (norms * CANCELLATION_RATIO > sq).nonzero()[:, 0]  # includes clamped (zero) entries
    if close.numel():
        sq[close] = paired_distance(x[close], noise.index_select(0, cols[close]), "sqeuclidean", dtype)
    if metric == "sqeuclidean":
        return sq
    if not flipped:
        picked = picked.clone()
        picked[close] = sq[close].sqrt()
        return picked
    return sq.sqrt_()


def paired_distance(x: Tensor, noise: Tensor, metric: str = "l2", dtype: torch.dtype | None = None) -> Tensor:
    """Distance of each pair `(x[i], noise[i])`, from the differences (no cancellation).

    Args:
        x: `(B, *dims)`.
        noise: `(B, *dims)`.
        metric: One of `METRICS`.
        dtype: The dtype to compute in; `None`:
            [cost_dtype][lightning_immiscible.costs.cost_dtype] (one more pass over the inputs).

    Returns:
        `(B,)` distances in `dtype` (by default float32, or float64 for float64 inputs and values
        whose fp32 distance would overflow).
    """
    x, noise = x.detach(), noise.detach()
    dtype = dtype or cost_dtype(x, noise, metric)
    diff = (x.to(dtype) - noise.to(dtype)).reshape(x.shape[0], -1)
    if metric == "l1":
        return diff.abs().sum(1)
    sq = diff.square().sum(1)
    return sq.sqrt() if metric == "l2" else sq
