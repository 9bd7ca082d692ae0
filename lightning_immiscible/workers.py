"""Coupling in DataLoader worker processes: takes the assignment off the training critical path.

Where no collective is needed (``scope="local"``: every rank couples its own batch, or
``method="knn"``: every item alone), the coupling depends only on the batch itself, so it can run
while the model trains on the previous batch:
[CouplingCollate][lightning_immiscible.workers.CouplingCollate] wraps a `collate_fn`, draws the
noise in the worker from a per-worker generator and couples it there. With Lightning, the
module's [ImmiscibleMixin][lightning_immiscible.mixin.ImmiscibleMixin] unwraps such batches in
`on_after_batch_transfer` ([WorkerCoupling][lightning_immiscible.workers.WorkerCoupling]), so
`training_step` gets the inner batch and the callback uses the worker's noise.

Batch format (what the DataLoader yields, see
[split_coupled_batch][lightning_immiscible.workers.split_coupled_batch]):

```text
{**batch,                    # a dict from the inner collate: its keys
 "batch": batch,             # else (tensor, tuple, ...): the batch
 "immiscible_noise": noise,  # (B, *dims) float32, noise[i] with x0[i]
 "immiscible_index": index,  # (B,) int64: CouplingResult.index
 "immiscible_stats": stats}  # (3,) float64: before, after, assign_ms
```

With a `condition_fn`, two more keys: `"immiscible_condition"` (`(B,)` the labels the noise was
coupled within) and `"immiscible_prior_skew"` (`(1,)` float64, the
[prior_skew][lightning_immiscible.conditional.prior_skew] of the batch; NaN when undefined). A batch
whose condition is a `(B, E)` float embedding carries `"immiscible_condition_leak"` instead of the
prior skew: `(3,)` float64, the [condition_leak][lightning_immiscible.embedding.condition_leak], the
condition weight `w` and the candidate share it reached (NaN when undefined). A batch
that a worker coupled with a `solver="auto"` race batch also carries `"immiscible_race"` (`(n, 7)`
int64, the race's reports: see [CouplingCollate][lightning_immiscible.workers.CouplingCollate]).

Examples:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_immiscible.workers import CouplingCollate, split_coupled_batch

    ds = TensorDataset(torch.rand(64, 3, 8, 8) * 2 - 1)
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=CouplingCollate("lsa", seed=0))
    for batch in loader:
        inner, noise = split_coupled_batch(batch)  # noise is coupled with x0 of `inner`
    ```

Randomness: no global RNG is touched. The noise of a batch is a pure function of
`(seed, rank, epoch, batch position in the epoch)` (see
[CouplingCollate.noise_for][lightning_immiscible.workers.CouplingCollate.noise_for]), so

- different ranks, workers, batches and epochs draw different noise (the rank is part of the
  seed: `seed_everything` makes the run seed equal on every rank, the rank tells them apart);
- a run is reproducible from `seed` (or, when `seed` is `None`, from `torch.initial_seed()` at
  construction: the run seed `seed_everything` sets, equal on all ranks);
- a resumed run draws the same noise per batch position as an uninterrupted one (the position
  is the epoch and the batch index, which Lightning restores; the collate keeps no other state).

A worker knows its batch position as `worker id + num_workers x (batches it collated)` (map-style
datasets: a DataLoader deals batches to its workers in turn) and the epoch from
[set_epoch][lightning_immiscible.workers.CouplingCollate.set_epoch], which
[ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] calls at each epoch start.
Each batch carries the position it was drawn for; the callback checks it against the training
loop's `(rank, epoch, batch_idx)` and, where they differ, couples that batch again on the
training process with the right position (correct, but on the critical path, and a batch of a
pool alone, without its pool; logged once).
That happens for the first epoch of a run resumed at epoch > 0 (Lightning starts the workers
before any callback hook), after epoch 0 with `persistent_workers=True` (persistent workers
never see `set_epoch`: prefer `persistent_workers=False`), for iterable datasets, and when the
workers could not tell their rank (pass `rank=`, or build the collate in `train_dataloader()`).
When the callback cannot identify the collate that drew such a batch (it is wrapped in another
callable, or several training loaders have one), it couples the batch on the training process
with its own method and noise stream instead and warns once: stale noise is never used.

Pools larger than a batch: `CouplingCollate(pool_batches=k)` couples `k` consecutive training
batches in one assignment. A DataLoader hands out one collate call per item, so such a collate is
the `collate_fn` of a [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader], whose
[PoolCollate][lightning_immiscible.workers.PoolCollate] cuts each pool back into its `k` batches of
the format above ([collate_pool][lightning_immiscible.workers.CouplingCollate.collate_pool]). Batch
`j` of pool `q` is at batch position `q k + j` and its noise is drawn for that position, exactly
as without pooling; only the assignment spans the pool.

Only valid when the module's ``immiscible_data(batch)`` is the collated data tensor itself (not,
e.g., VAE latents or a GPU augmentation of it): the worker couples what it sees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from lightning_immiscible.batches import find_data_tensor
from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.costs import paired_distance
from lightning_immiscible.coupling import CouplingResult, CouplingSpec, Method, Metric
from lightning_immiscible.embedding import ConditionMetric, is_embedding
from lightning_immiscible.groups import distributed_ready, process_rank
from lightning_immiscible.process_race import ProcessRace
from lightning_immiscible.streams import Stream, draw_noise

#: Key of the coupled noise in a batch produced by `CouplingCollate`.
NOISE_KEY = "immiscible_noise"
INDEX_KEY = "immiscible_index"
STATS_KEY = "immiscible_stats"
#: Key of the `(rank, epoch, batch index)` int64 position the noise was drawn for.
POSITION_KEY = "immiscible_position"
#: Key of the inner batch when the inner collate does not return a dict.
BATCH_KEY = "batch"
#: Keys of the labels and the prior-skew diagnostic (batches of a collate with a `condition_fn`).
CONDITION_KEY = "immiscible_condition"
SKEW_KEY = "immiscible_prior_skew"
#: Key of an embedding condition's `(3,)` float64 leak, weight and candidate share.
LEAK_KEY = "immiscible_condition_leak"
#: Key of the `solver="auto"` race reports of a worker's race batch (`(n, 7)` int64).
RACE_KEY = "immiscible_race"
#: Key of a dataset-level batch's `(2,)` float64 search time (ms) and distinct items (see
#: [DatasetCouplingLoader][lightning_immiscible.dataset_coupling.DatasetCouplingLoader]).
MAP_KEY = "immiscible_map"
_KEYS = (NOISE_KEY, INDEX_KEY, STATS_KEY, POSITION_KEY, CONDITION_KEY, SKEW_KEY, LEAK_KEY, RACE_KEY, MAP_KEY)
_OPTIONAL_KEYS = {POSITION_KEY, CONDITION_KEY, SKEW_KEY, LEAK_KEY, RACE_KEY, MAP_KEY}


class CouplingCollate:
    """A picklable ``collate_fn`` that returns the batch together with its coupled noise.

    Args:
        method: ``lsa``, ``knn``, ``flip`` or ``none`` (see [couple][lightning_immiscible.coupling.couple]).
        k: Candidates per item for ``knn`` (ignored otherwise).
        seed: Seed of the noise stream; `None`: `torch.initial_seed()` of the process that
            builds the collate (the seed `seed_everything` set: equal on every rank). The collate
            keeps no checkpoint of its own: a resumed run draws the same worker noise only with
            the same seed (pass `seed=`, or call `seed_everything` before building it);
            [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] records the
            collates' seeds in its checkpoint and warns when a resumed run's differ.
        collate_fn: Inner collate (``torch.utils.data.default_collate`` by default).
        data_fn: Maps the collated batch to ``x0`` ``(B, *dims)``; by default the first floating
            tensor (``ImmiscibleMixin``'s default ``immiscible_data``).
        metric: Distance for the assignment (``l2``, ``sqeuclidean``, ``l1``).
        solver: Assignment solver (``auto`` = the exact one measured fastest for the item dimension,
            ``greedy`` = approximate).
        rank: This process's global rank; `None`: `torch.distributed.get_rank()` where a process
            group is initialised (the training process, and workers forked from it), else the
            rank at construction, else 0.
        condition_fn: Maps the collated batch to its `(B,)` integer labels (e.g.
            `operator.itemgetter(1)`; picklable, for spawned workers): the noise is then coupled
            within each label (see
            [conditional][lightning_immiscible.conditional]); or to a `(B, E)` float embedding:
            coupled with the condition term ([embedding][lightning_immiscible.embedding]).
            `None`: unconditional.
        within_condition: `False` couples across conditions; they then only feed the diagnostic.
        pool_batches: Training batches coupled in one assignment (keyword). `1`: each batch alone,
            as the `collate_fn` of any DataLoader. `k > 1`: pools of `k` consecutive batches
            (`k B` items; with a `condition_fn` each label's block is the pool's), handed to
            training as `k` batches of the loader's batch size; only as the `collate_fn` of a
            [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader]. The assignment costs
            about `(k B)^3` (exact methods), paid in the workers once per `k` steps.
        candidate_share: For an embedding: the target share of candidate pairs (keyword; see
            [CouplingSpec][lightning_immiscible.coupling.CouplingSpec]).
        condition_metric: For an embedding: `"sqeuclidean"` or `"cosine"` (keyword).

    Raises:
        ValueError: On an unknown method, metric or solver, `k < 1` or `pool_batches < 1`.

    Attributes:
        race: The collate's own `solver="auto"` race
            ([ProcessRace][lightning_immiscible.process_race.ProcessRace]). A DataLoader worker
            races on its copy and sends each race batch's times back in the batch (`RACE_KEY`);
            [credit][lightning_immiscible.workers.CouplingCollate.credit] counts them on this copy,
            in the training process, which workers started later inherit: without
            `persistent_workers` a race decided in one epoch is not run again in the next.
            [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] credits them for
            the train loader's collate; without the callback, call `credit` on each batch, or use
            `persistent_workers=True` (each worker then keeps its own race).
    """

    def __init__(
        self,
        method: Method = "lsa",
        k: int = 4,
        seed: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        data_fn: Callable[[Any], Tensor] | None = None,
        metric: Metric = "l2",
        solver: str = "auto",
        rank: int | None = None,
        condition_fn: Callable[[Any], Tensor] | None = None,
        within_condition: bool = True,
        *,
        pool_batches: int = 1,
        candidate_share: float = 0.2,
        condition_metric: ConditionMetric = "sqeuclidean",
    ) -> None:
        # Validated once, like every coupling path (CPU workers: precision "auto" is fp32).
        self.spec = CouplingSpec(method=method, metric=metric, solver=solver, k=int(k))
        self.spec = dataclasses.replace(
            self.spec, within_condition=within_condition, candidate_share=candidate_share,
            condition_metric=condition_metric,
        )  # fmt: skip
        self.condition_fn = condition_fn
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.rank = rank
        self._built_on_rank = process_rank() if distributed_ready() else None
        self.collate_fn = collate_fn or default_collate
        self.data_fn = data_fn or find_data_tensor
        self.epoch = 0
        self._counter = 0
        self.race = ProcessRace(label="CouplingCollate")
        if isinstance(pool_batches, bool) or not isinstance(pool_batches, int) or pool_batches < 1:
            raise ValueError(
                f"CouplingCollate(pool_batches={pool_batches!r}): pool_batches must be an int >= 1 "
                "(the training batches coupled in one assignment; 1: each batch alone)."
            )
        self.pool_batches = pool_batches

    @property
    def method(self) -> str:
        """The coupling method (`spec.method`)."""
        return self.spec.method

    @property
    def k(self) -> int:
        """Candidates per item for `knn` (`spec.k`)."""
        return self.spec.k

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch `epoch`: its batch positions count from 0 again.

        Reaches the copies in DataLoader workers only when they are started after it (every epoch
        without `persistent_workers`); [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling]
        calls it at each epoch start.
        """
        self.epoch, self._counter = int(epoch), 0

    def current_rank(self) -> int:
        """The rank this process draws for (see the `rank` argument)."""
        if self.rank is not None:
            return int(self.rank)
        if distributed_ready():
            return process_rank()
        return self._built_on_rank or 0

    def next_position(self) -> tuple[int, int, int]:
        """`(rank, epoch, index)` of the next DataLoader item this process collates (advances it).

        The item is a batch, or with `pool_batches=k` a pool, whose batch `j` is at batch position
        `k index + j`.
        """
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = (self.current_rank(), self.epoch, wid + workers * self._counter)
        self._counter += 1
        return position

    def noise_for(self, x0: Tensor, position: tuple[int, int, int]) -> Tensor:
        """The noise drawn for the batch at `position` = `(rank, epoch, batch index)`.

        The stream [Stream.WORKER][lightning_immiscible.streams.Stream] at `position` draws
        `(B, *dims)` (`knn`: `(B, k, *dims)`) float32 standard normal noise on the CPU.
        """
        shape = (x0.shape[0], self.k, *x0.shape[1:]) if self.method == "knn" else tuple(x0.shape)
        return draw_noise(shape, self.seed, Stream.WORKER, *position)

    def couple_at(
        self, x0: Tensor, position: tuple[int, int, int], condition: Tensor | None = None
    ) -> CouplingResult:
        """Couples `x0` with the noise drawn for `position` (within `condition`'s labels, if given)."""
        return self.spec.couple(x0, self.noise_for(x0, position), condition, race=self.race)

    def couple_pool(
        self, x0s: list[Tensor], noises: list[Tensor], conditions: list[Tensor] | None = None
    ) -> list[CouplingResult]:
        """Couples several batches in one assignment: concatenate, `spec.couple`, split per batch.

        The pool's noise is the concatenation of the batches' own draws, so it is as i.i.d. Gaussian
        as each of them; every item may get any of the pool's noise vectors (with `conditions`: any
        of its label's block of the pool).

        Args:
            x0s: `k` tensors `(B_j, *dims)`, the batches' data (the same `dims`).
            noises: `k` tensors, the noise drawn for each batch: `(B_j, *dims)` (`knn`:
                `(B_j, k, *dims)`).
            conditions: `k` `(B_j,)` integer label tensors or `(B_j, E)` float embeddings, or
                `None` (unconditional).

        Returns:
            One [CouplingResult][lightning_immiscible.coupling.CouplingResult] per batch: `noise`
            `(B_j, *dims)`, batch `j`'s coupled noise; `index` `(B_j,)` int64 into the pool's noise
            `torch.cat(noises)` (`knn`: each item's candidate, as for one batch); `cost_before` and
            `cost_after`, the mean pair distance over batch `j`'s items with its own drawn noise and
            with its coupled noise; `cost_ms` and `solve_ms`, the pool's divided by `k`;
            `prior_skew` (labels) or `condition_leak`, `condition_weight` and `candidate_share`
            (an embedding), the pool's (one N(0, 1) draw per pool without a lean) on the first
            result and `None` on the others. One batch: the result of `spec.couple` as it is.

        Raises:
            CouplingInputError: For an empty list, lists of different lengths or batches whose
                items differ in shape, besides `spec.couple`'s own checks.
        """
        shapes = {tuple(x.shape[1:]) for x in x0s}
        if not x0s or len(noises) != len(x0s) or len(shapes) > 1 or len(conditions or x0s) != len(x0s):
            raise CouplingInputError(
                f"couple_pool needs one noise (and condition) tensor per batch and batches of one item "
                f"shape; got {len(x0s)} batches of item shapes {sorted(shapes)}, {len(noises)} noises.",
                "shape",
            )
        labels = None if conditions is None else torch.cat(conditions)
        pooled = self.spec.couple(torch.cat(x0s), torch.cat(noises), labels, self.race)
        if len(x0s) == 1:
            return [pooled]
        sizes, n = [x.shape[0] for x in x0s], len(x0s)
        parts = zip(x0s, noises, pooled.noise.split(sizes), pooled.index.split(sizes), strict=True)
        results = []
        for j, (x0, drawn, noise, index) in enumerate(parts):
            before = _mean_distance(x0, drawn[:, 0] if self.method == "knn" else drawn, self.spec.metric)
            first = j == 0  # the pool's diagnostics: one draw per pool
            results.append(
                CouplingResult(noise, index, before, _mean_distance(x0, noise, self.spec.metric),
                               pooled.cost_ms / n, pooled.solve_ms / n, pooled.method, pooled.metric,
                               pooled.prior_skew if first else None,
                               pooled.condition_leak if first else None,
                               pooled.condition_weight if first else None,
                               pooled.candidate_share if first else None)
            )  # fmt: skip
        return results

    def credit(self, batch: Any) -> None:
        """Counts the race times a worker's batch carries on this collate's race (see `race`).

        Args:
            batch: A batch from a DataLoader with this collate (the dict it returns, or a
                [WorkerCoupling][lightning_immiscible.workers.WorkerCoupling]); others count nothing.
        """
        reports = batch.race if isinstance(batch, WorkerCoupling) else race_reports(batch)
        for report in reports:
            self.race.credit(report)

    def couple_on(
        self, x0: Tensor, position: tuple[int, int, int], condition: Tensor | None = None
    ) -> CouplingResult:
        """[couple_at][lightning_immiscible.workers.CouplingCollate.couple_at] for `x0` on any device.

        The callback's path for a batch a worker drew for another position: the noise is drawn
        and coupled on the CPU (as in a worker) and returned on `x0`'s device and dtype.
        """
        res = self.couple_at(x0.detach().cpu(), position, None if condition is None else condition.cpu())
        return dataclasses.replace(res, noise=res.noise.to(x0), index=res.index.to(x0.device))

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        """Collates ``samples``, couples noise with the batch's ``x0`` and returns both.

        Args:
            samples: The dataset items of one batch.

        Returns:
            The dict described in the module docstring.

        Raises:
            RuntimeError: If `pool_batches > 1`: a plain DataLoader would couple batch by batch;
                use a [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader].
        """
        if self.pool_batches > 1:
            raise RuntimeError(
                f"CouplingCollate(pool_batches={self.pool_batches}) couples pools of {self.pool_batches} "
                "training batches, which a plain DataLoader cannot hand out: use it as the collate_fn of "
                "lightning_immiscible.PooledDataLoader(dataset, batch_size=..., collate_fn=collate)."
            )
        return self.collate_pool([samples])[0]

    def collate_pool(self, chunks: list[list[Any]]) -> list[dict[str, Any]]:
        """Collates a pool's batches and couples their noise in one assignment.

        Each chunk is collated by the inner `collate_fn` (never a slice of a collated batch); batch
        `j` of the pool at `(rank, epoch, q)`
        ([next_position][lightning_immiscible.workers.CouplingCollate.next_position]) gets the noise
        drawn for batch position `q pool_batches + j`; then
        [couple_pool][lightning_immiscible.workers.CouplingCollate.couple_pool].

        Args:
            chunks: The dataset items of 1 to `pool_batches` consecutive training batches.

        Returns:
            One dict per chunk, in the module docstring's format: its items' coupled noise,
            `index` into the pool's noise, its own before/after distances and the pool's assignment
            time divided by the batches (`STATS_KEY`), its position. The pool's prior skew and
            `solver="auto"` race reports ride on the first batch only (the skew is NaN on the
            others: one draw per pool).
        """
        if not 1 <= len(chunks) <= self.pool_batches:
            raise ValueError(
                f"collate_pool got {len(chunks)} batches; a pool holds 1 to {self.pool_batches}."
            )
        batches = [self.collate_fn(chunk) for chunk in chunks]
        x0s = [self.data_fn(batch) for batch in batches]
        rank, epoch, pool = self.next_position()
        positions = [(rank, epoch, pool * self.pool_batches + j) for j in range(len(chunks))]
        conditions = None if self.condition_fn is None else [self.condition_fn(batch) for batch in batches]
        results = self.couple_pool(x0s, [self.noise_for(x0, p) for x0, p in zip(x0s, positions, strict=True)],
                                   conditions)  # fmt: skip
        reports = self.race.pop_reports()  # in the training process this copy counted them already
        reports = reports if reports and get_worker_info() is not None else []
        labels = conditions or [None] * len(batches)
        parts = zip(batches, results, positions, labels, strict=True)
        return [_coupled_batch(*part, [] if j else reports) for j, part in enumerate(parts)]


class PoolCollate:
    """The `collate_fn` of a [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader] (picklable).

    Cuts a pool's items into training batches of `batch_size` (the last may hold fewer) and hands
    them to [CouplingCollate.collate_pool][lightning_immiscible.workers.CouplingCollate.collate_pool].
    [find_collates][lightning_immiscible.workers.find_collates] sees through it.

    Attributes:
        collate: The [CouplingCollate][lightning_immiscible.workers.CouplingCollate] that couples.
        batch_size: Items per training batch.
    """

    def __init__(self, collate: CouplingCollate, batch_size: int) -> None:
        self.collate, self.batch_size = collate, int(batch_size)

    def __call__(self, samples: list[Any]) -> list[dict[str, Any]]:
        """The pool's batches, each coupled (see `CouplingCollate.collate_pool`)."""
        b = self.batch_size
        return self.collate.collate_pool([samples[i : i + b] for i in range(0, len(samples), b)])


def _mean_distance(x0: Tensor, noise: Tensor, metric: str) -> float:
    """Mean pair distance of `(x0[i], noise[i])` (0 for no items)."""
    return float(paired_distance(x0, noise, metric).double().mean()) if x0.shape[0] else 0.0


def _coupled_batch(
    batch: Any,
    res: CouplingResult,
    position: tuple[int, int, int],
    condition: Tensor | None,
    reports: list[list[int]],
) -> dict[str, Any]:
    """The batch dict of the module docstring for one coupled batch."""
    stats = torch.tensor([res.cost_before, res.cost_after, res.assign_ms], dtype=torch.float64)
    where = torch.tensor(position, dtype=torch.int64)
    extra = {NOISE_KEY: res.noise, INDEX_KEY: res.index, STATS_KEY: stats, POSITION_KEY: where}
    if reports:
        extra[RACE_KEY] = torch.tensor(reports, dtype=torch.int64)
    if condition is not None:
        skew = math.nan if res.prior_skew is None else res.prior_skew
        extra |= {CONDITION_KEY: condition, SKEW_KEY: torch.tensor([skew], dtype=torch.float64)}
    if is_embedding(condition):
        extra[LEAK_KEY] = embedding_stats(res)
    if isinstance(batch, Mapping):
        return {**batch, **extra}
    return {BATCH_KEY: batch, **extra}


def split_coupled_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """Splits a batch from `CouplingCollate` into `(inner_batch, noise)`.

    Args:
        batch: Any batch. One made by `CouplingCollate` carries `NOISE_KEY`.

    Returns:
        ``(inner, noise)``: the batch as the inner collate made it and the ``(B, *dims)`` coupled
        noise; ``(batch, None)`` for a batch without coupled noise.
    """
    if not isinstance(batch, Mapping) or NOISE_KEY not in batch:
        return batch, None
    if set(batch) - _OPTIONAL_KEYS == {BATCH_KEY, NOISE_KEY, INDEX_KEY, STATS_KEY}:
        return batch[BATCH_KEY], batch[NOISE_KEY]
    return {k: v for k, v in batch.items() if k not in _KEYS}, batch[NOISE_KEY]


@dataclass(frozen=True)
class WorkerCoupling:
    """A [CouplingCollate][lightning_immiscible.workers.CouplingCollate] batch, unpacked.

    [ImmiscibleMixin][lightning_immiscible.mixin.ImmiscibleMixin] makes one in its
    `on_after_batch_transfer` hook (after the batch reached the device), hands `batch` on to the
    training step and keeps the rest for
    [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling].

    Attributes:
        batch: The batch as the inner collate made it (what `training_step` receives).
        noise: `(B, *dims)` the noise the worker coupled: `noise[i]` is paired with `x0[i]`.
        index: `(B,)` int64, the worker's `CouplingResult.index`.
        cost_before: Mean pair distance before re-pairing.
        cost_after: Mean pair distance after.
        assign_ms: The worker's coupling time, ms (off the training step's critical path).
        position: `(rank, epoch, batch index)` the noise was drawn for (`None`: not recorded).
        condition: `(B,)` the labels the worker coupled within (`None`: unconditional).
        prior_skew: The worker's [prior_skew][lightning_immiscible.conditional.prior_skew] (or `None`).
        condition_leak: The worker's [condition_leak][lightning_immiscible.embedding.condition_leak]
            (an embedding condition; else `None`).
        condition_weight: The condition weight `w` the worker coupled with (or `None`).
        candidate_share: The candidate share `w` reached (or `None`).
        race: The worker's `solver="auto"` race reports (see `CouplingCollate.credit`).
        map_search_ms: For a dataset-level batch (its items chosen by its noise through a fitted
            map), the worker's search time in ms; `None` for a batch coupled by a collate.
        map_items: For a dataset-level batch, its number of distinct items.
    """

    batch: Any
    noise: Tensor
    index: Tensor
    cost_before: float
    cost_after: float
    assign_ms: float
    position: tuple[int, int, int] | None = None
    condition: Tensor | None = None
    prior_skew: float | None = None
    race: tuple[tuple[int, ...], ...] = ()
    condition_leak: float | None = None
    condition_weight: float | None = None
    candidate_share: float | None = None
    map_search_ms: float | None = None
    map_items: int | None = None

    @property
    def from_map(self) -> bool:
        """Whether the noise chose the items (a dataset-level batch) rather than being re-paired."""
        return self.map_search_ms is not None

    @classmethod
    def from_batch(cls, batch: Any) -> WorkerCoupling | None:
        """Unpacks `batch` if [CouplingCollate][lightning_immiscible.workers.CouplingCollate] made it.

        Args:
            batch: Any batch.

        Returns:
            The unpacked batch, or `None` for a batch without worker-coupled noise.
        """
        inner, noise = split_coupled_batch(batch)
        if noise is None:
            return None
        before, after, ms = (float(v) for v in batch[STATS_KEY].tolist())
        where = batch.get(POSITION_KEY)
        position = None if where is None else tuple(int(v) for v in where.tolist())
        skew = float(batch[SKEW_KEY][0]) if SKEW_KEY in batch else math.nan
        condition, skew_or_none = batch.get(CONDITION_KEY), None if math.isnan(skew) else skew
        found = cls(inner, noise, batch[INDEX_KEY], before, after, ms, position, condition, skew_or_none)  # type: ignore[arg-type]
        stats = batch[LEAK_KEY].tolist() if LEAK_KEY in batch else [math.nan] * 3
        leak, weight, share = (None if math.isnan(v) else float(v) for v in stats)
        search_ms, items = batch[MAP_KEY].tolist() if MAP_KEY in batch else (None, None)
        return dataclasses.replace(
            found, race=race_reports(batch), condition_leak=leak, condition_weight=weight,
            candidate_share=share, map_search_ms=search_ms,
            map_items=None if items is None else int(items),
        )  # fmt: skip


def embedding_stats(result: CouplingResult) -> Tensor:
    """`(3,)` float64: a result's condition leak, weight and candidate share (NaN for `None`)."""
    values = (result.condition_leak, result.condition_weight, result.candidate_share)
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def race_reports(batch: Any) -> tuple[tuple[int, ...], ...]:
    """The `solver="auto"` race reports a worker's batch carries (`RACE_KEY`; none: empty)."""
    if not isinstance(batch, Mapping) or RACE_KEY not in batch:
        return ()
    return tuple(tuple(int(v) for v in row) for row in batch[RACE_KEY].tolist())


def find_collates(loaders: Any) -> list[CouplingCollate]:
    """The [CouplingCollate][lightning_immiscible.workers.CouplingCollate]s of DataLoaders.

    Args:
        loaders: A DataLoader, or a list / tuple / dict of them (Lightning's `train_dataloader`).

    Returns:
        The collates, in loader order (empty when none couples in its workers); a
        [PooledDataLoader][lightning_immiscible.pools.PooledDataLoader]'s is the one its
        [PoolCollate][lightning_immiscible.workers.PoolCollate] wraps.
    """
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if not isinstance(loaders, list | tuple):
        loaders = [loaders]
    found = [getattr(ld, "collate_fn", None) for ld in loaders]
    found = [fn.collate if isinstance(fn, PoolCollate) else fn for fn in found]  # a PooledDataLoader's
    return [fn for fn in found if isinstance(fn, CouplingCollate)]
