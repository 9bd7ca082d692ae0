"""``ImmiscibleMixin``: the LightningModule side of the coupling.

Mix it into a ``LightningModule`` and replace ``torch.randn_like(x0)`` with ``self.noise_like(x0)``.
The :class:`~lightning_immiscible.callback.ImmiscibleCoupling` callback prepares the coupled noise
for each training batch; without it (or in validation / sampling) ``noise_like`` is plain
``torch.randn_like``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_immiscible.coupling import CouplingInputError
from lightning_immiscible.workers import INDEX_KEY, NOISE_KEY, STATS_KEY, split_coupled_batch

#: Dict keys searched first (in this order) by the default :meth:`ImmiscibleMixin.immiscible_data`.
DATA_KEYS: tuple[str, ...] = ("x0", "image", "images", "pixel_values", "latents", "input", "inputs", "x")


def find_data_tensor(batch: Any) -> Tensor:
    """Finds the data tensor ``x0`` in a batch.

    A tensor is returned as is; in a dict the first of :data:`DATA_KEYS` that holds a floating
    tensor wins, else the first floating tensor value; in a tuple/list the first floating tensor.

    Args:
        batch: A tensor, a (possibly nested) tuple/list/dict of tensors and other objects.

    Returns:
        The ``(B, *dims)`` floating-point data tensor.

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
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        return next((t for t in map(_search, batch) if t is not None), None)
    return None


def _cache_per_batch(fn: Callable[[Any, Any], Tensor]) -> Callable[[Any, Any], Tensor]:
    """Caches ``immiscible_data(batch)`` for the batch the callback prepared (by identity).

    So an expensive override (e.g. a VAE encoder) runs once per training batch, although both the
    callback and ``training_step`` call it.
    """

    @functools.wraps(fn)
    def wrapper(self: Any, batch: Any) -> Tensor:
        cached = self.__dict__.get("_immiscible_data_cache")
        if cached is not None and cached[0] is batch:
            return cached[1]
        return fn(self, batch)

    wrapper._immiscible_cached = True  # type: ignore[attr-defined]
    return wrapper


def _unwrap_worker_batches(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` receives the inner batch of a ``CouplingCollate`` batch, unwrapped."""

    @functools.wraps(fn)
    def wrapper(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, self._immiscible_unwrap(batch), *args, **kwargs)

    wrapper._immiscible_unwraps = True  # type: ignore[attr-defined]
    return wrapper


class ImmiscibleMixin:
    """Adds ``noise_like`` and ``immiscible_data`` to a ``LightningModule``.

    Example::

        class Diffusion(ImmiscibleMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                x0 = self.immiscible_data(batch)
                noise = self.noise_like(x0)        # coupled when ImmiscibleCoupling is active
                t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
                x_t = a[t] * x0 + s[t] * noise
                return F.mse_loss(self.model(x_t, t), noise)

        trainer = L.Trainer(callbacks=[ImmiscibleCoupling(method="lsa")])
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("immiscible_data")
        if own is not None and not getattr(own, "_immiscible_cached", False):
            cls.immiscible_data = _cache_per_batch(own)  # type: ignore[method-assign]
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_immiscible_unwraps", False):
            cls.training_step = _unwrap_worker_batches(step)  # type: ignore[attr-defined]

    def immiscible_data(self, batch: Any) -> Tensor:
        """Returns the data tensor ``x0`` (``(B, *dims)``, floating point) the noise is paired with.

        Override it when the noise is added to something else than the batch's first floating
        tensor, e.g. latents (``return self.vae.encode(batch["image"])``) or a dict entry. An
        override is called once per training batch: the callback's result is reused when
        ``training_step`` calls it with the same batch.
        """
        return find_data_tensor(batch)

    def _immiscible_unwrap(self, batch: Any) -> Any:
        """Unwraps a :class:`~lightning_immiscible.workers.CouplingCollate` batch (else returns it).

        The callback calls it first (and keeps the worker-coupled noise); ``training_step`` is
        wrapped to call it too, so it receives the same inner batch object the callback saw.
        """
        if not (isinstance(batch, Mapping) and NOISE_KEY in batch):
            return batch
        cached = self.__dict__.get("_immiscible_unwrapped")
        if cached is not None and cached[0] is batch:
            return cached[1]
        inner, _ = split_coupled_batch(batch)
        self.__dict__["_immiscible_unwrapped"] = (batch, inner)
        self.__dict__["_immiscible_worker"] = (batch[NOISE_KEY], batch[STATS_KEY], batch[INDEX_KEY])
        return inner

    def noise_like(self, x0: Tensor) -> Tensor:
        """Drop-in for ``torch.randn_like(x0)``: the coupled noise for this training batch.

        Args:
            x0: ``(B, *dims)``, the tensor returned by :meth:`immiscible_data` for this batch.

        Returns:
            ``(B, *dims)`` noise on ``x0``'s device and dtype. The coupled noise when the callback
            prepared it for this batch and its shape matches ``x0``; otherwise (no callback,
            validation, sampling, another shape) fresh ``torch.randn_like(x0)``. Coupled noise is
            handed out for one batch only, never carried over to a later one.

        """
        prepared: Tensor | None = self.__dict__.get("_immiscible_noise")
        if prepared is None or not getattr(self, "training", True):
            return torch.randn_like(x0)
        if prepared.shape != x0.shape:
            rank_zero_warn(
                f"noise_like(x0) got shape {tuple(x0.shape)} but the coupled noise of this batch has "
                f"shape {tuple(prepared.shape)}; returning uncoupled torch.randn_like(x0). Pass the "
                "tensor returned by immiscible_data(batch).",
            )
            return torch.randn_like(x0)
        return prepared.to(device=x0.device, dtype=x0.dtype)

    @property
    def immiscible_noise_ready(self) -> bool:
        """Whether coupled noise is prepared for the current training batch."""
        return self.__dict__.get("_immiscible_noise") is not None

    def _immiscible_set(self, batch: Any, x0: Tensor, noise: Tensor) -> None:
        """Called by the callback: stores ``x0`` (per batch) and its coupled ``noise``."""
        self.__dict__["_immiscible_data_cache"] = (batch, x0)
        self.__dict__["_immiscible_noise"] = noise

    def _immiscible_clear(self) -> None:
        """Called by the callback at batch end: nothing prepared leaks into a later batch."""
        for key in (
            "_immiscible_data_cache",
            "_immiscible_noise",
            "_immiscible_worker",
            "_immiscible_unwrapped",
        ):
            self.__dict__.pop(key, None)
