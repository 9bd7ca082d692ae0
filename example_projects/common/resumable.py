"""Random streams that a checkpoint carries: a resumed run continues exactly as an uninterrupted one.

Lightning's checkpoint holds the weights, the optimizer, the loops' progress and the callbacks' state,
but not the global random state. Whatever a run draws from it (PyTorch's ``RandomSampler`` draws each
epoch's shuffle from it, a module may draw its training times from it) therefore continues
differently after a resume, and any other consumer of the global state (a ``DataLoader`` iterator's
base seed, drawn whenever an iteration starts, e.g. at every evaluation) changes what training draws
next. The pieces here draw from generators of their own, seeded from the run seed, and put their
position in the checkpoint:

- ``derive_seed``: a 63-bit seed from the run seed and words naming one use (NumPy's ``SeedSequence``).
- ``CountedStream``: draw ``i`` of a stream comes from a generator seeded from ``(seed, rank, i)``;
  the checkpoint keeps ``seed`` and the draw count (the same on every rank).
- ``SeededShuffle`` and ``ResumableLoader``: a shuffled training ``DataLoader`` whose order in epoch
  ``e`` is a function of ``(seed, e)`` and whose position within the epoch is in the checkpoint
  (Lightning saves and restores a train loader's ``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

Word = int | str


def derive_seed(seed: int, *words: Word) -> int:
    """A 63-bit generator seed for one use of randomness: ``SeedSequence([seed, *words])``.

    Strings are turned into integers by CRC-32, so ``derive_seed(s, "times", 0)`` names a stream.
    """
    ints = [int(seed)] + [zlib.crc32(w.encode()) if isinstance(w, str) else int(w) for w in words]
    state = np.random.SeedSequence(ints).generate_state(2)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


class CountedStream:
    """A named random stream whose ``i``-th draw is a pure function of ``(seed, name, rank, i)``.

    ``generator()`` returns a fresh CPU generator for the next draw and advances the count. The state
    to checkpoint is ``{"seed", "draws"}``: the draw count is the same on every rank of a data-parallel
    run, so rank 0's checkpoint restores every rank's stream (a saved generator state would be rank 0's
    only).

    Args:
        name: Which use of randomness (part of the seed derivation).
        seed: The run seed (``None``: ``torch.initial_seed()`` when first used, i.e. the seed that
            ``seed_everything`` set).
        rank: This process's global rank.
    """

    def __init__(self, name: str, seed: int | None = None, rank: int = 0) -> None:
        self.name, self.seed, self.rank, self.draws = name, seed, rank, 0

    def generator(self) -> torch.Generator:
        """The generator of the next draw (a new one each call)."""
        if self.seed is None:
            self.seed = torch.initial_seed()
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.name, self.rank, self.draws))
        self.draws += 1
        return gen

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "draws"}``: where the stream stands."""
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the stream where ``state`` left it (the checkpoint's seed wins)."""
        self.seed, self.draws = state["seed"], int(state["draws"])


class SeededShuffle(RandomSampler):
    """A shuffle whose order in epoch ``e`` is ``randperm(n)`` from a generator seeded by ``(seed, e)``.

    Lightning calls ``set_epoch`` before each epoch (as for a ``DistributedSampler``). A subclass of
    ``RandomSampler``, so Lightning treats it as shuffled (and, in a data-parallel run, replaces it by a
    shuffled ``DistributedSampler``). ``start_at(epoch, index)`` makes the next pass over ``epoch``
    begin at ``index`` (a resumed epoch skips what was already read, without loading it).

    Args:
        data_source: The dataset (only its length is used).
        seed: The order's seed.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0
        self._start: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass."""
        self.epoch = int(epoch)

    def start_at(self, epoch: int, index: int) -> None:
        """The next pass, if it is over ``epoch``, starts at position ``index`` of its order."""
        self._start = (int(epoch), int(index))

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch`` in order."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "data order", epoch))
        return torch.randperm(len(self.data_source), generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is chosen when the first index is asked for, after set_epoch.
        start, self._start = self._start, None
        begin = start[1] if start is not None and start[0] == self.epoch else 0
        yield from self.order(self.epoch)[begin:]

    def __len__(self) -> int:
        return len(self.data_source)


class ResumableLoader(DataLoader):
    """A shuffled training ``DataLoader`` that a checkpoint resumes mid-epoch (``SeededShuffle`` order).

    ``state_dict()`` is ``{"seed", "epoch", "batches"}``: the order's seed, the epoch of the pass under
    way and the batches it has handed out. Lightning keeps it in the checkpoint (the fit loop's
    ``combined_loader`` entry) and calls ``load_state_dict`` before the first batch after a resume; the
    next pass then starts where the saved one stopped (the next epoch's start if it had finished). Count
    batches here, not in the sampler: worker processes read the sampler ahead of training.

    Args:
        dataset: The training set.
        seed: The order's seed.
        sampler: Another sampler (Lightning passes a ``DistributedSampler`` here when it re-creates the
            loader for several processes; that one's order depends on its seed and epoch only, and the
            skip then reads and drops the batches already seen).
        **kwargs: ``DataLoader`` arguments (``batch_size``, ``num_workers``, ``drop_last``...).
    """

    def __init__(self, dataset: Dataset, seed: int, sampler: Sampler | None = None, **kwargs: Any) -> None:
        kwargs.pop("shuffle", None)  # the sampler decides the order
        own = SeededShuffle(dataset, seed) if sampler is None else sampler
        super().__init__(dataset, sampler=own, **kwargs)
        self.seed = int(seed)
        self._epoch, self._batches, self._skip = 0, 0, 0

    def __iter__(self) -> Iterator[Any]:
        # Called when a pass starts: after Lightning's set_epoch, or after load_state_dict on a resume.
        skip, self._skip = self._skip, 0
        self._epoch, self._batches = int(getattr(self.sampler, "epoch", 0)), skip
        own = isinstance(self.sampler, SeededShuffle)
        if skip and own:
            self.sampler.start_at(self._epoch, skip * int(self.batch_size or 1))  # before workers read it
        return self._pass(super().__iter__(), 0 if own else skip)

    def _pass(self, batches: Iterator[Any], drop: int) -> Iterator[Any]:
        for _ in range(drop):  # another sampler: read and drop what the saved pass already used
            next(batches, None)
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the order stands: ``{"seed", "epoch", "batches"}``."""
        return {"seed": self.seed, "epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next pass continues the saved one (or starts the next epoch if it had finished)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.seed = int(state["seed"])
        if isinstance(self.sampler, SeededShuffle):
            self.sampler.seed = self.seed
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._skip = batches
