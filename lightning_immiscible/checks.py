"""Input checks of the coupling: tensors, shapes, devices, NaN/Inf, in one pass over each input.

[check_inputs][lightning_immiscible.coupling.check_inputs] and
[couple][lightning_immiscible.coupling.couple] raise these checks' errors; the values are read once
per input tensor, and what that pass finds (the squared norms, or the value ranges) also decides
the cost's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_immiscible.costs import norm_checked_dtype, range_cost_dtype, value_ranges


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


def checked_ranges(x0: Tensor, noise: Tensor, check_finite: bool) -> list[tuple[float, float]]:
    """`(min, max)` of each input in one pass over each (the group coupling passes `x0` twice: once).

    Raises `CouplingInputError` for NaN/Inf when `check_finite`; the ranges also decide the cost's
    dtype ([range_cost_dtype][lightning_immiscible.costs.range_cost_dtype]).
    """
    named = (("x0", x0),) if noise is x0 else (("x0", x0), ("noise", noise))
    ranges = value_ranges(*(t for _, t in named))
    for (name, t), (low, high) in zip(named, ranges, strict=True):
        if check_finite and not (math.isfinite(low) and math.isfinite(high)):
            check_finite_values(name, t)
    return ranges * 2 if noise is x0 else ranges


def cost_inputs(
    x0: Tensor, noise: Tensor, metric: str, check_finite: bool
) -> tuple[torch.dtype, tuple[Tensor, Tensor] | None]:
    """The cost's dtype and, for `l2`/`sqeuclidean`, the squared norms: one pass over each input.

    [norm_checked_dtype][lightning_immiscible.costs.norm_checked_dtype] checks the norms the cost
    needs anyway; only when they fail (NaN/Inf inputs, or values so large that fp32 costs could
    overflow) is each input scanned again, to tell the two apart.
    """
    checked = norm_checked_dtype(x0, noise) if metric != "l1" else None
    if checked is not None:
        return checked
    wide = torch.float64 in (x0.dtype, noise.dtype)
    return range_cost_dtype(checked_ranges(x0, noise, check_finite), x0[0].numel(), metric, wide), None


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
