"""Entry point: ``python -m example_projects.consistency fit --config ... --config ...``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from example_projects.common.data import ImageDataModule
from example_projects.common.progress import ImmiscibleProgressBar, RunSummary
from example_projects.consistency.callbacks import ConsistencyFID, ConsistencyGrid
from example_projects.consistency.model import ConsistencyTraining


class ConsistencyCLI(LightningCLI):
    """Adds the example's callbacks as top-level config groups (``fid:``, ``grid:``...).

    So ``trainer.callbacks`` holds only the coupling, and an overlay that sets it (immiscible.yaml,
    baseline.yaml) replaces exactly that one entry.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ConsistencyFID, "fid")
        parser.add_lightning_class_args(ConsistencyGrid, "grid")
        parser.add_lightning_class_args(ImmiscibleProgressBar, "progress_bar")
        parser.add_lightning_class_args(RunSummary, "summary")
        # The model's image shape follows the data (resolved channels: 1 for MNIST, else 3).
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> ConsistencyCLI:
    return ConsistencyCLI(
        ConsistencyTraining, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    cli_main()
