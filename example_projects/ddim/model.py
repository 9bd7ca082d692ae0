"""DDPM training (epsilon prediction) with DDIM sampling, as a LightningModule using ImmiscibleMixin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from example_projects.common.ema import EMA
from example_projects.common.unet import UNet
from example_projects.ddim.schedule import ddim_sample, eps_loss, make_betas
from lightning_immiscible import ImmiscibleMixin


class DDIMDiffusion(ImmiscibleMixin, L.LightningModule):
    """Unconditional DDPM trained with the simple epsilon loss, sampled with DDIM (eta = 0).

    The one line that makes it immiscible: ``noise = self.noise_like(x0)`` instead of
    ``torch.randn_like(x0)``. With ``ImmiscibleCoupling`` in the trainer's callbacks the noise is
    re-paired with the batch; without it (or with ``method="none"``) this is the plain DDPM.

    Args:
        in_channels: Image channels (must match the data).
        image_size: Image height = width.
        base_channels: UNet width (128 for the DDPM/DDIM CIFAR-10 network).
        channel_mult: UNet width multipliers per level ((1, 2, 2, 2) for CIFAR-10).
        num_res_blocks: Residual blocks per level (2 for CIFAR-10).
        attn_resolutions: Resolutions with self-attention ((16,) for CIFAR-10).
        dropout: Dropout (0.1 for CIFAR-10).
        num_timesteps: Diffusion steps T.
        schedule: ``linear`` (DDPM) or ``cosine`` (improved DDPM) betas.
        lr: Adam learning rate.
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights used for sampling and FID.
        ema_warmup: Ramp the EMA decay up over the first updates (off for the published setting).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        lr: float = 2e-4,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(
            in_channels,
            base_channels,
            tuple(channel_mult),
            num_res_blocks,
            tuple(attn_resolutions),
            dropout,
            image_size,
        )
        self.ema = EMA(self.net, ema_decay, ema_warmup)
        self.register_buffer(
            "alphas_cumprod", torch.cumprod(1 - make_betas(schedule, num_timesteps), 0).float()
        )

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def loss(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Epsilon loss for ``(B, C, H, W)`` data and its paired noise at ``(B,)`` timesteps."""
        return eps_loss(self.net, x0, noise, t, self.alphas_cumprod)

    def _check_batch(self, x0: Tensor) -> None:
        if tuple(x0.shape[1:]) != self.sample_shape():
            raise ValueError(
                f"Data of shape {tuple(x0.shape[1:])} does not match the model's (C, H, W) "
                f"{self.sample_shape()}: set model.in_channels / model.image_size to match data."
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.immiscible_data(batch)
        self._check_batch(x0)
        noise = self.noise_like(x0)  # coupled noise when ImmiscibleCoupling is active
        t = torch.randint(0, self.hparams.num_timesteps, (x0.shape[0],), device=x0.device)
        loss = self.loss(x0, noise, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0 = self.immiscible_data(batch)
        g = torch.Generator().manual_seed(batch_idx)  # the same noise and t every evaluation
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.randint(0, self.hparams.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        self.log("val/loss", eps_loss(self.ema.model, x0, noise, t, self.alphas_cumprod), sync_dist=True)

    @override
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step (after it), also with gradient accumulation.
        self.ema.update(self.net)

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 50, use_ema: bool = True) -> Tensor:
        """DDIM samples (eta = 0) from ``(B, C, H, W)`` starting noise, in ``[-1, 1]``.

        Deterministic: draw ``noise`` from a seeded generator for reproducible samples.
        """
        net = self.ema.model if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            return ddim_sample(net, noise, self.alphas_cumprod, steps)
        finally:
            net.train(was_training)

    @override
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
