"""Group sizing for ``scope="auto"``: the largest coupling group whose assignment fits a step budget.

Exact assignment is about cubic in the pooled batch, while the training step's time does not grow
with the group, so the useful group size depends on the batch, the data size, the solver and the
step time. :func:`choose_group_size` measures the assignment at each candidate pool size (on
synthetic data of the real shape, on this rank's device) and keeps the largest that fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_immiscible.coupling import cost_matrix
from lightning_immiscible.solvers import solve


@dataclass(frozen=True)
class GroupSizeDecision:
    """The outcome of :func:`choose_group_size`.

    Attributes:
        size: Chosen number of ranks per coupling group.
        budget_ms: The time the assignment may take per step (fraction x step time).
        step_ms: The measured training-step time without the assignment.
        timings_ms: Measured assignment time (cost matrix + solver) per tried group size.
    """

    size: int
    budget_ms: float
    step_ms: float
    timings_ms: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """A one-line, human-readable account of the decision (for the logs)."""
        tried = ", ".join(f"{g} ranks: {ms:.1f} ms" for g, ms in sorted(self.timings_ms.items()))
        return (
            f"scope='auto' chose groups of {self.size} rank(s): step {self.step_ms:.1f} ms, assignment "
            f"budget {self.budget_ms:.1f} ms; measured {tried}"
        )


def candidate_sizes(world_size: int) -> list[int]:
    """Group sizes that divide ``world_size``, ascending (consecutive-rank groups)."""
    return [g for g in range(1, world_size + 1) if world_size % g == 0]


def time_assignment(
    pool: int,
    item_shape: Sequence[int],
    local_batch: int,
    *,
    metric: str = "l2",
    precision: str = "auto",
    solver: str = "auto",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Times one assignment step for a pool of ``pool`` items, in ms.

    Covers what a rank does per step: its ``(local_batch, pool)`` cost rows and the ``(pool, pool)``
    solve, on Gaussian-like data of shape ``(*, *item_shape)``. Communication is not included.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn((pool, *item_shape), generator=gen, device=device) * 0.5
    noise = torch.randn((pool, *item_shape), generator=gen, device=device)
    full = cost_matrix(data, noise, metric, precision).cpu().double().numpy()  # the gathered matrix
    start = time.perf_counter()
    cost_matrix(data[:local_batch], noise, metric, precision).cpu()  # this rank's rows
    rows_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    solve(full, solver, dim=math.prod(item_shape))
    return rows_ms + (time.perf_counter() - start) * 1e3


def choose_group_size(
    world_size: int,
    local_batch: int,
    item_shape: Sequence[int],
    step_ms: float,
    fraction: float,
    **timing_kwargs: Any,
) -> GroupSizeDecision:
    """Picks the largest group size whose measured assignment time is within ``fraction * step_ms``.

    Candidates are tried in ascending order and the search stops at the first one over budget
    (the time grows with the pool). A group of one rank is always allowed.

    Args:
        world_size: Number of ranks.
        local_batch: Items per rank per step.
        item_shape: Shape of one item (``x0.shape[1:]``).
        step_ms: Training-step time without the assignment, ms.
        fraction: Share of the step the assignment may take.
        **timing_kwargs: ``metric``, ``precision``, ``solver``, ``device`` for :func:`time_assignment`.
    """
    budget = fraction * step_ms
    timings: dict[int, float] = {}
    chosen = 1
    for size in candidate_sizes(world_size):
        if size * local_batch <= 1:
            continue
        timings[size] = time_assignment(size * local_batch, item_shape, local_batch, **timing_kwargs)
        if timings[size] > budget:
            break
        chosen = size
    return GroupSizeDecision(chosen, budget, step_ms, timings)
