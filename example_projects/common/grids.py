"""Sample grids: generated from a fixed seed, saved as PNG files and sent to the logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override


def make_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """``(B, C, H, W)`` in ``[-1, 1]`` -> ``(C, H', W')`` grid in ``[0, 1]`` (2-pixel padding)."""
    from torchvision.utils import make_grid as tv_make_grid

    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    return tv_make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Saves ``(B, C, H, W)`` images in ``[-1, 1]`` as one PNG grid; returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow), path)
    return path


def log_grid(logger: Any, tag: str, grid: Tensor, step: int) -> bool:
    """Sends a ``(C, H, W)`` grid to loggers that take images (TensorBoard, W&B, MLflow...)."""
    experiment = getattr(logger, "experiment", None)
    if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger
        logger.log_image(key=tag, images=[grid], step=step)
        return True
    if hasattr(experiment, "add_image"):  # TensorBoardLogger
        experiment.add_image(tag, grid, global_step=step)
        return True
    if hasattr(experiment, "log_image") and hasattr(logger, "run_id"):  # MLFlowLogger
        experiment.log_image(
            logger.run_id, grid.permute(1, 2, 0).numpy(), f"{tag.replace('/', '_')}_{step}.png"
        )
        return True
    return False


class SampleGrid(L.Callback):
    """Saves a grid of samples after each validation epoch (and logs it where the logger can).

    Files: ``{dirpath}/step{global_step:07d}.png`` and ``{dirpath}/latest.png``, with ``dirpath``
    defaulting to ``{trainer.log_dir}/grids``. The starting noise is the same every time, so the
    grids show one set of samples improving over training.

    Args:
        num_images: Samples in the grid.
        steps: DDIM sampling steps.
        seed: Seed of the starting noise.
        dirpath: Output directory (``None``: next to the logs).
    """

    def __init__(
        self, num_images: int = 64, steps: int = 50, seed: int = 0, dirpath: str | None = None
    ) -> None:
        if num_images < 1 or steps < 1:
            raise ValueError(f"num_images and steps must be >= 1, got {num_images}, {steps}.")
        self.num_images, self.steps, self.seed, self.dirpath = num_images, steps, seed, dirpath
        self.latest: Path | None = None

    def output_dir(self, trainer: L.Trainer) -> Path:
        """Where the PNG files go."""
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "grids")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: Any) -> None:
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_images, *pl_module.sample_shape()), generator=g).to(pl_module.device)
        images = pl_module.sample(noise, self.steps)
        out = self.output_dir(trainer)
        save_grid(images, out / f"step{trainer.global_step:07d}.png")
        self.latest = save_grid(images, out / "latest.png")
        for logger in trainer.loggers:
            log_grid(logger, f"samples/ddim{self.steps}", make_grid(images), trainer.global_step)
