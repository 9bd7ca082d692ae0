"""Stage 1: a small convolutional autoencoder (plain or KL-regularised) for latent diffusion.

Trained by its own config (``configs/autoencoder_quickstart.yaml``). After every validation epoch
it sets ``scaling_factor = 1 / std(latents)`` over the validation images (as Stable Diffusion's
0.18215 was chosen), a buffer saved in its checkpoint, so stage 2 sees latents of unit variance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from example_projects.common.grids import save_grid


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class _Res(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))``: ``(B, C, H, W)`` -> ``(B, C, H, W)``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block."""
        return x + self.body(x)


def _widths(base: int, num_down: int) -> list[int]:
    return [base * min(2**i, 4) for i in range(num_down + 1)]


def build_encoder(in_ch: int, base: int, num_down: int, out_ch: int) -> nn.Sequential:
    """``(B, in_ch, H, W)`` -> ``(B, out_ch, H / 2**num_down, W / 2**num_down)``."""
    w = _widths(base, num_down)
    layers: list[nn.Module] = [nn.Conv2d(in_ch, w[0], 3, padding=1)]
    for i in range(num_down):
        layers += [_Res(w[i]), nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1)]
    layers += [_Res(w[-1]), _norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], out_ch, 1)]
    return nn.Sequential(*layers)


def build_decoder(latent_ch: int, base: int, num_down: int, out_ch: int) -> nn.Sequential:
    """``(B, latent_ch, h, w)`` -> ``(B, out_ch, h * 2**num_down, w * 2**num_down)``."""
    w = _widths(base, num_down)[::-1]
    layers: list[nn.Module] = [nn.Conv2d(latent_ch, w[0], 3, padding=1), _Res(w[0])]
    for i in range(num_down):
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w[i], w[i + 1], 3, padding=1),
            _Res(w[i + 1]),
        ]
    layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


class LatentAutoencoder(L.LightningModule):
    """Convolutional autoencoder: images ``(B, C, H, W)`` <-> latents ``(B, latent_channels, h, w)``.

    ``h = H / 2**num_down``. With ``kl_weight > 0`` the encoder predicts a diagonal Gaussian (mean
    and log-variance, as in the LDM "KL-f4" autoencoders) and training samples from it with a KL
    penalty; :meth:`encode` always returns the mean. With ``kl_weight = 0`` it is a plain
    autoencoder.

    Args:
        in_channels: Image channels (linked to the data).
        image_size: Image height = width (divisible by ``2**num_down``).
        latent_channels: Latent channels (4 in Stable Diffusion).
        num_down: Downsampling steps (each halves H and W; Stable Diffusion uses 3).
        base_channels: Width of the first level (doubles per level, at most 4x).
        kl_weight: Weight of the KL term (0: plain autoencoder; SD's KL-f8 used 1e-6).
        lr: Adam learning rate.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        latent_channels: int = 4,
        num_down: int = 2,
        base_channels: int = 8,
        kl_weight: float = 0.0,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        if image_size % 2**num_down:
            raise ValueError(f"image_size={image_size} is not divisible by 2**num_down={2**num_down}.")
        self.save_hyperparameters()
        moments = 2 * latent_channels if kl_weight > 0 else latent_channels
        self.encoder = build_encoder(in_channels, base_channels, num_down, moments)
        self.decoder = build_decoder(latent_channels, base_channels, num_down, in_channels)
        # 0 until the first validation epoch measured the latents' std (see on_validation_epoch_end).
        self.register_buffer("scaling_factor", torch.zeros(()))
        self._latent_stats: list[Tensor] = []

    def latent_shape(self) -> tuple[int, int, int]:
        """``(latent_channels, h, w)`` of one image's latent."""
        side = self.hparams.image_size // 2**self.hparams.num_down
        return (self.hparams.latent_channels, side, side)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(B, C, H, W)`` -> mean ``(B, c, h, w)`` and log-variance (``None`` for a plain AE)."""
        out = self.encoder(images)
        if self.hparams.kl_weight > 0:
            mean, logvar = out.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)
        return out, None

    def encode(self, images: Tensor) -> Tensor:
        """Unscaled latents (the posterior mean): ``(B, C, H, W)`` -> ``(B, c, h, w)``."""
        return self.moments(images)[0]

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents ``(B, c, h, w)`` -> images ``(B, C, H, W)`` (not clamped)."""
        return self.decoder(latents)

    def _loss(self, images: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        mean, logvar = self.moments(images)
        z = mean
        kl = torch.zeros((), device=images.device)
        if logvar is not None:
            if sample:
                z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        mse = F.mse_loss(self.decode(z), images)
        return mse, kl

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        mse, kl = self._loss(batch[0], sample=True)
        loss = mse + self.hparams.kl_weight * kl
        self.log("train/mse", mse, prog_bar=True)
        if self.hparams.kl_weight > 0:
            self.log("train/kl", kl)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0]
        mse, _ = self._loss(images, sample=False)
        self.log("val/mse", mse, prog_bar=True, sync_dist=True)
        z = self.encode(images).double()
        self._latent_stats.append(torch.stack([z.new_tensor(z.numel()), z.sum(), z.pow(2).sum()]))
        if batch_idx == 0:
            self._save_reconstructions(images[:32])

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._latent_stats or self.trainer.sanity_checking:
            self._latent_stats.clear()
            return
        n, s, ss = self.trainer.strategy.reduce(torch.stack(self._latent_stats).sum(0), reduce_op="sum")
        self._latent_stats.clear()
        std = (ss / n - (s / n) ** 2).clamp_min(1e-12).sqrt()
        self.scaling_factor.fill_(float(1.0 / std))
        self.log("val/latent_std", std.float())

    @rank_zero_only
    def _save_reconstructions(self, images: Tensor) -> None:
        """Top half originals, bottom half reconstructions: ``{log_dir}/reconstructions/latest.png``."""
        if self.trainer.sanity_checking:
            return
        recon = self.decode(self.encode(images)).clamp(-1, 1)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"
        save_grid(torch.cat([images, recon]), out / "latest.png", nrow=8)

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
