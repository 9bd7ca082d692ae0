"""Flow matching on images (rectified flow / minibatch-OT flow matching) as a LightningModule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from example_projects.common.ema import EMA
from example_projects.common.resumable import CountedStream
from example_projects.common.training import check_prediction, check_sample_shape, eval_mode, warmup_optimizer
from example_projects.flow_matching.objective import TimeSampling, flow_matching_loss, sample_time
from example_projects.flow_matching.samplers import SAMPLERS, SamplerName, integrate
from lightning_immiscible import ImmiscibleMixin

#: Where checkpoints keep the training-time stream's state.
TIMES_KEY = "flow_matching_times"


class FlowMatching(ImmiscibleMixin, L.LightningModule):
    """Flow matching with a linear interpolant, sampled with Euler or Heun.

    ``x_t = (1 - t) x0 + t noise`` and the network regresses the velocity ``noise - x0`` (see
    [objective][example_projects.flow_matching.objective]). The one line that makes it coupled:
    ``noise = self.noise_like(x0)`` instead of ``torch.randn_like(x0)``; with ``ImmiscibleCoupling``
    (``method="lsa"``, ``metric="sqeuclidean"``) this is minibatch-OT flow matching (Tong et al.
    2024), with ``metric="l2"`` Immiscible Diffusion's assignment, with ``method="none"`` plain
    (independent) flow matching.

    Args:
        net: The velocity network, called as ``net(x_t, time_scale * t)`` on ``(B, C, H, W)``
            inputs and ``(B,)`` times; injected from the config (``class_path`` + ``init_args``).
        in_channels: Image channels (must match the data and the network).
        image_size: Image height = width.
        time_sampling: ``uniform`` or ``logit_normal`` training times.
        logit_loc: Mean of the logit-normal's normal.
        logit_scale: Its standard deviation.
        time_scale: Times are multiplied by this before they reach the network (1000 suits the
            sinusoidal embedding of the shared UNet, which was made for integer timesteps).
        sampler: Default sampler of ``sample`` (``euler`` or ``heun``): the grids use it.
        lr: Adam learning rate.
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights used for sampling and FID.
        ema_warmup: Ramp the EMA decay up over the first updates (off for the published setting).

    Training times come from a stream of the module's own (``times``: batch ``i`` of rank ``r`` draws
    from a generator seeded from ``(run seed, r, i)``, the run seed being ``torch.initial_seed()``,
    which ``seed_everything`` sets), never from the global random state; checkpoints keep its seed and
    count (``on_save_checkpoint``). So a resumed run draws the times an uninterrupted one draws, and an
    evaluation (which advances the global state) does not change them.
    """

    def __init__(
        self,
        net: nn.Module,
        in_channels: int = 1,
        image_size: int = 32,
        time_sampling: TimeSampling = "uniform",
        logit_loc: float = 0.0,
        logit_scale: float = 1.0,
        time_scale: float = 1000.0,
        sampler: SamplerName = "euler",
        lr: float = 2e-4,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.ema = EMA(self.net, ema_decay, ema_warmup)
        self.sampler: str = sampler
        self.times = CountedStream("flow matching training times")

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def velocity(self, net: nn.Module) -> Any:
        """``net`` as a velocity field ``v(x_t, t)`` with ``t`` in ``[0, 1]``."""
        scale = self.hparams.time_scale
        # A wrong output shape fails here instead of being broadcast against the target.
        return lambda x, t: check_prediction(net(x, t * scale), x)

    def loss(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Flow-matching loss for ``(B, C, H, W)`` data, its paired noise and ``(B,)`` times."""
        return flow_matching_loss(self.velocity(self.net), x0, noise, t)

    def sample_times(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n,)`` training times drawn per ``time_sampling``."""
        hp = self.hparams
        return sample_time(
            n,
            hp.time_sampling,
            loc=hp.logit_loc,
            scale=hp.logit_scale,
            generator=generator,
            device=self.device,
        )

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.times.rank = self.global_rank  # before a checkpoint's state is loaded (Lightning's order)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TIMES_KEY] = self.times.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if TIMES_KEY in checkpoint:
            self.times.load_state_dict(checkpoint[TIMES_KEY])
        elif self._trainer is not None and self._trainer.state.fn == "fit":
            rank_zero_warn(
                "FlowMatching: the checkpoint holds no training-time stream (written by an older version); "
                "the resumed run draws its training times from a new one, not the interrupted run's."
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.coupled_data(batch)  # immiscible_data(batch), computed once per batch
        check_sample_shape(x0, self.sample_shape())
        noise = self.noise_like(x0)  # coupled noise when ImmiscibleCoupling is active
        loss = self.loss(x0, noise, self.sample_times(x0.shape[0], self.times.generator()))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0 = self.immiscible_data(batch)
        g = torch.Generator().manual_seed(batch_idx)  # the same noise and t every evaluation
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = sample_time(x0.shape[0], "uniform", generator=g, device=x0.device)
        loss = flow_matching_loss(self.velocity(self.ema.model), x0, noise, t)
        self.log("val/loss", loss, sync_dist=True)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step, after it: with gradient accumulation too (never per micro-batch).
        self.ema.update(self.net)

    @contextlib.contextmanager
    def using_sampler(self, sampler: SamplerName) -> Iterator[None]:
        """Within the block, ``sample`` defaults to ``sampler`` (how the FID callback picks one)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        previous, self.sampler = self.sampler, sampler
        try:
            yield
        finally:
            self.sampler = previous

    @torch.no_grad()
    def sample(
        self, noise: Tensor, steps: int = 8, sampler: SamplerName | None = None, use_ema: bool = True
    ) -> Tensor:
        """Samples in ``[-1, 1]`` from ``(B, C, H, W)`` noise with ``steps`` Euler or Heun steps.

        Deterministic: draw ``noise`` from a seeded generator for reproducible samples. Heun
        costs two network evaluations per step.
        """
        with eval_mode(self.ema.model if use_ema else self.net) as net:
            x = integrate(self.velocity(net), noise, steps, sampler or self.sampler)  # type: ignore[arg-type]
        return x.clamp(-1, 1)

    @override
    def configure_optimizers(self) -> Any:
        return warmup_optimizer(self.net.parameters(), self.hparams.lr, self.hparams.warmup_steps)
