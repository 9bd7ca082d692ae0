"""Per-class sample grids: one row per class (or one plain grid for an unconditional model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from example_projects.common.grids import log_grid, make_grid, save_grid


class ClassGrid(L.Callback):
    """Saves ``{dirpath}/step{global_step:07d}.png`` and ``latest.png`` after each validation epoch.

    A class-conditional model gets one row per class (``per_class`` samples each, guided with
    ``guidance_scale``); an unconditional one a ``per_class x per_class`` grid. The starting noise
    is the same every time. ``dirpath`` defaults to ``{trainer.log_dir}/grids``.

    Args:
        per_class: Samples per row.
        steps: DDIM sampling steps.
        guidance_scale: Classifier-free guidance scale (``None``: the model's ``guidance_scale``).
        seed: Seed of the starting noise.
        dirpath: Output directory.
    """

    def __init__(
        self,
        per_class: int = 8,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        dirpath: str | None = None,
    ) -> None:
        if per_class < 1 or steps < 1:
            raise ValueError(f"per_class and steps must be >= 1, got {per_class}, {steps}.")
        self.per_class, self.steps, self.guidance_scale = per_class, steps, guidance_scale
        self.seed, self.dirpath = seed, dirpath
        self.latest: Path | None = None

    def output_dir(self, trainer: L.Trainer) -> Path:
        """Where the PNG files go."""
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "grids")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: Any) -> None:
        num_classes = pl_module.hparams.get("num_classes") or 0
        rows = num_classes or self.per_class
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((rows * self.per_class, *pl_module.sample_shape()), generator=g).to(
            pl_module.device
        )
        labels = None
        if num_classes:
            labels = torch.arange(num_classes, device=pl_module.device).repeat_interleave(self.per_class)
        images = pl_module.sample(noise, self.steps, labels=labels, guidance_scale=self.guidance_scale)
        out = self.output_dir(trainer)
        save_grid(images, out / f"step{trainer.global_step:07d}.png", nrow=self.per_class)
        self.latest = save_grid(images, out / "latest.png", nrow=self.per_class)
        tag = f"samples/per_class_ddim{self.steps}" if num_classes else f"samples/ddim{self.steps}"
        for logger in trainer.loggers:
            log_grid(logger, tag, make_grid(images, self.per_class), trainer.global_step)
