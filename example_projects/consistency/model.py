"""Consistency training (iCT) as a LightningModule using ImmiscibleMixin."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, get_args

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from example_projects.common.ema import EMA
from example_projects.common.training import (
    OptimizerName,
    check_prediction,
    check_sample_shape,
    eval_mode,
    warmup_optimizer,
)
from example_projects.consistency.training import (
    consistency_loss,
    discretisation_steps,
    huber_c,
    karras_sigmas,
    multistep_sample,
    sample_pairs,
    sampling_sigmas,
)
from lightning_immiscible import ImmiscibleMixin


class ConsistencyFunction(nn.Module):
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` (CM App. C).

    ``c_skip = s_d^2 / ((sigma - eps)^2 + s_d^2)``, ``c_out = (sigma - eps) s_d / sqrt(sigma^2 + s_d^2)``,
    ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = 250 ln(sigma)``: ``f(x, eps) = x`` exactly.

    Args:
        net: ``F``: ``(B, C, H, W)``, ``(B,)`` -> ``(B, C, H, W)``.
        sigma_data: Data standard deviation ``s_d`` (0.5).
        sigma_min: The boundary level ``eps`` (0.002).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``(B, C, H, W)`` noisy input at ``(B,)`` levels -> ``(B, C, H, W)`` estimate of ``x0``."""
        sd, s = self.sigma_data, sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        c_skip = sd**2 / ((s - self.sigma_min) ** 2 + sd**2)
        c_out = (s - self.sigma_min) * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = 250.0 * sigma.to(x.dtype).clamp_min(1e-20).log()
        return c_skip * x + c_out * check_prediction(self.net(c_in * x, c_noise), x).to(x.dtype)


class ConsistencyTraining(ImmiscibleMixin, L.LightningModule):
    """Unconditional consistency training (iCT: no teacher), one- and multistep sampling.

    The one line that makes it immiscible: ``noise = self.noise_like(x0)`` instead of
    ``torch.randn_like(x0)``; that noise builds both the student input ``x0 + sigma_{i+1} noise``
    and the target input ``x0 + sigma_i noise``. With ``ImmiscibleCoupling`` (method ``lsa``) it is
    re-paired with the batch; with ``method="none"`` or no callback this is plain iCT.

    Args:
        net: The network ``F`` inside the consistency function: ``(B, C, H, W)`` and ``(B,)`` float
            noise embeddings ``250 ln sigma`` -> ``(B, C, H, W)``. In a config:
            ``model.net.class_path`` + ``init_args`` (the configs use the shared
            [UNet][example_projects.common.unet.UNet]; its dropout is iCT's 0.3 on CIFAR-10, and
            student and target share the masks).
        in_channels: Image channels (linked to ``data.channels`` by the CLI).
        image_size: Image height = width (linked to ``data.image_size`` by the CLI).
        sigma_min: Smallest noise level (0.002).
        sigma_max: Largest noise level (80).
        sigma_data: Data standard deviation (0.5).
        rho: Karras discretisation exponent (7).
        s0: Initial discretisation steps of the curriculum (10).
        s1: Final discretisation steps (1280).
        total_steps: ``K`` of the curriculum (``None``: the trainer's total training steps).
        p_mean: Lognormal schedule mean of ``ln sigma`` (-1.1).
        p_std: Lognormal schedule standard deviation (2.0).
        huber_c: Pseudo-Huber scale (``None``: ``0.00054 * sqrt(d)``).
        mid_sigma: Second level of two-step sampling (iCT: 0.821 on CIFAR-10).
        optimizer: ``radam`` (iCT) or ``adam``.
        lr: Learning rate (iCT: 1e-4).
        betas: Optimizer betas (iCT: 0.9, 0.999).
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights used for sampling and FID (iCT: 0.99993 on CIFAR-10).
        ema_warmup: Ramp the EMA decay up over the first updates (off for the published setting).

    Examples:
        ```python
        from example_projects.common.unet import UNet

        net = UNet(in_channels=1, image_size=16, base_channels=24, channel_mult=(1, 2))
        model = ConsistencyTraining(net)
        ```
    """

    def __init__(
        self,
        net: nn.Module,
        in_channels: int = 1,
        image_size: int = 32,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        s0: int = 10,
        s1: int = 1280,
        total_steps: int | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float | None = None,
        mid_sigma: float = 0.821,
        optimizer: OptimizerName = "radam",
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.99993,
        ema_warmup: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in get_args(OptimizerName):
            raise ValueError(f"Unknown optimizer {optimizer!r}; expected one of {get_args(OptimizerName)}.")
        if not 0 < sigma_min < mid_sigma < sigma_max:
            raise ValueError(
                f"Need 0 < sigma_min < mid_sigma < sigma_max, got {sigma_min}, {mid_sigma}, {sigma_max}."
            )
        # The network's own config lives in the CLI's saved config.yaml; load a checkpoint in
        # Python with `ConsistencyTraining.load_from_checkpoint(path, net=UNet(...))`.
        self.save_hyperparameters(ignore=["net"])
        self.denoiser = ConsistencyFunction(net, sigma_data, sigma_min)
        self.ema = EMA(self.denoiser, ema_decay, ema_warmup)

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def curriculum_total(self) -> int:
        """``K``: ``total_steps``, else the trainer's ``max_steps`` or estimated total steps."""
        if self.hparams.total_steps:
            return int(self.hparams.total_steps)
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else 1

    def num_levels(self, step: int | None = None) -> int:
        """``N(k)`` of the discretisation curriculum at ``step`` (default: the current global step)."""
        k = self.global_step if step is None else step
        return discretisation_steps(k, self.curriculum_total(), self.hparams.s0, self.hparams.s1)

    def sigmas(self, num: int) -> Tensor:
        """``(num,)`` float64 Karras levels, increasing."""
        h = self.hparams
        return karras_sigmas(num, h.sigma_min, h.sigma_max, h.rho)

    def loss(
        self, x0: Tensor, noise: Tensor, sigma: Tensor, sigma_next: Tensor, denoiser: nn.Module | None = None
    ) -> Tensor:
        """The iCT loss of ``(B, C, H, W)`` data, its paired noise and ``(B,)`` adjacent levels."""
        c = self.hparams.huber_c or huber_c(tuple(x0.shape[1:]))
        return consistency_loss(denoiser or self.denoiser, x0, noise, sigma, sigma_next, c)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.coupled_data(batch)  # immiscible_data(batch), computed once per batch
        check_sample_shape(x0, self.sample_shape())
        noise = self.noise_like(x0)  # coupled noise when ImmiscibleCoupling is active
        num = self.num_levels()
        sigma, sigma_next = sample_pairs(
            self.sigmas(num), x0.shape[0], self.hparams.p_mean, self.hparams.p_std
        )
        loss = self.loss(x0, noise, sigma, sigma_next)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/num_levels", float(num), prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0 = self.immiscible_data(batch)
        g = torch.Generator().manual_seed(batch_idx)  # the same noise and levels every evaluation
        noise = torch.randn(x0.shape, generator=g).to(x0)
        h = self.hparams
        sigma, sigma_next = sample_pairs(self.sigmas(self.num_levels()), x0.shape[0], h.p_mean, h.p_std, g)
        self.log("val/loss", self.loss(x0, noise, sigma, sigma_next, self.ema.model), sync_dist=True)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step, after it: with gradient accumulation too (never per micro-batch).
        self.ema.update(self.denoiser)

    @torch.no_grad()
    def sample(
        self, noise: Tensor, steps: int = 1, use_ema: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """One- or multistep consistency samples from ``(B, C, H, W)`` standard normal noise.

        Args:
            noise: ``(B, C, H, W)`` standard normal noise (scaled by ``sigma_max`` here).
            steps: Network evaluations (1: one-step; 2: via ``mid_sigma``).
            use_ema: Sample with the EMA weights.
            generator: CPU generator of the noise re-injected between steps (``None``: one seeded
                from the values of ``noise``, so equal inputs give equal samples).

        Returns:
            ``(B, C, H, W)`` samples in ``[-1, 1]``.
        """
        h = self.hparams
        if generator is None:
            generator = torch.Generator().manual_seed(
                zlib.crc32(noise.detach().float().cpu().numpy().tobytes())
            )
        sigmas = sampling_sigmas(steps, h.sigma_max, h.mid_sigma, h.rho)
        with eval_mode(self.ema.model if use_ema else self.denoiser) as denoiser:
            return multistep_sample(denoiser, noise, sigmas, h.sigma_min, generator)

    @override
    def configure_optimizers(self) -> Any:
        h = self.hparams
        return warmup_optimizer(self.denoiser.parameters(), h.lr, h.warmup_steps, h.optimizer, h.betas)
