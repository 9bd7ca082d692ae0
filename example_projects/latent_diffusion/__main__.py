"""``python -m example_projects.latent_diffusion fit --config ...``: both stages (the config picks the model).

Stage 1: ``--config configs/autoencoder_quickstart.yaml`` (model ``LatentAutoencoder``).
Stage 2: ``--config configs/quickstart.yaml --config configs/immiscible.yaml`` (``LatentDiffusion``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from example_projects.common.cli import ExampleCLI
from example_projects.common.data import ImageDataModule
from example_projects.latent_diffusion.grids import ClassGrid

#: Config groups that only make sense for a model that samples (stage 2).
SAMPLING_GROUPS = ("fid", "grid")


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
        """Drops the sampling callbacks when the model cannot sample (the stage-1 autoencoder)."""
        keys = self._parser(self.subcommand).callback_keys
        skip = () if callable(getattr(self.model, "sample", None)) else SAMPLING_GROUPS
        extra = [self._get(self.config_init, key) for key in keys if key not in skip]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(config, extra)


def cli_main(args: list[str] | None = None, run: bool = True) -> LatentCLI:
    """Runs the CLI (``fit``, ``validate``...) on ``args`` (``None``: ``sys.argv``); returns it."""
    return LatentCLI(
        L.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
