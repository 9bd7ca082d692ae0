"""What the callback reports about its coupling: logged metrics, one-time warnings, resume notes.

Kept apart from [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] so that the
callback holds the training-loop logic only. Every warning here is emitted on rank zero, once per fit
([Notices][lightning_immiscible.mixin.Notices]).
"""

from __future__ import annotations

import statistics
from typing import Any

from lightning_immiscible.coupling import CouplingResult
from lightning_immiscible.mixin import Notices

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


def warn_pool_size(pool: int, method: str, assign_ms: float, large_pool: int, notices: Notices) -> None:
    """Warns once about a pool of one item (nothing to re-pair) and once about a very large pool."""
    if pool == 1:
        notices.warn_once(
            "small",
            "ImmiscibleCoupling got a batch of 1 item: coupling needs a batch to re-pair, so the "
            "noise is left as drawn. Use a batch size > 1 (or scope='global' to pool ranks).",
        )
    if pool >= large_pool and method in ("lsa", "flip"):
        notices.warn_once(
            "large",
            f"ImmiscibleCoupling: the assignment pool has about {pool} items; exact assignment is "
            f"about cubic in the pool (the first took {assign_ms:.0f} ms). Consider "
            "scope='node' or an int scope (smaller groups), or method='knn'.",
        )


def warn_overhead(overhead: list[tuple[float, float]], fraction: float, notices: Notices) -> None:
    """Warns once when the median assignment time exceeds ``fraction`` of the median step time.

    Args:
        overhead: ``(assign_ms, step_ms)`` per batch; the first batch (warm-up work) is skipped.
        fraction: The callback's ``max_step_fraction``.
        notices: The fit's warnings.
    """
    if len(overhead) <= WARMUP_BATCHES:
        return
    measured = overhead[1:]
    assign = statistics.median(a for a, _ in measured)
    step = statistics.median(s for _, s in measured)
    if step > 0 and assign > fraction * step:
        notices.warn_once(
            "overhead",
            f"ImmiscibleCoupling: the assignment takes {assign:.1f} ms of a {step:.1f} ms training "
            f"step ({100 * assign / step:.0f} % > max_step_fraction={fraction}). "
            "Use smaller coupling groups (scope='node' or an int), a faster solver, or method='knn'.",
        )


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings whose value differs between a checkpoint and this run: `{name: (saved, now)}`."""
    return {k: (saved[k], current.get(k)) for k in saved if saved[k] != current.get(k)}


def warn_changed_settings(
    changed: dict[str, tuple[Any, Any]], seed: Any, draws: int, notices: Notices
) -> None:
    """Names a resume whose coupling settings differ from the checkpoint's, and what happens next."""
    named = ", ".join(f"{k}={old!r} -> {new!r}" for k, (old, new) in changed.items())
    notices.warn_once(
        "changed",
        f"ImmiscibleCoupling: this run's coupling settings differ from the checkpoint's ({named}). The "
        f"noise stream continues from it (seed {seed}, draw {draws}: no noise of the interrupted run "
        "is drawn again), with the new settings' pairing and pools; the checkpoint's scope='auto' "
        "and solver='auto' decisions are not reused.",
    )


def warn_worker_ignores_condition(condition: Any, worker_condition: Any, notices: Notices) -> None:
    """Warns once when the module gives labels but the DataLoader workers coupled without them."""
    if condition is not None and worker_condition is None:
        notices.warn_once(
            "worker_condition",
            "ImmiscibleCoupling: the module returns a condition (immiscible_condition) but the "
            "DataLoader workers coupled across conditions; pass CouplingCollate(condition_fn=...) "
            "so that the workers couple within each condition too.",
        )


def warn_noise_not_taken(notices: Notices) -> None:
    """Warns once when a coupled batch's noise was never taken by the module."""
    notices.warn_once(
        "not_taken",
        "ImmiscibleCoupling: the module never took the coupled noise of a training batch: its "
        "training_step did not call self.noise_like(x0) (is it still torch.randn_like(x0)?), so the "
        "coupling changed nothing and immiscible/reduction_pct describes noise the model did not "
        "train on (immiscible/noise_taken logs 0 for such batches). Draw the noise with "
        "`noise = self.noise_like(x0)` and use it for both x_t and the target.",
    )
