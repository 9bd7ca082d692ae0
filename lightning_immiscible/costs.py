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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Maps a `precision` name to the dtype of the cost matrix's matmul inputs.

    `auto` is fp16 on CUDA (tensor cores; inputs are norm-scaled so fp16 cannot overflow) and
    fp32 elsewhere (half-precision matmul is several times slower than fp32 on CPUs).
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _HALF.get(precision, torch.float32)


def _gram(x: Tensor, n: Tensor, dtype: torch.dtype) -> Tensor:
    """`x @ n.T` as fp32 `(b, B)`; half-precision inputs are normalised first.

    Each row is divided by its fp32 norm before the cast, so every half-precision product lies in
    [-1, 1] (no overflow, full mantissa used); the norms are multiplied back in fp32.
    """
    if dtype == torch.float32:
        return x @ n.T
    xn = torch.linalg.vector_norm(x, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    nn_ = torch.linalg.vector_norm(n, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    unit = (x / xn[:, None]).to(dtype) @ (n / nn_[:, None]).to(dtype).T
    return unit.float() * xn[:, None] * nn_[None, :]


def cost_matrix(x: Tensor, noise: Tensor, metric: str = "l2", precision: str = "auto") -> Tensor:
    """Pairwise data-noise distances, never through a `(b, B, D)` broadcast tensor.

    Args:
        x: `(b, *dims)` data (any float dtype).
        noise: `(B, *dims)` noise.
        metric: `l2` (Euclidean), `sqeuclidean` or `l1`.
        precision: Matmul input precision for `l2`/`sqeuclidean` (see
            [resolve_precision][lightning_immiscible.costs.resolve_precision]); `l1` always uses
            fp32 `torch.cdist` (no tensor-core path exists for it).

    Returns:
        `(b, B)` fp32 tensor on `x`'s device: `C[i, j] = metric(x[i], noise[j])`.
    """
    check_choice("metric", metric, METRICS)
    xf = x.reshape(x.shape[0], -1).float()
    nf = noise.reshape(noise.shape[0], -1).float()
    if metric == "l1":
        return torch.cdist(xf, nf, p=1.0)
    # ||x||^2 and ||n||^2 in fp32: only the cross term sees the reduced precision.
    sq = xf.square().sum(1)[:, None] + nf.square().sum(1)[None, :]
    cost = (sq - 2.0 * _gram(xf, nf, resolve_precision(precision, x.device))).clamp_min_(0.0)
    return cost.sqrt_() if metric == "l2" else cost


def paired_distance(x: Tensor, noise: Tensor, metric: str = "l2") -> Tensor:
    """Distance of each pair `(x[i], noise[i])`, exact in fp32.

    Args:
        x: `(B, *dims)`.
        noise: `(B, *dims)`.
        metric: One of `METRICS`.

    Returns:
        `(B,)` fp32 distances.
    """
    diff = (x.float() - noise.float()).reshape(x.shape[0], -1)
    if metric == "l1":
        return diff.abs().sum(1)
    sq = diff.square().sum(1)
    return sq.sqrt() if metric == "l2" else sq
