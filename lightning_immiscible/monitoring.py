"""What the callback reports about its coupling: logged metrics, one-time warnings, resume notes.

Kept apart from [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] so that the
callback holds the training-loop logic only. Every warning here is emitted on rank zero, once.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_immiscible.coupling import CouplingResult

#: Batches measured before judging the assignment's share of the step time.
WARMUP_BATCHES = 3


def coupling_metrics(result: CouplingResult, group_size: int) -> dict[str, float]:
    """The values logged as ``immiscible/<name>`` for one coupled batch.

    Args:
        result: The batch's coupling (its ``noise`` is ``(B, *dims)``).
        group_size: Ranks in the coupling group.
    """
    return {
        "group_size": float(group_size),
        "cost_before": result.cost_before,
        "cost_after": result.cost_after,
        "reduction_pct": result.reduction_pct,
        "assign_ms": result.assign_ms,
        # The marginal check: about 1 for Gaussian noise (lsa/flip/none permute it); knn's
        # selection of nearer candidates lowers it (a tilted noise distribution).
        "noise_norm2": float(result.noise.detach().float().square().mean()) if result.noise.numel() else 0.0,
    }


def warn_pool_size(pool: int, method: str, assign_ms: float, large_pool: int, warned: set[str]) -> None:
    """Warns once about a pool of one item (nothing to re-pair) and once about a very large pool."""
    if pool == 1 and "small" not in warned:
        warned.add("small")
        rank_zero_warn(
            "ImmiscibleCoupling got a batch of 1 item: coupling needs a batch to re-pair, so the "
            "noise is left as drawn. Use a batch size > 1 (or scope='global' to pool ranks)."
        )
    if pool >= large_pool and method in ("lsa", "flip") and "large" not in warned:
        warned.add("large")
        rank_zero_warn(
            f"ImmiscibleCoupling: the assignment pool has about {pool} items; exact assignment is "
            f"about cubic in the pool (the first took {assign_ms:.0f} ms). Consider "
            "scope='node' or an int scope (smaller groups), or method='knn'."
        )


def warn_overhead(overhead: list[tuple[float, float]], fraction: float, warned: set[str]) -> None:
    """Warns once when the median assignment time exceeds ``fraction`` of the median step time.

    Args:
        overhead: ``(assign_ms, step_ms)`` per batch; the first batch (warm-up work) is skipped.
        fraction: The callback's ``max_step_fraction``.
        warned: Keys of the warnings given so far (``"overhead"`` is added).
    """
    if len(overhead) <= WARMUP_BATCHES or "overhead" in warned:
        return
    measured = overhead[1:]
    assign = statistics.median(a for a, _ in measured)
    step = statistics.median(s for _, s in measured)
    if step > 0 and assign > fraction * step:
        warned.add("overhead")
        rank_zero_warn(
            f"ImmiscibleCoupling: the assignment takes {assign:.1f} ms of a {step:.1f} ms training "
            f"step ({100 * assign / step:.0f} % > max_step_fraction={fraction}). "
            "Use smaller coupling groups (scope='node' or an int), a faster solver, or method='knn'."
        )


def saved_coupling_state(states: Mapping[Any, Any], key: str) -> tuple[str, dict[str, Any]] | None:
    """A coupling callback's state saved under another key than ``key`` (another method or scope).

    Lightning hands a callback only the state saved under its own ``state_key``; this finds the
    one an `ImmiscibleCoupling` with other settings saved, so that its noise stream can continue.

    Returns:
        ``(saved_key, state)``, or ``None`` when ``key`` itself is present or no such state is.
    """
    if key in states:
        return None
    for name, state in states.items():
        if (
            isinstance(name, str)
            and isinstance(state, dict)
            and {"seed", "draws", "auto_solver"} <= set(state)
        ):
            return name, state
    return None


def warn_changed_setting(saved_key: str, method: str, scope: Any, seed: Any, draws: int) -> None:
    """Names a resume with another method or scope, and what happens to the noise stream."""
    rank_zero_warn(
        f"ImmiscibleCoupling: the checkpoint's coupling state was saved under {saved_key}, but this "
        f"run couples with method={method!r}, scope={scope!r}. The noise stream "
        f"continues from it (seed {seed}, draw {draws}: no noise of the interrupted run "
        "is drawn again), with the new setting's pairing and pools; its scope='auto' and "
        "solver='auto' decisions are not reused."
    )


def warn_worker_ignores_condition(condition: Any, worker_condition: Any, warned: set[str]) -> None:
    """Warns once when the module gives labels but the DataLoader workers coupled without them."""
    if condition is not None and worker_condition is None and "worker_condition" not in warned:
        warned.add("worker_condition")
        rank_zero_warn(
            "ImmiscibleCoupling: the module returns a condition (immiscible_condition) but the "
            "DataLoader workers coupled across conditions; pass CouplingCollate(condition_fn=...) "
            "so that the workers couple within each condition too."
        )
