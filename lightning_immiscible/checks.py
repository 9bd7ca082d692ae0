"""Input checks of the coupling: tensors, shapes, devices, NaN/Inf, in one pass over each input.

[check_inputs][lightning_immiscible.coupling.check_inputs] and
[couple][lightning_immiscible.coupling.couple] raise these checks' errors; the values are read once
per input tensor, and what that pass finds (the squared norms, or the value ranges) also decides
the cost's dtype. The checks always run: NaN/Inf inputs, and values so large that their costs would
overflow float64, never reach a solver (and [solve][lightning_immiscible.solvers.solve] refuses a
non-finite cost from any other path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_immiscible.costs import (
    FP64_COST_LIMIT,
    cost_bound,
    norm_checked_dtype,
    range_cost_dtype,
    value_ranges,
)


class CouplingInputError(ValueError, TypeError):
    """Invalid input to the coupling (NaN/Inf, integer tensors, mismatched shapes, unknown settings).

    Subclasses both `ValueError` and `TypeError`. `reason` is a short machine-readable key (one of
    `lightning_immiscible.protocol.REASONS`) that ranks exchange so all of them fail together.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def check_tensors(x0: Tensor, noise: Tensor, method: str) -> None:
    """Checks the types, dtypes, shapes and devices of `x0` and `noise` (no pass over the values).

    Raises:
        CouplingInputError: With a message that says what is wrong and how to fix it.
    """
    for name, t in (("x0", x0), ("noise", noise)):
        check_tensor(name, t)
    expected = (x0.shape[0], noise.shape[1], *x0.shape[1:]) if method == "knn" else x0.shape
    if method == "knn" and noise.ndim != x0.ndim + 1:
        raise CouplingInputError(
            f"knn needs noise of shape (B, k, *x0.shape[1:]) = (B, k, {', '.join(map(str, x0.shape[1:]))}), "
            f"got {tuple(noise.shape)}.",
            "shape",
        )
    if tuple(noise.shape) != tuple(expected):
        raise CouplingInputError(
            f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)} "
            f"(expected {tuple(expected)} for method={method!r}).",
            "shape",
        )
    if x0.device != noise.device:
        raise CouplingInputError(f"x0 is on {x0.device} but noise is on {noise.device}.", "device")


def checked_ranges(x0: Tensor, noise: Tensor) -> list[tuple[float, float]]:
    """`(min, max)` of each input in one pass over each (the group coupling passes `x0` twice: once).

    Raises `CouplingInputError` for NaN/Inf; the ranges also decide the cost's dtype
    ([range_cost_dtype][lightning_immiscible.costs.range_cost_dtype]).

    Args:
        x0: `(B, *dims)` data.
        noise: `(B, *dims)` noise (`knn`: `(B, k, *dims)`), or `x0` itself.

    Returns:
        `[(min, max) of x0, (min, max) of noise]` as floats (`(0.0, 0.0)` for an empty tensor).
    """
    named = (("x0", x0),) if noise is x0 else (("x0", x0), ("noise", noise))
    ranges = value_ranges(*(t for _, t in named))
    for (name, t), (low, high) in zip(named, ranges, strict=True):
        if not (math.isfinite(low) and math.isfinite(high)):
            check_finite_values(name, t)
    return ranges * 2 if noise is x0 else ranges


def check_cost_range(ranges: list[tuple[float, float]], dim: int, metric: str) -> None:
    """Raises `CouplingInputError` when finite inputs are too large for float64 costs.

    Args:
        ranges: `(min, max)` of `x0` and of the noise (from
            [checked_ranges][lightning_immiscible.checks.checked_ranges]).
        dim: Values per item.
        metric: The cost's metric.
    """
    if cost_bound(ranges, dim, metric) <= FP64_COST_LIMIT:
        return
    reach = max(max(abs(low), abs(high)) for low, high in ranges)
    what = "distances" if metric == "l1" else "squared distances"
    raise CouplingInputError(
        f"x0 and noise hold values up to {reach:.3g} in magnitude ({dim} per item): their {what} "
        f"could exceed {FP64_COST_LIMIT:.0e} and overflow float64 to Inf, which no solver can "
        "assign. Rescale the data (divide it by its scale, or fix the model output that produced "
        "it) before coupling.",
        "non_finite",
    )


def cost_inputs(x0: Tensor, noise: Tensor, metric: str) -> tuple[torch.dtype, tuple[Tensor, Tensor] | None]:
    """The cost's dtype and, for `l2`/`sqeuclidean`, the squared norms: one pass over each input.

    [norm_checked_dtype][lightning_immiscible.costs.norm_checked_dtype] checks the norms the cost
    needs anyway; only when they fail (NaN/Inf inputs, or values so large that fp32 costs could
    overflow) is each input scanned again, to tell the two apart.

    Args:
        x0: `(b, *dims)` data.
        noise: `(B, *dims)` noise.
        metric: The cost's metric.

    Returns:
        `(dtype, norms)`: `norms` are `(x_sq, n_sq)` in `dtype`, or `None` when they must be
        computed with the costs (`l1`, or inputs that needed the scan).

    Raises:
        CouplingInputError: For NaN/Inf inputs, or values whose costs would overflow float64.
    """
    checked = norm_checked_dtype(x0, noise) if metric != "l1" else None
    if checked is not None:
        return checked
    ranges, dim = checked_ranges(x0, noise), math.prod(x0.shape[1:])
    check_cost_range(ranges, dim, metric)
    wide = torch.float64 in (x0.dtype, noise.dtype)
    return range_cost_dtype(ranges, dim, metric, wide), None


def check_tensor(name: str, t: object) -> None:
    """Checks that `t` (called `name` in the message) is a floating-point tensor with a batch dimension."""
    if not isinstance(t, Tensor):
        raise CouplingInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.", "dtype")
    if not t.is_floating_point():
        raise CouplingInputError(
            f"{name} has dtype {t.dtype}; the coupling needs floating-point tensors. Convert it "
            f"(e.g. {name}.float(), images scaled as your model sees them) before coupling.",
            "dtype",
        )
    if t.ndim < 1:
        raise CouplingInputError(f"{name} must have a batch dimension, got a 0-d tensor.", "shape")


def check_finite_values(name: str, t: Tensor) -> None:
    """Raises `CouplingInputError` naming how many NaN/Inf values `t` holds (if any)."""
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        raise CouplingInputError(
            f"{name} contains {bad} NaN/Inf value(s) (shape {tuple(t.shape)}); fix the data "
            "pipeline or the model output that produced it before coupling.",
            "non_finite",
        )
