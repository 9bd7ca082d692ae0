"""Training pieces shared by the example LightningModules: optimizer with warm-up, eval mode, shape checks.

Each example's module calls these instead of keeping its own copy, so a fix here reaches all of them
(the DDIM, consistency and latent-diffusion examples, and any project started from one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

#: The optimizers the examples' configs can name (``model.optimizer`` where a module exposes it).
OptimizerName = Literal["adam", "radam"]


def warmup_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    warmup_steps: int = 0,
    optimizer: OptimizerName = "adam",
    betas: Sequence[float] = (0.9, 0.999),
) -> dict[str, Any]:
    """Adam or RAdam with a linear learning-rate warm-up, in ``configure_optimizers``' format.

    The learning rate is ``lr * min(1, (k + 1) / warmup_steps)`` at optimizer step ``k`` (the
    scheduler steps once per optimizer step, so gradient accumulation does not stretch the warm-up).

    Args:
        params: The trained parameters (the network's, not a frozen codec's or the EMA copy's).
        lr: Peak learning rate.
        warmup_steps: Optimizer steps of the linear ramp (``0``: the full rate from the start).
        optimizer: ``adam`` (DDPM/DDIM) or ``radam`` (iCT).
        betas: The optimizer's ``(beta1, beta2)``.

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": LambdaLR, "interval": "step"}}``.

    Examples:
        ```python
        def configure_optimizers(self):
            return warmup_optimizer(self.net.parameters(), lr=2e-4, warmup_steps=5000)
        ```
    """
    if optimizer not in ("adam", "radam"):
        raise ValueError(f"Unknown optimizer {optimizer!r}; expected 'adam' or 'radam'.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    cls = torch.optim.RAdam if optimizer == "radam" else torch.optim.Adam
    opt = cls(params, lr=lr, betas=(float(betas[0]), float(betas[1])))
    warmup = max(1, warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Puts ``net`` in eval mode for the block (no dropout while sampling) and restores its mode after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def check_sample_shape(x0: Tensor, expected: Sequence[int]) -> None:
    """Raises a clear error when a batch's items are not of the module's ``(C, H, W)``.

    Args:
        x0: ``(B, *item)`` the batch the module is about to train on.
        expected: The module's ``sample_shape()``.

    Raises:
        ValueError: Names both shapes and the settings that decide them.
    """
    if tuple(x0.shape[1:]) != tuple(expected):
        raise ValueError(
            f"Data of shape {tuple(x0.shape[1:])} does not match the model's (C, H, W) {tuple(expected)}: "
            "set model.in_channels / model.image_size (and the network's own input size under "
            "model.net.init_args) to match the data (data.channels, data.image_size)."
        )


def check_prediction(prediction: Tensor, target: Tensor) -> Tensor:
    """Returns ``prediction`` after checking it has the target's shape (no silent broadcasting in the loss).

    A network whose output channels differ from its input's (e.g. 1 instead of 3) would otherwise be
    broadcast against the target by ``mse_loss`` with only a warning.

    Raises:
        ValueError: Names both shapes and the network setting to fix.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"The network returned shape {tuple(prediction.shape)} for an input of shape "
            f"{tuple(target.shape)}: it must return its input's shape (check the output channels "
            "under model.net.init_args)."
        )
    return prediction
