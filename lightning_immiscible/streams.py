"""Named noise streams: every noise the library draws is a pure function of the run seed and its position.

Each use of noise has its own stream, so two uses never draw the same numbers:

- `Stream.POOL`: a coupling group's shared pool, words `(group, draw)` (identical on every rank of
  the group, different for other groups and draws);
- `Stream.KNN`: `knn` candidates, words `(rank, draw)` (per rank, whatever the scope);
- `Stream.WORKER`: a DataLoader worker's batch, words `(rank, epoch, batch index)`;
- `Stream.FALLBACK`: the callback re-coupling a worker batch it cannot attribute, words `(rank, draw)`;
- `Stream.SEMIDISCRETE`: fitting a dataset-level map, words `(0, rank, step)` (noise), `(1, rank, step)`
  (labels) and `(2, 0, batch)` (the fixed convergence sample);
- `Stream.DATASET`: the training noise of the dataset-level coupling, words `(rank, epoch, batch index)`.

A stream's generator is seeded from NumPy's `SeedSequence([seed, stream, *words])` (63 bits), so
no global random state is read or advanced.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor


class Stream(IntEnum):
    """The noise streams (their values are part of the seed derivation: never renumber them)."""

    POOL = 0
    KNN = 1
    WORKER = 2
    FALLBACK = 3
    SEMIDISCRETE = 4
    DATASET = 5


def stream_seed(seed: int, stream: Stream, *words: int) -> int:
    """The 63-bit generator seed of `stream` at position `words` for run seed `seed`."""
    state = np.random.SeedSequence([int(seed), int(stream), *map(int, words)]).generate_state(2)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def draw_noise(
    shape: Sequence[int], seed: int, stream: Stream, *words: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal float32 noise of `shape` from `stream` at position `words`.

    Args:
        shape: The noise's shape, e.g. `(B, *dims)` or `(B, k, *dims)`.
        seed: The run seed (equal on every rank).
        stream: Which use of noise this is.
        *words: The position within the stream (see the module docs).
        device: Where to draw.

    Returns:
        `shape` float32 noise on `device`.
    """
    gen = torch.Generator(device=device).manual_seed(stream_seed(seed, stream, *words))
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def draw_pool(
    shape: Sequence[int], seed: int, group_index: int, draw_index: int, device: torch.device | str = "cpu"
) -> Tensor:
    """A coupling group's pool: `Stream.POOL` at `(group_index, draw_index)`, `shape = (B, *dims)`."""
    return draw_noise(shape, seed, Stream.POOL, group_index, draw_index, device=device)
