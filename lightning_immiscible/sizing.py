"""Group sizing for ``scope="auto"``: the largest coupling group whose assignment fits a step budget.

Exact assignment is about cubic in the pooled batch, while the training step's time does not grow
with the group, so the useful group size depends on the batch, the data size, the solver and the
step time. [choose_group_size][lightning_immiscible.sizing.choose_group_size] measures the
assignment at each candidate pool size (on synthetic data of the real shape, on this rank's device)
and keeps the largest that fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lightning_immiscible.costs import cost_matrix
from lightning_immiscible.coupling import CouplingSpec, assign

DEFAULT_SPEC = CouplingSpec()


@dataclass(frozen=True)
class GroupSizeDecision:
    """The outcome of [choose_group_size][lightning_immiscible.sizing.choose_group_size].

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
    spec: CouplingSpec = DEFAULT_SPEC,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Times one assignment step for a pool of `pool` items, in ms.

    Runs what a rank runs per step, [assign][lightning_immiscible.coupling.assign]: its
    `(local_batch, pool)` cost rows and the `(pool, pool)` solve, on Gaussian-like data of shape
    `(*, *item_shape)`. Communication is not included: the other ranks' rows are computed here
    beforehand and stand in for the gathered ones.

    Args:
        pool: Items in the group's pool (group size x local batch).
        item_shape: Shape of one item (`x0.shape[1:]`).
        local_batch: Items per rank.
        spec: Metric, precision, solver and method of the coupling.
        device: Where to compute the cost rows.
        seed: Seed of the synthetic data.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn((pool, *item_shape), generator=gen, device=device) * 0.5
    noise = torch.randn((pool, *item_shape), generator=gen, device=device)
    others = cost_matrix(data, -noise if spec.method == "flip" else noise, spec.metric, spec.precision)
    found = assign(data[:local_batch], noise, spec, gather_rows=lambda rows: others)
    return found.cost_ms + found.solve_ms


def choose_group_size(
    world_size: int,
    local_batch: int,
    item_shape: Sequence[int],
    step_ms: float,
    fraction: float,
    spec: CouplingSpec = DEFAULT_SPEC,
    *,
    device: torch.device | str = "cpu",
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
        spec: The coupling's settings (metric, precision, solver).
        device: Where to time the cost rows (this rank's device).
    """
    budget = fraction * step_ms
    timings: dict[int, float] = {}
    chosen = 1
    for size in candidate_sizes(world_size):
        if size * local_batch <= 1:
            continue
        timings[size] = time_assignment(size * local_batch, item_shape, local_batch, spec, device=device)
        if timings[size] > budget:
            break
        chosen = size
    return GroupSizeDecision(chosen, budget, step_ms, timings)
