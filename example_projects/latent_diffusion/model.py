"""Stage 2: latent diffusion (epsilon prediction on autoencoder latents), optionally class-conditional.

The coupling acts on latents: ``LatentDiffusion.immiscible_data`` encodes the batch's images; the
``ImmiscibleCoupling`` callback calls it once per training batch and ``training_step`` reads that
encoding back with ``self.coupled_data(batch)``, so the encoder runs once per batch. Only the noise is
re-paired; each latent keeps its own label. Classifier-free guidance (Ho & Salimans 2022): labels
are dropped to the "null" class with probability ``cond_drop_prob`` in training, and sampling uses
``eps = eps_uncond + w (eps_cond - eps_uncond)``.

A class-conditional model couples within classes (``immiscible_condition`` returns the labels), so the
noise each class trains on stays Gaussian, as it is at sampling time; the ``cross_class.yaml``
overlay couples across classes instead, for comparison. Items whose label is dropped to the null
class keep their class for the coupling: the callback couples before ``training_step`` draws the
drop, and the drop is independent of the data and the noise, so the dropped items are a random
subset of every class and the noise the null (unconditional) branch trains on is still Gaussian.
Giving them their own condition would need the drop drawn before the coupling, for a branch that
sees ``cond_drop_prob`` (10 %) of the items.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from example_projects.common.ema import EMA
from example_projects.common.training import eval_mode, warmup_optimizer
from example_projects.ddim.schedule import ddim_sample, eps_loss, make_betas
from example_projects.latent_diffusion.codecs import DEFAULT_AUTOENCODER_PATH, load_codec
from lightning_immiscible import ImmiscibleMixin


def guided_eps(net: nn.Module, x: Tensor, t: Tensor, y: Tensor | None, scale: float, null: int) -> Tensor:
    """Classifier-free guidance: ``eps_u + scale * (eps_c - eps_u)`` in one batched forward pass.

    ``scale == 1`` returns the conditional prediction itself (one pass), ``scale == 0`` the
    unconditional one; ``y is None`` (an unconditional model) ignores ``scale``.

    Args:
        net: ``net(x, t, y) -> eps``, with label ``null`` meaning "no class".
        x: ``(B, c, h, w)`` noisy latents.
        t: ``(B,)`` timesteps.
        y: ``(B,)`` class labels, or ``None``.
        scale: The guidance scale ``w``.
        null: The "no class" label.

    Returns:
        ``(B, c, h, w)`` guided epsilon.
    """
    if y is None:
        return net(x, t)
    if scale == 1.0:
        return net(x, t, y)
    if scale == 0.0:
        return net(x, t, torch.full_like(y, null))
    eps_c, eps_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(
        2
    )
    return eps_u + scale * (eps_c - eps_u)


def balanced_labels(n: int, num_classes: int, device: torch.device | None = None) -> Tensor:
    """``(n,)`` labels ``0, 1, ..., K-1, 0, 1, ...``: deterministic, balanced samples for FID."""
    return torch.arange(n, device=device) % num_classes


class LatentDiffusion(ImmiscibleMixin, L.LightningModule):
    """DDPM on the latents of a frozen autoencoder, sampled with DDIM and decoded to images.

    Args:
        net: The epsilon predictor on latents, ``net(z_t, t, y)``: ``(B, c, h, w)``, ``(B,)``
            timesteps and ``(B,)`` labels or ``None`` -> ``(B, c, h, w)``; label ``num_classes``
            means "no class". In a config: ``model.init_args.net.class_path`` + ``init_args`` (the
            configs use the shared [UNet][example_projects.common.unet.UNet], whose ``in_channels``,
            ``image_size`` and ``num_classes`` must be the latents' ``c``, ``h`` and ``num_classes``).
        autoencoder_kind: ``"ours"`` (a stage-1 checkpoint) or ``"diffusers"`` (a pretrained
            ``AutoencoderKL``; needs the optional ``diffusers`` package).
        autoencoder_path: The stage-1 checkpoint, or a diffusers directory / Hub id.
        autoencoder_subfolder: diffusers only (``"vae"`` inside a Stable Diffusion repository).
        in_channels: Image channels (linked to the data).
        image_size: Image height = width (linked to the data).
        num_classes: Number of classes for class-conditional training (``None``: unconditional).
        cond_drop_prob: Probability of dropping a label to the null class (classifier-free guidance).
        guidance_scale: ``w`` used by :meth:`sample` (FID, grids) when labels are given.
        num_timesteps: Diffusion steps T.
        schedule: ``linear`` or ``cosine`` betas.
        lr: Adam learning rate (a smaller one for fine-tuning).
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights used for sampling and FID.
        ema_warmup: Ramp the EMA decay up over the first updates.
        init_checkpoint: Fine-tuning: a stage-2 ``.ckpt`` (or a ``state_dict`` of the UNet) whose
            weights initialise the model; optimizer and step counters start fresh.
        encoded_batches: Training batches carry latents already, encoded (and coupled) in the
            DataLoader workers (``data.pool_batches``, ``configs/pooled_workers.yaml``); validation
            batches are still images.
    """

    def __init__(
        self,
        net: nn.Module,
        autoencoder_kind: str = "ours",
        autoencoder_path: str = DEFAULT_AUTOENCODER_PATH,
        autoencoder_subfolder: str | None = None,
        in_channels: int = 1,
        image_size: int = 32,
        num_classes: int | None = None,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 1.0,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        lr: float = 1e-3,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        init_checkpoint: str | None = None,
        encoded_batches: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}.")
        # The network's own config lives in the CLI's saved config.yaml; load a checkpoint in
        # Python with `LatentDiffusion.load_from_checkpoint(path, net=UNet(...))`.
        self.save_hyperparameters(ignore=["net"])
        self.codec = load_codec(
            autoencoder_kind, autoencoder_path, in_channels, image_size, autoencoder_subfolder
        )
        self.latent_dims = tuple(self.codec.latent_shape())
        if num_classes and getattr(net, "class_emb", ...) is None:  # the shared UNet without labels
            raise ValueError(
                f"model.init_args.num_classes={num_classes}, but the network has no class embedding: "
                f"set model.init_args.net.init_args.num_classes: {num_classes} as well."
            )
        self.net = net
        self.ema = EMA(self.net, ema_decay, ema_warmup)
        self.register_buffer(
            "alphas_cumprod", torch.cumprod(1 - make_betas(schedule, num_timesteps), 0).float()
        )
        if init_checkpoint:
            self.load_init_weights(init_checkpoint)

    @property
    def null_label(self) -> int:
        """The label meaning "no class" (``num_classes``)."""
        return int(self.hparams.num_classes or 0)

    def sample_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of one latent: the FID and grid callbacks draw starting noise of this shape."""
        return self.latent_dims

    def load_init_weights(self, path: str) -> None:
        """Fine-tuning: loads a stage-2 checkpoint's weights (UNet, EMA, codec) or a UNet state dict."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in state:
            self.load_state_dict(state["state_dict"], strict=True)
        else:
            self.net.load_state_dict(state, strict=True)
            self.ema.model.load_state_dict(state, strict=True)
        rank_zero_info(f"LatentDiffusion: initialised from {path} (fine-tuning, lr={self.hparams.lr}).")

    @override
    def immiscible_data(self, batch: Any) -> Tensor:
        """The coupling's ``x0``: the batch's images encoded to ``(B, c, h, w)`` scaled latents.

        With ``encoded_batches`` the batch holds those latents already (the workers encoded them).
        """
        return batch[0] if self.hparams.encoded_batches else self.codec.encode(batch[0])

    @override
    def immiscible_condition(self, batch: Any) -> Tensor | None:
        """The coupling's condition: the batch's class labels (before the null-label drop), or ``None``."""
        return self.labels(batch)

    def labels(self, batch: Any) -> Tensor | None:
        """The batch's ``(B,)`` labels (class-conditional), else ``None``."""
        return batch[1].long() if self.hparams.num_classes else None

    def drop_labels(self, y: Tensor | None) -> Tensor | None:
        """Replaces each label by the null class with probability ``cond_drop_prob`` (CFG training)."""
        if y is None or self.hparams.cond_drop_prob == 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.hparams.cond_drop_prob
        return torch.where(drop, torch.full_like(y, self.null_label), y)

    def loss(
        self, z0: Tensor, noise: Tensor, t: Tensor, y: Tensor | None, net: nn.Module | None = None
    ) -> Tensor:
        """Epsilon loss on ``(B, c, h, w)`` latents, their paired noise, ``(B,)`` timesteps and labels."""
        net = net or self.net
        return eps_loss(lambda x, tt: net(x, tt, y), z0, noise, t, self.alphas_cumprod)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        z0 = self.coupled_data(batch)  # the callback's encoding of this batch: the encoder runs once
        noise = self.noise_like(z0)  # coupled with the latents when ImmiscibleCoupling is active
        y = self.drop_labels(self.labels(batch))  # labels stay with their images: never re-paired
        t = torch.randint(0, self.hparams.num_timesteps, (z0.shape[0],), device=z0.device)
        loss = self.loss(z0, noise, t, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        z0 = self.codec.encode(batch[0])
        g = torch.Generator().manual_seed(batch_idx)  # the same noise and t every evaluation
        noise = torch.randn(z0.shape, generator=g).to(z0)
        t = torch.randint(0, self.hparams.num_timesteps, (z0.shape[0],), generator=g).to(z0.device)
        loss = self.loss(z0, noise, t, self.labels(batch), self.ema.model)
        self.log("val/loss", loss, sync_dist=True)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step, after it: with gradient accumulation too (never per micro-batch).
        self.ema.update(self.net)

    @torch.no_grad()
    def sample_latents(
        self,
        noise: Tensor,
        steps: int,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """DDIM (eta = 0) from ``(B, c, h, w)`` noise to ``(B, c, h, w)`` latents (not clipped)."""
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        with eval_mode(self.ema.model if use_ema else self.net) as net:
            return ddim_sample(
                lambda x, t: guided_eps(net, x, t, labels, scale, self.null_label),
                noise,
                self.alphas_cumprod,
                steps,
                clip=False,
            )

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        steps: int = 50,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Decoded samples ``(B, C, H, W)`` in ``[-1, 1]`` from ``(B, c, h, w)`` latent noise.

        Deterministic given ``noise``. A class-conditional model without ``labels`` samples the
        balanced labels ``0..K-1, 0..`` (what the FID callback gets), with ``guidance_scale``
        (default: the ``guidance_scale`` hyperparameter).
        """
        if labels is None and self.hparams.num_classes:
            labels = balanced_labels(noise.shape[0], self.hparams.num_classes, noise.device)
        return self.codec.decode(self.sample_latents(noise, steps, labels, guidance_scale, use_ema))

    @override
    def configure_optimizers(self) -> Any:
        return warmup_optimizer(self.net.parameters(), self.hparams.lr, self.hparams.warmup_steps)
