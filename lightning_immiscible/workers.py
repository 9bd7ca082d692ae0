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

```python
{**batch,                      # when the inner collate returns a dict: its keys, unchanged
 "batch": batch,               # otherwise (tensor, tuple, list, ...): the collated batch
 "immiscible_noise": noise,    # (B, *dims) float32: noise[i] is coupled with x0[i]
 "immiscible_index": index,    # (B,) int64: CouplingResult.index
 "immiscible_stats": stats}    # (3,) float64: cost_before, cost_after, assign_ms
```

Examples:
    ```python
    from torch.utils.data import DataLoader
    from lightning_immiscible.workers import CouplingCollate, split_coupled_batch

    loader = DataLoader(ds, batch_size=256, num_workers=4, collate_fn=CouplingCollate("lsa", seed=0))
    for batch in loader:
        inner, noise = split_coupled_batch(batch)     # noise is coupled with x0 of `inner`
    ```

Randomness: no global RNG is touched. Each batch's noise comes from a ``torch.Generator`` seeded
from ``(seed, epoch, worker seed, worker id, batch counter)``; the worker seed is the one the
DataLoader hands each worker per iterator (``get_worker_info().seed``), so epochs differ and a
run is reproducible when the DataLoader's own seed is (``DataLoader(generator=...)`` or
``torch.manual_seed``).

Only valid when the module's ``immiscible_data(batch)`` is the collated data tensor itself (not,
e.g., VAE latents or a GPU augmentation of it): the worker couples what it sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from lightning_immiscible.batches import find_data_tensor
from lightning_immiscible.coupling import CouplingSpec, Method, Metric

#: Key of the coupled noise in a batch produced by `CouplingCollate`.
NOISE_KEY = "immiscible_noise"
INDEX_KEY = "immiscible_index"
STATS_KEY = "immiscible_stats"
#: Key of the inner batch when the inner collate does not return a dict.
BATCH_KEY = "batch"
_KEYS = (NOISE_KEY, INDEX_KEY, STATS_KEY)


class CouplingCollate:
    """A picklable ``collate_fn`` that returns the batch together with its coupled noise.

    Args:
        method: ``lsa``, ``knn``, ``flip`` or ``none`` (see [couple][lightning_immiscible.coupling.couple]).
        k: Candidates per item for ``knn`` (ignored otherwise).
        seed: Base seed of the noise stream.
        collate_fn: Inner collate (``torch.utils.data.default_collate`` by default).
        data_fn: Maps the collated batch to ``x0`` ``(B, *dims)``; by default the first floating
            tensor (``ImmiscibleMixin``'s default ``immiscible_data``).
        metric: Distance for the assignment (``l2``, ``sqeuclidean``, ``l1``).
        solver: Assignment solver (``auto`` = fastest installed exact solver, ``greedy`` = approx).
    """

    def __init__(
        self,
        method: Method = "lsa",
        k: int = 4,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        data_fn: Callable[[Any], Tensor] | None = None,
        metric: Metric = "l2",
        solver: str = "auto",
    ) -> None:
        # Validated once, like every coupling path (CPU workers: precision "auto" is fp32).
        self.spec = CouplingSpec(method=method, metric=metric, solver=solver, k=int(k))
        self.seed = int(seed)
        self.collate_fn = collate_fn or default_collate
        self.data_fn = data_fn or find_data_tensor
        self.epoch = 0
        self._counter = 0

    @property
    def method(self) -> str:
        """The coupling method (`spec.method`)."""
        return self.spec.method

    @property
    def k(self) -> int:
        """Candidates per item for `knn` (`spec.k`)."""
        return self.spec.k

    def set_epoch(self, epoch: int) -> None:
        """Mixes ``epoch`` into the seed (effective for non-persistent workers and ``num_workers=0``)."""
        self.epoch = int(epoch)

    def generator(self) -> torch.Generator:
        """The generator for the next batch of this process (advances the batch counter)."""
        info = get_worker_info()
        wid, wseed = (info.id, info.seed) if info is not None else (-1, 0)
        entropy = [self.seed, self.epoch, wseed % 2**63, wid + 1, self._counter]
        self._counter += 1
        state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def draw_noise(self, x0: Tensor, gen: torch.Generator) -> Tensor:
        """Draws ``(B, *dims)`` (``knn``: ``(B, k, *dims)``) float32 Gaussian noise from ``gen``."""
        shape = (x0.shape[0], self.k, *x0.shape[1:]) if self.method == "knn" else tuple(x0.shape)
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        """Collates ``samples``, couples noise with the batch's ``x0`` and returns both.

        Args:
            samples: The dataset items of one batch.

        Returns:
            The dict described in the module docstring.
        """
        batch = self.collate_fn(samples)
        x0 = self.data_fn(batch)
        res = self.spec.couple(x0, self.draw_noise(x0, self.generator()))
        stats = torch.tensor([res.cost_before, res.cost_after, res.assign_ms], dtype=torch.float64)
        extra = {NOISE_KEY: res.noise, INDEX_KEY: res.index, STATS_KEY: stats}
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
    if set(batch) == {BATCH_KEY, *_KEYS}:
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
    """

    batch: Any
    noise: Tensor
    index: Tensor
    cost_before: float
    cost_after: float
    assign_ms: float

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
        return cls(inner, noise, batch[INDEX_KEY], before, after, ms)
