"""The dataset-level coupling in a DataLoader: each batch's noise picks its items from the whole training set.

[DatasetCouplingLoader][lightning_immiscible.dataset_coupling.DatasetCouplingLoader] turns a
fitted [SemidiscreteMap][lightning_immiscible.semidiscrete.SemidiscreteMap] into training batches.
For the batch at position `(rank, epoch, index)` a DataLoader worker

1. draws the batch's noise `(B, *dims)` from the stream `Stream.DATASET` at that position (and, for
   a map with labels, each draw's label as the label of a uniformly drawn item),
2. sends it through the map (one inner-product search over the training set),
3. fetches those items from the dataset and collates them,

and hands the batch over in [CouplingCollate][lightning_immiscible.workers.CouplingCollate]'s
format: with [ImmiscibleMixin][lightning_immiscible.mixin.ImmiscibleMixin] and
[ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling], `training_step` gets the
items and `self.noise_like(x0)` returns the noise that chose them. Items are drawn with replacement
(the map hits every item equally often on average, not exactly once per epoch); an epoch is
`len(dataset) // batch_size` batches unless `num_batches` says otherwise.

Positions: the loader's sampler ([BatchPositions][lightning_immiscible.dataset_coupling.BatchPositions])
runs in the training process, reads the rank there (so ranks draw distinct noise), and Lightning
sets its epoch. The loader is resumable: Lightning saves its `state_dict` (epoch and batches
delivered) in checkpoints, and a resumed run continues the noise stream where it stopped.

The search runs in the workers, off the training step's critical path (with `num_workers=0`, in
the training process). Each worker holds the map: the items as `(N, D)` float32 and the potentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate

from lightning_immiscible.batches import find_data_tensor
from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.groups import distributed_ready, process_rank
from lightning_immiscible.semidiscrete import SemidiscreteMap
from lightning_immiscible.streams import Stream, draw_noise, stream_seed
from lightning_immiscible.workers import (
    BATCH_KEY,
    CONDITION_KEY,
    INDEX_KEY,
    MAP_KEY,
    NOISE_KEY,
    POSITION_KEY,
    STATS_KEY,
)


class BatchPositions(DistributedSampler):
    """The positions `(rank, epoch, index)` of one rank's batches in an epoch.

    A `DistributedSampler`, so that Lightning keeps it under DDP (the positions already are per
    rank) and calls its `set_epoch`. It samples no items: the noise drawn for each position does.

    Args:
        num_batches: Batches per epoch on each rank.
        rank: This process's global rank; `None`: read from `torch.distributed` when iterated (in
            the training process), else 0.
    """

    def __init__(self, num_batches: int, rank: int | None = None) -> None:  # no super(): no dataset
        if num_batches < 1:
            raise ValueError(f"BatchPositions(num_batches={num_batches}): need at least one batch per epoch.")
        self.num_batches, self.rank_override = int(num_batches), rank
        self.epoch, self.start = 0, 0
        self.shuffle, self.seed, self.drop_last = False, 0, True  # DistributedSampler's attributes
        self.num_replicas = 1  # the positions are already this rank's
        self.num_samples = self.total_size = self.num_batches

    @property
    def rank(self) -> int:  # type: ignore[override]
        """The rank the positions are drawn for."""
        if self.rank_override is not None:
            return int(self.rank_override)
        return process_rank() if distributed_ready() else 0

    @rank.setter
    def rank(self, value: int) -> None:
        self.rank_override = value

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch `epoch` (at batch 0, unless a restored state says where to resume)."""
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:  # type: ignore[override]
        rank, start = self.rank, self.start
        self.start = 0
        for index in range(start, self.num_batches):
            yield (rank, self.epoch, index)

    def __len__(self) -> int:
        return self.num_batches


class MappedBatches(Dataset):
    """Whole training batches by position: the items the map sends the position's noise to.

    Args:
        dataset: The map-style training dataset; item `i` must hold the map's item `i`.
        sd_map: The fitted map.
        batch_size: Items per batch.
        seed: The noise stream's seed.
        collate_fn: Collates the fetched items (`default_collate` by default).
        data_fn: The collated batch's data tensor (by default its first floating tensor), checked
            against the map's items.
    """

    def __init__(
        self,
        dataset: Dataset,
        sd_map: SemidiscreteMap,
        batch_size: int,
        seed: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        data_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        self.dataset, self.map, self.batch_size, self.seed = dataset, sd_map, int(batch_size), int(seed)
        self.collate_fn = collate_fn or default_collate
        self.data_fn = data_fn or find_data_tensor

    def noise_for(self, position: tuple[int, int, int]) -> Tensor:
        """`(B, *dims)` float32 noise of the batch at `position`, on the CPU."""
        return draw_noise((self.batch_size, *self.map.item_shape), self.seed, Stream.DATASET, *position)

    def labels_for(self, position: tuple[int, int, int]) -> Tensor | None:
        """Each draw's label (the label of a uniformly drawn item), for a map with labels."""
        if self.map.labels is None:
            return None
        gen = torch.Generator().manual_seed(stream_seed(self.seed, Stream.DATASET, *position, 1))
        return self.map.labels[torch.randint(self.map.n, (self.batch_size,), generator=gen)]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, position: tuple[int, int, int]) -> dict[str, Any]:
        noise = self.noise_for(position)
        start = time.perf_counter()
        labels = self.labels_for(position)
        index = self.map.assign(noise.to(self.map.items.device), labels).cpu()
        search_ms = 1e3 * (time.perf_counter() - start)
        batch = self.collate_fn([self.dataset[i] for i in index.tolist()])
        x0 = self.data_fn(batch)
        self._check_items(x0, index)
        flat_x, flat_z = x0.reshape(len(index), -1).double(), noise.reshape(len(index), -1).double()
        before = float(torch.cdist(flat_z, flat_x).pow(2).mean())  # any item with any draw of the batch
        after = float((flat_z - flat_x).pow(2).sum(1).mean())
        extra = {
            NOISE_KEY: noise,
            INDEX_KEY: torch.arange(len(index)),
            STATS_KEY: torch.tensor([before, after, 0.0], dtype=torch.float64),
            POSITION_KEY: torch.tensor(position, dtype=torch.int64),
            MAP_KEY: torch.tensor([search_ms, float(index.unique().numel())], dtype=torch.float64),
        }
        if labels is not None:  # the drawn labels: each item's own (the map matched within them)
            extra[CONDITION_KEY] = labels
        if isinstance(batch, dict):
            return {**batch, **extra}
        return {BATCH_KEY: batch, **extra}

    def _check_items(self, x0: Tensor, index: Tensor) -> None:
        expected = self.map.items[index.to(self.map.items.device)].cpu()
        got = x0.detach().reshape(len(index), -1).float().cpu()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            raise CouplingInputError(
                "DatasetCouplingLoader: the dataset's items differ from the items the map was fitted on "
                f"(batch data {tuple(x0.shape)} vs the map's items {(len(index), *self.map.item_shape)}). "
                "Build the SemidiscreteMap from exactly the tensors the dataset returns, in its order "
                "(no random augmentation: the map pairs noise with fixed items)."
            )


def _identity(item: Any) -> Any:
    """The collate of a loader whose dataset returns whole batches (picklable)."""
    return item


class DatasetCouplingLoader(DataLoader):
    """A DataLoader whose batches are the items a fitted map sends each batch's noise to.

    Args:
        dataset: A map-style dataset whose item `i` holds the map's item `i` (e.g. a
            `TensorDataset` of the tensor the map was built from, with its labels).
        sd_map: A fitted [SemidiscreteMap][lightning_immiscible.semidiscrete.SemidiscreteMap].
        batch_size: Items per training batch.
        num_batches: Batches per epoch on each rank (default: `len(dataset) // batch_size`).
        seed: The training noise's seed (`None`: `torch.initial_seed()` now, the run seed).
        rank: This process's rank (`None`: read from `torch.distributed` in the training process).
        collate_fn: Collates the fetched items (`default_collate` by default).
        data_fn: The collated batch's data tensor (default: its first floating tensor).
        **kwargs: Other `DataLoader` arguments (`num_workers`, `pin_memory`, ...); not `shuffle`,
            `sampler`, `batch_sampler` or `persistent_workers=True`.

    Raises:
        TypeError: An iterable dataset, or `sd_map` that is not a `SemidiscreteMap`.
        ValueError: The dataset's length differs from the map's items, or a refused argument.
    """

    def __init__(
        self,
        dataset: Dataset,
        sd_map: SemidiscreteMap,
        batch_size: int,
        *,
        num_batches: int | None = None,
        seed: int | None = None,
        rank: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        data_fn: Callable[[Any], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError("DatasetCouplingLoader needs a map-style dataset with a length (items by index).")
        if not isinstance(sd_map, SemidiscreteMap):
            raise TypeError(f"DatasetCouplingLoader needs a SemidiscreteMap, got {type(sd_map).__name__}.")
        if len(dataset) != sd_map.n:  # type: ignore[arg-type]
            raise ValueError(
                f"DatasetCouplingLoader: the dataset has {len(dataset)} items, the map {sd_map.n}: "  # type: ignore[arg-type]
                "build the map from exactly the dataset's items."
            )
        refused = sorted(k for k in ("shuffle", "sampler", "batch_sampler") if kwargs.get(k) is not None)
        if refused or kwargs.get("persistent_workers"):
            raise ValueError(
                "DatasetCouplingLoader chooses its items by noise: drop "
                f"{refused or ['persistent_workers=True']} "
                "(persistent workers would keep a stale copy of the noise positions)."
            )
        for key in ("shuffle", "sampler", "batch_sampler", "drop_last"):
            kwargs.pop(key, None)
        per_epoch = num_batches if num_batches is not None else len(dataset) // batch_size  # type: ignore[arg-type]
        seed = int(torch.initial_seed() if seed is None else seed)
        self.batches = MappedBatches(dataset, sd_map, batch_size, seed, collate_fn, data_fn)
        self.positions = BatchPositions(max(1, per_epoch), rank)
        self._delivered = 0
        super().__init__(
            self.batches, batch_size=None, sampler=self.positions, collate_fn=_identity, **kwargs
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._delivered = self.positions.start
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the noise stream stands: the epoch and the batches of it delivered so far."""
        return {"epoch": self.positions.epoch, "delivered": self._delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resumes the noise stream at a saved state (Lightning calls this when it resumes a fit)."""
        self.positions.epoch = int(state["epoch"])
        self.positions.start = int(state["delivered"])
