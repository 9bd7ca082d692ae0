"""2-D target distributions for the flow-matching positive control (and anyone's sweeps).

Each sampler returns ``(n, 2)`` float32 points drawn from a generator you pass, so a fixed
evaluation sample is one ``torch.Generator().manual_seed(s)`` away. The source is a standard
Gaussian ``N(0, I_2)`` (see [gaussian][example_projects.flow_matching.targets2d.gaussian]).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

TargetName = Literal["8gaussians", "moons"]
TARGETS: tuple[str, ...] = ("8gaussians", "moons")


def gaussian(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``(n, 2)`` standard normal points: the source (noise) distribution."""
    return torch.randn(n, 2, generator=generator)


def eight_gaussians(
    n: int, generator: torch.Generator | None = None, radius: float = 5.0, std: float = math.sqrt(0.1)
) -> Tensor:
    """``(n, 2)`` points from 8 equally weighted Gaussians on a circle.

    The defaults are torchcfm's ``sample_8gaussians`` (centres at radius 5, variance 0.1).

    Args:
        n: How many points.
        generator: Random generator (``None``: the global one).
        radius: Radius of the circle of centres.
        std: Standard deviation of each component.
    """
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


def two_moons(
    n: int,
    generator: torch.Generator | None = None,
    noise: float = 0.2,
    scale: float = 3.0,
    shift: float = -1.0,
) -> Tensor:
    """``(n, 2)`` points from two interleaved half circles (scikit-learn's ``make_moons`` shape).

    Points are ``scale * moon + shift`` with Gaussian jitter ``noise`` on the unit moons, as
    torchcfm's ``sample_moons`` (``make_moons(noise=0.2) * 3 - 1``).

    Args:
        n: How many points.
        generator: Random generator (``None``: the global one).
        noise: Standard deviation of the jitter (before scaling).
        scale: Scale applied to the unit moons.
        shift: Offset added after scaling.
    """
    upper = torch.rand(n, generator=generator) < 0.5
    theta = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    moons = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=generator)
    return scale * moons + shift


def sample_target(name: TargetName, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``(n, 2)`` points of the named target (``8gaussians`` or ``moons``) with default settings."""
    if name == "8gaussians":
        return eight_gaussians(n, generator)
    if name == "moons":
        return two_moons(n, generator)
    raise ValueError(f"target must be one of {TARGETS}, got {name!r}.")
