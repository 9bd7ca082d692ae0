"""Data-noise cost matrices: the distances the assignment minimises (pure torch, no Lightning).

The cost matrix is one matmul (`||x||^2 + ||n||^2 - 2 x.n`), never a `(b, B, D)` broadcast
tensor; half-precision inputs are norm-scaled so that fp16 cannot overflow.
"""

from __future__ import annotations

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
#: 3.4e38, and a cost adds two such terms.
FP32_COST_LIMIT = 1e37


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
    dim = x[0].numel()
    reach = _largest_magnitude(x) + _largest_magnitude(noise)
    bound = dim * reach if metric == "l1" else dim * reach * reach
    return torch.float64 if bound > FP32_COST_LIMIT else torch.float32


def _largest_magnitude(t: Tensor) -> float:
    low, high = torch.aminmax(t.detach())  # no |t| temporary of the input's size
    return max(abs(float(low)), abs(float(high)))


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
    check_choice("metric", metric, METRICS)
    dtype = dtype or cost_dtype(x, noise, metric)
    xf = x.reshape(x.shape[0], -1).to(dtype)
    nf = noise.reshape(noise.shape[0], -1).to(dtype)
    if metric == "l1":
        return torch.cdist(xf, nf, p=1.0)
    # ||x||^2 and ||n||^2 in the cost's dtype: only the cross term sees a reduced precision.
    sq = xf.square().sum(1)[:, None] + nf.square().sum(1)[None, :]
    cost = (sq - 2.0 * _gram(xf, nf, resolve_precision(precision, x.device, dtype))).clamp_min_(0.0)
    return cost.sqrt_() if metric == "l2" else cost


def paired_distance(x: Tensor, noise: Tensor, metric: str = "l2") -> Tensor:
    """Distance of each pair `(x[i], noise[i])`, from the differences (no cancellation).

    Args:
        x: `(B, *dims)`.
        noise: `(B, *dims)`.
        metric: One of `METRICS`.

    Returns:
        `(B,)` distances in [cost_dtype][lightning_immiscible.costs.cost_dtype] (float32, or
        float64 for float64 inputs and values whose fp32 distance would overflow).
    """
    dtype = cost_dtype(x, noise, metric)
    diff = (x.to(dtype) - noise.to(dtype)).reshape(x.shape[0], -1)
    if metric == "l1":
        return diff.abs().sum(1)
    sq = diff.square().sum(1)
    return sq.sqrt() if metric == "l2" else sq
