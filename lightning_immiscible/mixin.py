"""`ImmiscibleMixin`: the LightningModule side of the coupling, and the object it receives.

Mix it into a `LightningModule` and replace `torch.randn_like(x0)` with `self.noise_like(x0)`.
The hand-off is explicit: for each training batch,
[ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] calls
[immiscible_data][lightning_immiscible.mixin.ImmiscibleMixin.immiscible_data] once, couples the
noise and puts a [CoupledBatch][lightning_immiscible.mixin.CoupledBatch] into the module's
[HandOff][lightning_immiscible.mixin.HandOff] ([hand_off][lightning_immiscible.mixin.hand_off]); the
training step reads it through `noise_like` (and `coupled_data`); the callback releases it when the
batch ends or fails, and warns when the module never took the coupled noise. Without the callback
(or in validation and sampling) `noise_like` is plain `torch.randn_like`. Nothing here rewrites a
method the user wrote, and the only names the mixin adds to the module are the ones users call.

The noise is paired with what `immiscible_data(batch)` returns, so any transform of the data the
noise is added to (scaling to [-1, 1], an encoder) belongs in an `immiscible_data` override;
`noise_like` raises when it gets a tensor of the same shape with other values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor
from typing_extensions import override

from lightning_immiscible.batches import find_data_tensor, same_batch
from lightning_immiscible.coupling import CouplingResult
from lightning_immiscible.workers import WorkerCoupling


@dataclass(frozen=True)
class CoupledBatch:
    """What the callback prepared for one training batch: the data, its coupled noise, the record.

    Made by [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling] in
    `on_train_batch_start`, held by the module for that batch only
    ([ImmiscibleMixin.coupled_batch][lightning_immiscible.mixin.ImmiscibleMixin.coupled_batch]).

    Attributes:
        batch: The batch as `training_step` receives it (a worker-coupled batch already unwrapped).
        x0: `(B, *dims)`, what `immiscible_data(batch)` returned: the tensor the noise is paired with.
        result: The coupling's [CouplingResult][lightning_immiscible.coupling.CouplingResult]
            (`result.method == "worker"` when a DataLoader worker coupled the batch).
        draw: The callback's counter of coupled micro-batches for this batch (the noise stream's
            position).
    """

    batch: Any
    x0: Tensor
    result: CouplingResult
    draw: int

    @property
    def noise(self) -> Tensor:
        """`(B, *dims)` the coupled noise: `noise[i]` is paired with `x0[i]`."""
        return self.result.noise


class Notices(WarningCache):
    """Lightning's `WarningCache`, keyed by a short name: each notice is given once (per fit)."""

    def warn_once(self, key: str, message: str) -> None:
        """Warns `message` on rank zero unless the notice `key` was given already."""
        if key not in self:
            self.add(key)
            rank_zero_warn(message)

    def info_once(self, key: str, message: str) -> None:
        """Logs `message` (info) on rank zero unless the notice `key` was given already."""
        if key not in self:
            self.add(key)
            self.info(message)


@dataclass
class HandOff:
    """What the callback and the module share for the current training batch.

    Attributes:
        coupled: The batch's [CoupledBatch][lightning_immiscible.mixin.CoupledBatch], `None`
            outside a coupled training batch.
        worker: The noise a DataLoader worker coupled with the current batch, if it did.
        taken: Whether `noise_like` handed out the coupled noise of `coupled`.
        notices: The warnings given once per fit (the callback starts a new set each fit).
    """

    coupled: CoupledBatch | None = None
    worker: WorkerCoupling | None = None
    taken: bool = False
    notices: Notices = field(default_factory=Notices)

    def give(self, coupled: CoupledBatch) -> None:
        """Hands `coupled` to the module for this batch."""
        self.coupled, self.taken = coupled, False

    def release(self) -> None:
        """Drops the current batch's hand-off, so nothing leaks into a later batch or validation."""
        self.coupled, self.worker, self.taken = None, None, False


def hand_off(module: object) -> HandOff:
    """The [HandOff][lightning_immiscible.mixin.HandOff] of a module that mixes in `ImmiscibleMixin`.

    Raises:
        TypeError: If the module does not mix it in, with the fix.
    """
    if not isinstance(module, ImmiscibleMixin):
        raise TypeError(
            f"ImmiscibleCoupling needs a LightningModule that mixes in ImmiscibleMixin "
            f"(class {type(module).__name__}(ImmiscibleMixin, L.LightningModule)) and calls "
            "self.noise_like(x0) instead of torch.randn_like(x0) in training_step."
        )
    found = module.__dict__.get(_HAND_OFF)
    if found is None:
        found = module.__dict__[_HAND_OFF] = HandOff()  # not through nn.Module.__setattr__
    return found


_HAND_OFF = "_immiscible_hand_off"


class ImmiscibleMixin:
    """Adds `noise_like`, `immiscible_data` and the coupled-batch hand-off to a `LightningModule`.

    Put it before `LightningModule` in the bases. In `training_step`, get `x0` and draw the noise
    with `noise_like(x0)` instead of `torch.randn_like(x0)`; use that one noise for both the noised
    input and the target. With an expensive `immiscible_data` override (an encoder), read `x0` with
    `coupled_data(batch)`: it returns the callback's `x0` for this batch, so the override runs once.

    The mixin overrides one Lightning hook, `on_after_batch_transfer`, to unwrap batches coupled in
    DataLoader workers ([CouplingCollate][lightning_immiscible.workers.CouplingCollate]); if you
    override that hook too, return `super().on_after_batch_transfer(batch, dataloader_idx)` from it.

    Examples:
        ```python
        import lightning as L
        import torch
        import torch.nn.functional as F
        from lightning_immiscible import ImmiscibleCoupling, ImmiscibleMixin

        class FlowMatching(ImmiscibleMixin, L.LightningModule):
            def __init__(self, net: torch.nn.Module):
                super().__init__()
                self.net = net  # net(x_t, t) -> velocity, x_t of x0's shape, t of shape (B,)

            def training_step(self, batch, batch_idx):
                x0 = self.coupled_data(batch)  # = immiscible_data(batch), computed once
                noise = self.noise_like(x0)    # coupled when ImmiscibleCoupling is active
                t = torch.rand(x0.shape[0], device=x0.device)
                tb = t.view(-1, *[1] * (x0.ndim - 1))  # (B, 1, ..., 1)
                x_t = (1 - tb) * x0 + tb * noise
                return F.mse_loss(self.net(x_t, t), noise - x0)

        trainer = L.Trainer(callbacks=[ImmiscibleCoupling(method="lsa")])
        ```
    """

    def immiscible_data(self, batch: Any) -> Tensor:
        """Returns the data tensor `x0` (`(B, *dims)`, floating point) the noise is paired with.

        The override point: override it when the noise is added to something else than the batch's
        first floating tensor, e.g. latents (`return self.vae.encode(batch["image"])`) or a dict
        entry. The callback calls it once per training batch; read its result in `training_step`
        with [coupled_data][lightning_immiscible.mixin.ImmiscibleMixin.coupled_data].

        Args:
            batch: The batch as `training_step` receives it.

        Returns:
            `(B, *dims)` floating-point data; by default
            [find_data_tensor(batch)][lightning_immiscible.batches.find_data_tensor].
        """
        return find_data_tensor(batch)

    def immiscible_condition(self, batch: Any) -> Tensor | None:
        """Returns the batch's condition: `(B,)` integer labels, a `(B, E)` float embedding, or `None`.

        Override it in a conditional model. Labels (`return batch["label"]`): the callback couples
        the noise within each label, so that the noise each class trains on stays Gaussian (see
        [conditional][lightning_immiscible.conditional]), and logs `immiscible/prior_skew`. An
        embedding (a text encoder's output, standardised attributes): the callback minimises the
        data-noise cost plus a weighted condition cost (see
        [embedding][lightning_immiscible.embedding]) and logs `immiscible/condition_leak`. The
        callback calls it once per training batch, next to `immiscible_data`.

        Args:
            batch: The batch as `training_step` receives it.

        Returns:
            `(B,)` labels >= 0 of an integer dtype, or `(B, E)` finite floats (`(B, 1)` for one
            scalar condition), aligned with `immiscible_data(batch)`; or `None`.
        """
        return None

    def coupled_data(self, batch: Any) -> Tensor:
        """`x0` for `batch`: the callback's for the batch it coupled, else `immiscible_data(batch)`.

        Args:
            batch: The batch `training_step` received.

        Returns:
            `(B, *dims)`: `coupled_batch.x0` when the callback coupled this batch (the same tensor
            object, so an expensive `immiscible_data` ran only once), otherwise a fresh
            `immiscible_data(batch)` (no callback, validation, another batch).
        """
        coupled = hand_off(self).coupled
        if coupled is not None and self._in_training() and same_batch(coupled.batch, batch):
            return coupled.x0
        return self.immiscible_data(batch)

    def noise_like(self, x0: Tensor) -> Tensor:
        """Drop-in for `torch.randn_like(x0)`: the coupled noise for this training batch.

        Args:
            x0: `(B, *dims)`, the tensor from `coupled_data(batch)` (or `immiscible_data(batch)`).

        Returns:
            `(B, *dims)` noise on `x0`'s device and dtype: the coupled noise when the callback
            prepared it for this batch and its shape matches `x0`; otherwise (no callback,
            validation, sampling, another shape) fresh `torch.randn_like(x0)`. Coupled noise is
            handed out for one batch only, never carried over to a later one.

        Raises:
            ValueError: If `x0` has the coupled tensor's shape but other values (e.g.
                `x0 = batch[0] * 2 - 1` in `training_step`): the noise was paired with the tensor
                `immiscible_data(batch)` returned, not with this one. Move the transform into an
                `immiscible_data` override and read `x0` with `coupled_data(batch)`.
        """
        hand = hand_off(self)
        coupled = hand.coupled
        if coupled is None or not self._in_training():
            return torch.randn_like(x0)
        if coupled.noise.shape != x0.shape:
            rank_zero_warn(
                f"noise_like(x0) got shape {tuple(x0.shape)} but the coupled noise of this batch has "
                f"shape {tuple(coupled.noise.shape)}; returning uncoupled torch.randn_like(x0). Pass the "
                "tensor returned by coupled_data(batch).",
            )
            return torch.randn_like(x0)
        if x0 is not coupled.x0:
            _check_same_values(x0, coupled.x0)
            self._warn_recomputed(hand.notices)
        hand.taken = True
        return coupled.noise.to(device=x0.device, dtype=x0.dtype)

    @property
    def coupled_batch(self) -> CoupledBatch | None:
        """The [CoupledBatch][lightning_immiscible.mixin.CoupledBatch] of the current training batch.

        Set by the callback in `on_train_batch_start`, `None` outside a coupled training batch.
        """
        return hand_off(self).coupled

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Unwraps a [CouplingCollate][lightning_immiscible.workers.CouplingCollate] batch.

        The hooks and `training_step` then see the inner batch; the worker's noise is kept in the
        module's [HandOff][lightning_immiscible.mixin.HandOff] for the callback. Other batches pass
        through. Call `super()` if you override this hook.
        """
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        worker = hand_off(self).worker = WorkerCoupling.from_batch(batch)
        return batch if worker is None else worker.batch

    def _in_training(self) -> bool:
        return bool(getattr(self, "training", True))

    def _warn_recomputed(self, notices: Notices) -> None:
        """Hints once when `training_step` recomputed an overridden `immiscible_data`."""
        if type(self).immiscible_data is not ImmiscibleMixin.immiscible_data:
            notices.warn_once(
                "recomputed",
                "noise_like(x0) got a tensor other than the x0 the callback coupled for this batch: "
                f"{type(self).__name__}.immiscible_data ran again in training_step. The coupled noise "
                "is returned, but read x0 with `x0 = self.coupled_data(batch)` so an expensive "
                "immiscible_data runs once per batch and the noise is paired with that very x0.",
            )


def _check_same_values(x0: Tensor, coupled: Tensor) -> None:
    """Raises when `x0` is not the coupled tensor's values (one comparison, only for another object)."""
    ref = coupled.detach()
    tol = 1e-5 if x0.dtype == ref.dtype else 1e-2  # a cast to a lower precision keeps the values close
    if not torch.allclose(x0.detach().to(device=ref.device, dtype=ref.dtype), ref, rtol=tol, atol=tol):
        raise ValueError(
            "noise_like(x0) got a tensor of the coupled batch's shape but with other values than the x0 "
            "the callback paired the noise with (what immiscible_data(batch) returned): e.g. "
            "`x0 = batch[0] * 2 - 1` in training_step. The coupled noise would be paired with the wrong "
            "data. Do the transform in an immiscible_data override (`def immiscible_data(self, batch): "
            "return batch[0] * 2 - 1`) and read x0 with `x0 = self.coupled_data(batch)`."
        )
