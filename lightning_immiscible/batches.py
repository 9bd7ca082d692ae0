"""Finding the data tensor in a batch, and telling whether two batches hold the same tensors.

Pure torch (no Lightning): the DataLoader-worker coupling and the LightningModule mixin find `x0`
the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_immiscible.coupling import CouplingInputError

DATA_KEYS: tuple[str, ...] = ("x0", "image", "images", "pixel_values", "latents", "input", "inputs", "x")
"""Dict keys searched first (in this order) for the data tensor, by
[find_data_tensor][lightning_immiscible.batches.find_data_tensor]."""


def find_data_tensor(batch: Any) -> Tensor:
    """Finds the data tensor `x0` in a batch.

    A tensor is returned as is; in a dict the first of `DATA_KEYS` that holds a floating
    tensor wins, else the first floating tensor value; in a tuple/list the first floating tensor.

    Args:
        batch: A tensor, a (possibly nested) tuple/list/dict of tensors and other objects.

    Returns:
        The `(B, *dims)` floating-point data tensor (the batch's own object, not a copy).

    Raises:
        CouplingInputError: If the batch holds no floating-point tensor.
    """
    found = _search(batch)
    if found is None:
        raise CouplingInputError(
            f"Found no floating-point tensor in the batch (type {type(batch).__name__}). Override "
            "`immiscible_data(self, batch)` in your LightningModule to return the data tensor x0 "
            "(shape (B, ...)) that the noise is added to.",
            "no_tensor",
        )
    return found


def _search(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch if batch.is_floating_point() else None
    if isinstance(batch, Mapping):
        for key in DATA_KEYS:
            if key in batch and isinstance(batch[key], Tensor) and batch[key].is_floating_point():
                return batch[key]
        return next((t for t in map(_search, batch.values()) if t is not None), None)
    if _is_sequence(batch):
        return next((t for t in map(_search, batch) if t is not None), None)
    return None


def _is_sequence(batch: Any) -> bool:
    return isinstance(batch, Sequence) and not isinstance(batch, str | bytes)


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif _is_sequence(batch):
        for value in batch:
            yield from _tensors(value)


def same_batch(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are the same batch: the same object, or containers of the same tensors.

    Lightning may hand `training_step` a rebuilt container of the very tensors the hooks saw (under
    DDP on GPUs, the wrapper's input handling rebuilds tuples and dicts); tensor identity survives
    that, so the tensors are compared by identity, in order. A converted batch (e.g. by a
    `"16-true"` precision plugin) holds new tensors and is a different batch.

    Args:
        a: A batch.
        b: Another batch.

    Returns:
        `True` for the same object or equally long sequences of identical tensors (at least one).
    """
    if a is b:
        return True
    ta, tb = list(_tensors(a)), list(_tensors(b))
    return bool(ta) and len(ta) == len(tb) and all(x is y for x, y in zip(ta, tb, strict=True))
