"""The flow-matching objective: linear interpolant, velocity target, time sampling, loss.

Convention (rectified flow, Liu et al. 2023; the one Stable Diffusion 3 uses): ``t = 0`` is data,
``t = 1`` is noise, ``x_t = (1 - t) x0 + t noise`` and the velocity ``dx_t/dt = noise - x0``.
Sampling integrates from ``t = 1`` back to ``t = 0`` (see
[integrate][example_projects.flow_matching.samplers.integrate]). torchcfm writes the same path
with the ends swapped (``x0`` = noise, ``x1`` = data, ``t`` from 0 to 1).

The loss takes the noise as an argument: whoever calls it decides the pairing, and the same
tensor builds ``x_t`` and the target, which is what makes a batch coupling pluggable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TimeSampling = Literal["uniform", "logit_normal"]

#: ``velocity_fn(x_t, t)``: ``(B, *dims)`` points and ``(B,)`` times -> ``(B, *dims)`` velocities.
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def sample_time(
    n: int,
    kind: TimeSampling = "uniform",
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times in ``(0, 1)``.

    Args:
        n: How many.
        kind: ``uniform`` (torchcfm, rectified flow) or ``logit_normal``
            (``sigmoid(N(loc, scale^2))``, Esser et al. 2024, the SD3 default ``loc=0, scale=1``),
            which puts more weight on the middle of the path.
        loc: Mean of the normal before the sigmoid (``logit_normal`` only).
        scale: Its standard deviation (``logit_normal`` only).
        generator: Random generator (``None``: the global one).
        device: Where the ``(n,)`` result lives.

    Returns:
        ``(n,)`` float times.
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator).to(device)
    if kind == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, generator=generator)).to(device)
    raise ValueError(f"time sampling must be 'uniform' or 'logit_normal', got {kind!r}.")


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` for ``(B, *dims)`` data, its paired noise and ``(B,)`` times."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """``dx_t/dt = noise - x0``: the regression target, ``(B, *dims)``."""
    return noise - x0


def flow_matching_loss(velocity_fn: VelocityFn, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Mean squared error between ``velocity_fn(x_t, t)`` and ``noise - x0``.

    Args:
        velocity_fn: The network, called as ``velocity_fn(x_t, t)``.
        x0: ``(B, *dims)`` data.
        noise: ``(B, *dims)`` noise paired with ``x0`` (``noise[i]`` goes with ``x0[i]``; coupled or
            independent: this function does not care, the caller decides).
        t: ``(B,)`` times in ``[0, 1]``.

    Returns:
        Scalar loss.
    """
    return F.mse_loss(velocity_fn(interpolate(x0, noise, t), t), velocity_target(x0, noise))
