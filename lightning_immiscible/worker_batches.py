"""The callback's side of DataLoader-worker coupling: take the noise a worker drew into the step.

A [CouplingCollate][lightning_immiscible.workers.CouplingCollate] couples each batch in a DataLoader
worker; the mixin unwraps it in ``on_after_batch_transfer``.
[ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] then uses that noise as it is,
or couples the batch again on the training process when the worker drew it for another
``(rank, epoch, batch)`` position than the training loop's (see the workers module's docs for when
that happens). [WorkerBatches][lightning_immiscible.worker_batches.WorkerBatches] holds that logic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_immiscible.batches import same_batch
from lightning_immiscible.coupling import CouplingInputError, CouplingResult
from lightning_immiscible.mixin import Notices, hand_off
from lightning_immiscible.workers import NOISE_KEY, CouplingCollate, WorkerCoupling, find_collates


def full_precision(x0: Tensor | None) -> torch.autocast:
    """A context in which the coupling runs in full precision, even inside a precision plugin's autocast."""
    device_type = x0.device.type if x0 is not None else "cpu"
    return torch.autocast(device_type=device_type if device_type in ("cuda", "cpu") else "cpu", enabled=False)


def worker_coupling(module: object, batch: Any) -> WorkerCoupling | None:
    """The worker-coupled noise of this very batch, if the module unwrapped one.

    Raises:
        RuntimeError: If the batch still carries the collate's noise (an ``on_after_batch_transfer``
            override that does not call ``super()``).
    """
    worker = hand_off(module).worker
    if worker is not None and same_batch(worker.batch, batch):
        return worker
    if isinstance(batch, Mapping) and NOISE_KEY in batch:
        raise RuntimeError(
            f"ImmiscibleCoupling: the training batch still carries CouplingCollate's {NOISE_KEY!r}: "
            f"{type(module).__name__}.on_after_batch_transfer must return "
            "super().on_after_batch_transfer(batch, dataloader_idx), which unwraps it."
        )
    return None


class WorkerBatches:
    """Worker-coupled batches in the training loop: their noise, or a new coupling for the right position.

    Attributes:
        collates: The train dataloader's [CouplingCollate][lightning_immiscible.workers.CouplingCollate]s.
        assign_ms: The worker's assignment time for the latest batch (logged as
            ``immiscible/worker_assign_ms``).
        map_search_ms: For the latest batch if it is dataset-level (its items chosen by its noise
            through a fitted map), the worker's search time in ms (logged as
            ``immiscible/map_search_ms`` instead of ``worker_assign_ms``); else `None`.
        map_items: For such a batch, its number of distinct items (logged as ``immiscible/map_items``).
        seeds: The collates' seeds (checkpointed by the callback; a resumed run whose collates
            draw from other seeds is warned about).
    """

    def __init__(self, notices: Notices | None = None) -> None:
        self.collates: list[CouplingCollate] = []
        self.assign_ms = 0.0
        self.map_search_ms: float | None = None
        self.map_items: int | None = None
        self.seeds: list[int] = []
        self.notices = notices if notices is not None else Notices()

    def start_epoch(self, trainer: pl.Trainer) -> None:
        """Tells the collates the epoch: their batch positions restart per epoch."""
        self._find(trainer)
        for collate in self.collates:
            collate.set_epoch(trainer.current_epoch)

    def _find(self, trainer: pl.Trainer) -> None:
        self.collates = find_collates(trainer.train_dataloader)
        seeds = [c.seed for c in self.collates]
        if self.seeds and seeds and seeds != self.seeds:
            self.notices.warn_once(
                "seed",
                f"ImmiscibleCoupling: the CouplingCollate seed(s) {seeds} differ from the checkpoint's "
                f"{self.seeds}: the resumed run's workers draw other noise than the interrupted run's "
                "would have (never the same noise twice). For a reproducible resume pass "
                "CouplingCollate(seed=...) or call seed_everything(...) before building it.",
            )
        self.seeds = seeds or self.seeds

    def result(
        self,
        x0: Tensor,
        worker: WorkerCoupling,
        trainer: pl.Trainer,
        batch_idx: int,
        *,
        metric: str,
        note: str,
        warn: bool,
        fallback: Callable[[Tensor], CouplingResult],
    ) -> CouplingResult:
        """The coupling result for a worker-coupled batch.

        The training step pays nothing for it: `assign_ms` is 0 on the critical path. A batch whose
        noise was drawn for another position than the training loop's `(rank, epoch, batch_idx)` is
        coupled again here, for that position (alone: a pooled collate's batch without its pool).
        The worker's `solver="auto"` race times are credited to the training process's collate,
        whose race the next epoch's workers inherit.

        Args:
            x0: ``(B, *dims)`` the batch's data.
            worker: What the worker attached to the batch.
            trainer: The running Trainer (rank, epoch, dataloader).
            batch_idx: The training loop's batch index.
            metric: The callback's metric (recorded in the result).
            note: Logged once, the first time worker noise is used as it is.
            warn: Log ``note`` as a warning (else as info).
            fallback: Couples ``x0`` on this rank alone, without a collective (the callback's own
                method and noise stream): used for noise drawn for another position when the
                collate that drew it cannot be identified (wrapped in another callable, or several
                training loaders), so stale noise is never used.

        Raises:
            CouplingInputError: If the worker's noise does not have the shape of ``x0``.
        """
        position = (trainer.global_rank, trainer.current_epoch, batch_idx)
        if not self.collates and (worker.race or worker.position != position):
            self._find(trainer)  # on_train_epoch_start is skipped when Lightning resumes mid-epoch
        self._credit(worker)
        self.map_search_ms, self.map_items = worker.map_search_ms, worker.map_items
        if worker.from_map and worker.position != position:
            self._map_position(worker, position)
        elif worker.position != position:
            if len(self.collates) == 1:
                return self._recouple(x0, worker, position)
            return self._fallback(x0, worker, position, fallback)
        if worker.noise.shape != x0.shape:
            raise CouplingInputError(
                f"The batch carries worker-coupled noise of shape {tuple(worker.noise.shape)} but "
                f"immiscible_data(batch) has shape {tuple(x0.shape)}: CouplingCollate couples the "
                "collated data tensor, so use it only when immiscible_data returns that tensor.",
                "shape",
            )
        (self.notices.warn_once if warn else self.notices.info_once)("worker", note)
        self.assign_ms = worker.assign_ms
        noise, index = worker.noise.to(x0), worker.index.to(x0.device)
        result = CouplingResult(
            noise, index, worker.cost_before, worker.cost_after, 0.0, 0.0, "worker", metric
        )
        return dataclasses.replace(
            result, prior_skew=worker.prior_skew, condition_leak=worker.condition_leak,
            condition_weight=worker.condition_weight, candidate_share=worker.candidate_share,
        )  # fmt: skip

    def _map_position(self, worker: WorkerCoupling, position: tuple[int, int, int]) -> None:
        """A dataset-level batch met at another position: its noise chose its items, so it is kept.

        Raises:
            CouplingInputError: The batch was drawn for another rank (its noise could be that rank's).
        """
        if worker.position is None or worker.position[0] != position[0]:
            raise CouplingInputError(
                f"ImmiscibleCoupling: a DatasetCouplingLoader batch was drawn for rank "
                f"{None if worker.position is None else worker.position[0]} on rank {position[0]}: two "
                "ranks could train on the same noise. Let the loader read the rank (rank=None) or pass "
                "each rank its own.",
                "invalid",
            )
        self.notices.warn_once(
            "map-position",
            f"ImmiscibleCoupling: a DatasetCouplingLoader batch was drawn for (rank, epoch, batch) "
            f"{worker.position} but the training loop is at {position}. Its noise chose its items, so "
            "the pair is kept as it is; only the noise stream's position differs from an "
            "uninterrupted run's (expected when resuming from a checkpoint saved without the "
            "loader's state).",
        )

    def _credit(self, worker: WorkerCoupling) -> None:
        """Counts the worker's race times on the collate it came from (only when it is identifiable)."""
        if worker.race and len(self.collates) == 1:
            self.collates[0].credit(worker)
            for note in self.collates[0].race.pop_notes():
                rank_zero_info(f"{note} (in DataLoader workers)")

    def _fallback(
        self,
        x0: Tensor,
        worker: WorkerCoupling,
        position: tuple[int, int, int],
        fallback: Callable[[Tensor], CouplingResult],
    ) -> CouplingResult:
        self.notices.warn_once(
            "fallback",
            f"ImmiscibleCoupling: a worker coupled a batch for (rank, epoch, batch) {worker.position} "
            f"but the training loop is at {position}, and the train dataloader has "
            f"{len(self.collates)} CouplingCollate(s) as its collate_fn (not exactly one: wrapped "
            "in another callable, or several training loaders), so the batch cannot be coupled "
            "again with the worker's stream. Coupling it on the training process with this "
            "callback's method and noise stream instead (correct, but on the critical path). "
            "To keep the coupling in the workers, pass the CouplingCollate itself as the "
            "collate_fn of a single training DataLoader, with persistent_workers=False.",
        )
        with full_precision(x0):
            return dataclasses.replace(fallback(x0), method="worker")

    def _recouple(self, x0: Tensor, worker: WorkerCoupling, position: tuple[int, int, int]) -> CouplingResult:
        self.notices.warn_once(
            "position",
            f"ImmiscibleCoupling: a worker coupled a batch for (rank, epoch, batch) {worker.position} "
            f"but the training loop is at {position}; coupling it again on the training process "
            f"(correct, but on the critical path{_alone(self.collates[0])}). Expected for the first "
            "epoch after a resume at "
            "epoch > 0; otherwise use persistent_workers=False and a map-style dataset, and "
            "build CouplingCollate in train_dataloader() (or pass rank=).",
        )
        with full_precision(x0):
            result = self.collates[0].couple_on(x0, position, worker.condition)  # the same labels
        return dataclasses.replace(result, method="worker")


def _alone(collate: CouplingCollate) -> str:
    """What the re-coupling loses for a pooled collate: such a batch is coupled without its pool."""
    k = collate.pool_batches
    return f"; a PooledDataLoader's batch is then coupled alone, not in its pool of {k} batches" * (k > 1)
