"""Exponential moving average (EMA) of a network's weights, kept as a checkpointed submodule."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds a frozen copy of ``model`` whose weights track ``model`` with an EMA.

    Register it as an attribute of the ``LightningModule`` (``self.ema = EMA(self.net)``): it is
    then saved and restored with every checkpoint. Its parameters do not require gradients, so
    optimizers and DDP ignore them. Sampling and FID should use ``self.ema.model``.

    Call [update][example_projects.common.ema.EMA.update] once per optimizer step, after it: from
    the module's ``optimizer_step`` hook, which Lightning calls once per step also with
    ``accumulate_grad_batches > 1`` (``on_train_batch_end`` runs once per micro-batch).

    Examples:
        ```python
        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            self.ema.update(self.net)
        ```

    Args:
        model: The network to track (copied once; the copy is frozen and kept in eval mode).
        decay: The EMA decay (0.9999 in DDPM/DDIM for CIFAR-10).
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs get a
            useful average; set ``False`` for the published fixed decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        """The averaged copy stays in eval mode (no dropout when sampling)."""
        super().train(mode)
        self.model.eval()
        return self

    def current_decay(self) -> float:
        """The decay applied at the next update."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1
