"""``python -m example_projects.latent_diffusion fit --config ...``: both stages (the config picks the model).

Stage 1: ``--config configs/autoencoder_quickstart.yaml`` (model ``LatentAutoencoder``).
Stage 2: ``--config configs/quickstart.yaml --config configs/immiscible.yaml`` (``LatentDiffusion``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from example_projects.common.cli import ExampleCLI
from example_projects.latent_diffusion.grids import ClassGrid
from example_projects.latent_diffusion.worker_data import LatentDataModule


class LatentCLI(ExampleCLI):
    """LightningCLI over any LightningModule (``model.class_path`` picks the stage).

    The example's callbacks are top-level groups (``fid:``, ``grid:``, ``checkpoint:``...), so
    ``trainer.callbacks`` holds only the coupling and an overlay (immiscible.yaml / baseline.yaml)
    replaces exactly that entry. Stage 1 (a model without ``sample``) runs without FID and grids.
    """

    grid_class = ClassGrid
    model_arguments = "model.init_args"

    def add_arguments_to_parser(self, parser: Any) -> None:
        """The shared groups, plus ``checkpoint:`` (stage 2 and fine-tuning read its output)."""
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, without the sampling callbacks when the model cannot sample (stage 1)."""
        trainer = super().instantiate_trainer(**kwargs)
        if not callable(getattr(self.model, "sample", None)):
            sampling = (self.fid_class, self.grid_class)
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, sampling)]
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> LatentCLI:
    """Runs the CLI (``fit``, ``validate``...) on ``args`` (``None``: ``sys.argv``); returns it."""
    return LatentCLI(
        L.LightningModule,
        LatentDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
