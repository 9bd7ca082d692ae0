"""DDPM training (epsilon prediction) with DDIM sampling, as a LightningModule using ImmiscibleMixin."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from example_projects.common.ema import EMA
from example_projects.common.training import check_sample_shape, eval_mode, warmup_optimizer
from example_projects.ddim.schedule import ddim_sample, eps_loss, make_betas
from lightning_immiscible import ImmiscibleMixin


class DDIMDiffusion(ImmiscibleMixin, L.LightningModule):
    """Unconditional DDPM trained with the simple epsilon loss, sampled with DDIM (eta = 0).

    The one line that makes it immiscible: ``noise = self.noise_like(x0)`` instead of
    ``torch.randn_like(x0)``. With ``ImmiscibleCoupling`` in the trainer's callbacks the noise is
    re-paired with the batch; without it (or with ``method="none"``) this is the plain DDPM.

    Args:
        net: The epsilon predictor ``net(x_t, t)``: ``(B, C, H, W)`` and ``(B,)`` integer timesteps
            -> ``(B, C, H, W)``. In a config: ``model.net.class_path`` + ``init_args`` (the configs
            use the shared [UNet][example_projects.common.unet.UNet]; any ``nn.Module`` with that
            call signature works).
        in_channels: Image channels (linked to ``data.channels`` by the CLI).
        image_size: Image height = width (linked to ``data.image_size`` by the CLI).
        num_timesteps: Diffusion steps T.
        schedule: ``linear`` (DDPM) or ``cosine`` (improved DDPM) betas.
        lr: Adam learning rate.
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights used for sampling and FID.
        ema_warmup: Ramp the EMA decay up over the first updates (off for the published setting).

    Examples:
        ```python
        from example_projects.common.unet import UNet

        model = DDIMDiffusion(UNet(in_channels=1, base_channels=16, channel_mult=(1, 2, 4)))
        ```
    """

    def __init__(
        self,
        net: nn.Module,
        in_channels: int = 1,
        image_size: int = 32,
        num_timesteps: int = 1000,
        schedule: Literal["linear", "cosine"] = "linear",
        lr: float = 2e-4,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
    ) -> None:
        super().__init__()
        # The network's own config lives in the CLI's saved config.yaml; load a checkpoint in
        # Python with `DDIMDiffusion.load_from_checkpoint(path, net=UNet(...))`.
        self.save_hyperparameters(ignore=["net"])
        self.net = net
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

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.coupled_data(batch)  # immiscible_data(batch), computed once per batch
        check_sample_shape(x0, self.sample_shape())
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
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step, after it: with gradient accumulation too (never per micro-batch).
        self.ema.update(self.net)

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 50, use_ema: bool = True) -> Tensor:
        """DDIM samples (eta = 0) from ``(B, C, H, W)`` starting noise, in ``[-1, 1]``.

        Deterministic: draw ``noise`` from a seeded generator for reproducible samples.
        """
        with eval_mode(self.ema.model if use_ema else self.net) as net:
            return ddim_sample(net, noise, self.alphas_cumprod, steps)

    @override
    def configure_optimizers(self) -> Any:
        return warmup_optimizer(self.net.parameters(), self.hparams.lr, self.hparams.warmup_steps)
