"""Pools larger than a training batch: `k` batches coupled in one assignment, in DataLoader workers.

A class-conditional model couples within each class, so a batch whose classes hold one or two
items each leaves almost nothing to re-pair. Coupling `k` consecutive training batches together
gives every class block `k` times more items, at about `(k B)^3` per assignment (exact methods),
paid in the DataLoader workers once per `k` training steps; the training process pays nothing
extra per step.

A DataLoader hands out one `collate_fn` call per item, so one call cannot become `k` training
steps: [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader] asks for the indices of `k`
batches at a time ([PoolBatchSampler][lightning_immiscible.pools.PoolBatchSampler]), its
[PoolCollate][lightning_immiscible.workers.PoolCollate] collates and couples them
([CouplingCollate.collate_pool][lightning_immiscible.workers.CouplingCollate.collate_pool]), and its
iterator yields them one by one. Training sees batches of `batch_size` items, exactly the
batches a DataLoader with the same sampler would yield, in the same order, each in
[CouplingCollate][lightning_immiscible.workers.CouplingCollate]'s format; `len(loader)` is the
number of training batches.

Positions and streams are the unpooled ones: batch `j` of pool `q` is at batch position `q k + j`
and carries the noise drawn for that position (so the pool's noise is i.i.d. Gaussian, distinct
per rank, epoch and position, whatever the number of workers). Under DDP, Lightning rebuilds the
loader with a `DistributedSampler` (its `use_distributed_sampler`): the pools are then made of
this rank's items, with the same training batch size. A batch that the training loop meets at
another position (the first epoch of a run resumed at epoch > 0, persistent workers) is coupled
again on the training process, alone: correct, but without its pool (logged once).

Examples:
    ```python
    from operator import itemgetter

    import torch
    from torch.utils.data import TensorDataset
    from lightning_immiscible import CouplingCollate, PooledDataLoader

    ds = TensorDataset(torch.rand(256, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (256,)))
    collate = CouplingCollate("lsa", seed=0, condition_fn=itemgetter(1), pool_batches=4)
    loader = PooledDataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate)
    assert len(loader) == 16  # training batches, of 16 items; noise coupled over 64 items
    ```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from lightning_immiscible.workers import CouplingCollate, PoolCollate


class PoolBatchSampler(BatchSampler):
    """Yields the indices of `pool_batches` consecutive training batches at a time.

    The training batches are `BatchSampler(sampler, batch_size, drop_last)`'s, in its order; each
    item of this sampler is `pool_batches` of them concatenated (the last pool may hold fewer).
    `batch_size` and `drop_last` keep their `BatchSampler` meaning (the training batch), so
    Lightning can rebuild it around a `DistributedSampler`.

    Args:
        sampler: The item order (e.g. `RandomSampler`, `DistributedSampler`).
        batch_size: Items per training batch.
        drop_last: Drop the last training batch when it holds fewer than `batch_size` items.
        pool_batches: Training batches per pool (a
            [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader] sets its collate's).

    Raises:
        ValueError: If `pool_batches < 1` (or `batch_size`, `drop_last` are invalid, as for
            `BatchSampler`).
    """

    def __init__(
        self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool, pool_batches: int = 1
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if isinstance(pool_batches, bool) or not isinstance(pool_batches, int) or pool_batches < 1:
            raise ValueError(
                f"PoolBatchSampler(pool_batches={pool_batches!r}): pool_batches must be an int >= 1."
            )
        self.pool_batches = pool_batches

    def __iter__(self) -> Iterator[list[int]]:
        pool: list[int] = []
        for count, batch in enumerate(super().__iter__(), start=1):
            pool.extend(batch)
            if count % self.pool_batches == 0:
                yield pool
                pool = []
        if pool:
            yield pool

    def __len__(self) -> int:
        """The number of pools."""
        return math.ceil(self.num_batches / self.pool_batches)

    @property
    def num_batches(self) -> int:
        """The number of training batches (`BatchSampler`'s length)."""
        return super().__len__()


class PooledDataLoader(DataLoader):
    """A DataLoader whose `CouplingCollate(pool_batches=k)` couples `k` training batches at a time.

    It takes `DataLoader`'s arguments and yields what a `DataLoader` with
    `collate_fn=CouplingCollate(...)` (and `pool_batches=1`) yields: batches of `batch_size` items
    from the same sampler, in the same order, in the collate's format, with `len(loader)` training
    batches. The difference: the noise of each run of `k` consecutive batches is coupled in one
    assignment over their `k batch_size` items (see the `pools` module).
    Keep `ImmiscibleMixin` and `ImmiscibleCoupling` as for any
    [CouplingCollate][lightning_immiscible.workers.CouplingCollate]; build the loader in
    `train_dataloader()`, with a map-style dataset and `persistent_workers=False`.

    `loader.batch_size` is `None`, as for any DataLoader built from a batch sampler: the training
    batch size is `loader.batch_sampler.batch_size`.

    Args:
        dataset: A map-style dataset.
        batch_size: Items per training batch (not per pool).
        shuffle: Random order (a `RandomSampler` with `generator`), as in `DataLoader`.
        sampler: The item order, instead of `shuffle`.
        batch_sampler: A [PoolBatchSampler][lightning_immiscible.pools.PoolBatchSampler] (what
            Lightning passes when it rebuilds the loader around a `DistributedSampler`); its
            `pool_batches` is set to the collate's. Excludes `batch_size`, `shuffle`, `sampler`
            and `drop_last`.
        drop_last: Drop the last incomplete training batch.
        collate_fn: The [CouplingCollate][lightning_immiscible.workers.CouplingCollate] whose
            `pool_batches` sets `k` (or a [PoolCollate][lightning_immiscible.workers.PoolCollate]
            around one, as a rebuilt loader passes it).
        generator: The generator of `shuffle`'s `RandomSampler` and the workers' base seeds.
        **kwargs: Other `DataLoader` arguments (`num_workers`, `pin_memory`, ...).

    Raises:
        TypeError: If `collate_fn` is not a `CouplingCollate`, the dataset is iterable or
            `batch_sampler` is not a `PoolBatchSampler`.
        ValueError: If `batch_sampler` comes with `batch_size`, `shuffle`, `sampler` or
            `drop_last`, or `sampler` with `shuffle`.

    Examples:
        ```python
        from operator import itemgetter

        import lightning as L
        from lightning_immiscible import CouplingCollate, ImmiscibleMixin, PooledDataLoader

        class Diffusion(ImmiscibleMixin, L.LightningModule):
            def train_dataloader(self):  # self.dataset: (image, label) items
                collate = CouplingCollate("lsa", condition_fn=itemgetter(1), pool_batches=16)
                return PooledDataLoader(self.dataset, batch_size=128, shuffle=True,
                                        num_workers=4, collate_fn=collate)
        ```
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler | Iterable | None = None,
        batch_sampler: PoolBatchSampler | None = None,
        drop_last: bool = False,
        collate_fn: CouplingCollate | PoolCollate | None = None,
        generator: Any = None,
        **kwargs: Any,
    ) -> None:
        collate = collate_fn.collate if isinstance(collate_fn, PoolCollate) else collate_fn
        if not isinstance(collate, CouplingCollate):
            raise TypeError(
                "PooledDataLoader needs collate_fn=CouplingCollate(..., pool_batches=k), got "
                f"{type(collate_fn).__name__}; pass your own collate as CouplingCollate(collate_fn=...)."
            )
        if isinstance(dataset, IterableDataset):
            raise TypeError("PooledDataLoader needs a map-style dataset (it samples the indices of pools).")
        if batch_sampler is None:
            if sampler is None and shuffle:
                sampler = RandomSampler(dataset, generator=generator)  # as DataLoader builds it
            elif sampler is None:
                sampler = SequentialSampler(dataset)
            elif shuffle:
                raise ValueError("PooledDataLoader: sampler and shuffle=True exclude each other.")
            batch_sampler = PoolBatchSampler(sampler, int(batch_size or 0), drop_last, collate.pool_batches)
        elif not isinstance(batch_sampler, PoolBatchSampler):
            raise TypeError(
                "PooledDataLoader: batch_sampler must be a PoolBatchSampler, got "
                f"{type(batch_sampler).__name__}; pass batch_size, shuffle or sampler and drop_last instead."
            )
        elif batch_size != 1 or shuffle or sampler is not None or drop_last:
            raise ValueError(
                "PooledDataLoader: batch_sampler excludes batch_size, shuffle, sampler and drop_last."
            )
        elif batch_sampler.pool_batches != collate.pool_batches:  # rebuilt from its attributes only
            batch_sampler = PoolBatchSampler(
                batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last, collate.pool_batches
            )
        pools = PoolCollate(collate, batch_sampler.batch_size)
        super().__init__(
            dataset, batch_sampler=batch_sampler, collate_fn=pools, generator=generator, **kwargs
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """The training batches, pool after pool."""
        for pool in super().__iter__():
            yield from pool

    def __len__(self) -> int:
        """The number of training batches (what Lightning counts as steps per epoch)."""
        pools = self.batch_sampler
        assert isinstance(pools, PoolBatchSampler)  # set in __init__, frozen by DataLoader
        return pools.num_batches
