"""Frozen image <-> latent codecs for stage 2: our stage-1 autoencoder or a diffusers ``AutoencoderKL``.

A codec maps images ``(B, C, H, W)`` in ``[-1, 1]`` to *scaled* latents ``(B, c, h, w)`` of about
unit variance and back. The scaling factor (ours: measured by stage 1 and stored in its checkpoint;
diffusers: ``vae.config.scaling_factor``, 0.18215 for Stable Diffusion 1.x) is applied on encode and
undone on decode, so the diffusion model never sees it.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from example_projects.latent_diffusion.autoencoder import LatentAutoencoder

#: Where ``configs/autoencoder_quickstart.yaml`` writes the stage-1 checkpoint (stage 2's default).
DEFAULT_AUTOENCODER_PATH = "runs/latent_autoencoder/last.ckpt"
STAGE1_COMMAND = (
    "python -m example_projects.latent_diffusion fit "
    "--config example_projects/latent_diffusion/configs/autoencoder_quickstart.yaml"
)
KINDS = ("ours", "diffusers")
SD_SCALING_FACTOR = 0.18215


class Codec(nn.Module):
    """Base class: a frozen encoder/decoder that stays in eval mode (``fit`` calls ``.train()``)."""

    scaling_factor: float

    def train(self, mode: bool = True) -> Codec:
        """Ignores ``mode``: the codec is frozen, always in eval mode."""
        return super().train(False)

    def encode(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` images in ``[-1, 1]`` -> ``(B, c, h, w)`` scaled latents."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """``(B, c, h, w)`` scaled latents -> ``(B, C, H, W)`` images clamped to ``[-1, 1]``."""
        raise NotImplementedError


class OwnCodec(Codec):
    """Wraps a trained :class:`LatentAutoencoder` (its weights travel in stage 2's checkpoint)."""

    def __init__(self, autoencoder: LatentAutoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False)
        self.train(False)

    @property
    def scaling_factor(self) -> float:  # type: ignore[override]
        """``1 / std`` of the stage-1 latents, from its checkpoint."""
        return float(self.autoencoder.scaling_factor)

    def latent_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of one latent."""
        return self.autoencoder.latent_shape()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:  # noqa: D102
        return self.autoencoder.encode(images) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:  # noqa: D102
        return self.autoencoder.decode(latents / self.scaling_factor).clamp(-1, 1)


class DiffusersCodec(Codec):
    """Wraps a diffusers ``AutoencoderKL`` (3-channel); 1-channel data is repeated / averaged.

    Args:
        vae: An ``AutoencoderKL`` (or anything with ``encode(x).latent_dist.mode()``,
            ``decode(z).sample`` and ``config.scaling_factor``).
        in_channels: Channels of the data (1 or 3).
        image_size: Image height = width.
    """

    def __init__(self, vae: nn.Module, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False)
        config = getattr(vae, "config", None)
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or SD_SCALING_FACTOR)
        self.in_channels, self.image_size = in_channels, image_size
        self.train(False)

    @torch.no_grad()
    def latent_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)``, found by encoding one blank image."""
        probe = torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=_device(self))
        return tuple(self.encode(probe).shape[1:])  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:  # noqa: D102
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:  # noqa: D102
        images = self.vae.decode(latents / self.scaling_factor).sample
        if self.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        return images.clamp(-1, 1)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(())).device


def load_codec(
    kind: str, path: str, in_channels: int, image_size: int, subfolder: str | None = None
) -> Codec:
    """Builds the frozen codec of stage 2.

    Args:
        kind: ``"ours"`` (a stage-1 checkpoint) or ``"diffusers"`` (``AutoencoderKL.from_pretrained``).
        path: The stage-1 ``.ckpt`` file, or a local diffusers directory / Hub id.
        in_channels: Data channels (checked against our autoencoder's).
        image_size: Data height = width.
        subfolder: diffusers only, e.g. ``"vae"`` for a full Stable Diffusion repository.

    Raises:
        FileNotFoundError: Our checkpoint is missing (names the stage-1 command).
        ImportError: ``kind="diffusers"`` without diffusers installed.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown autoencoder kind {kind!r}; expected one of {KINDS}.")
    if kind == "diffusers":
        return DiffusersCodec(load_diffusers_vae(path, subfolder), in_channels, image_size)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Stage-1 autoencoder checkpoint {path!r} not found. Train stage 1 first:\n  {STAGE1_COMMAND}\n"
            f"(it writes {DEFAULT_AUTOENCODER_PATH}), or set model.init_args.autoencoder_path."
        )
    # A fresh context: when LightningCLI builds stage 2, its hyperparameters sit in a context variable
    # that save_hyperparameters() of any module built inside would pick up instead of its own.
    ae = contextvars.Context().run(LatentAutoencoder.load_from_checkpoint, path, map_location="cpu")
    _check_own(ae, path, in_channels, image_size)
    return OwnCodec(ae)


def _check_own(ae: LatentAutoencoder, path: str, in_channels: int, image_size: int) -> None:
    if (ae.hparams.in_channels, ae.hparams.image_size) != (in_channels, image_size):
        raise ValueError(
            f"The autoencoder {path!r} was trained on {ae.hparams.in_channels}x{ae.hparams.image_size}^2 "
            f"images, but the data is {in_channels}x{image_size}^2."
        )
    if float(ae.scaling_factor) <= 0:
        raise ValueError(
            f"The autoencoder {path!r} has no latent scaling factor: it is measured at the end of a "
            "validation epoch of stage 1; train stage 1 with validation enabled."
        )


def load_diffusers_vae(path: str, subfolder: str | None) -> Any:
    """Loads a diffusers `AutoencoderKL` from a hub id or a local folder (`diffusers` is optional)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(
            "model.init_args.autoencoder_kind='diffusers' needs the optional `diffusers` package: "
            "`pip install diffusers` (or use autoencoder_kind='ours' with the stage-1 checkpoint: "
            f"{STAGE1_COMMAND})."
        ) from err
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return AutoencoderKL.from_pretrained(path, **kwargs)
