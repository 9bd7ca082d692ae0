"""``python -m example_projects.ddim fit --config .../quickstart.yaml --config .../immiscible.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from example_projects.common.data import ImageDataModule
from example_projects.common.fid import FIDCallback
from example_projects.common.grids import SampleGrid
from example_projects.common.progress import ImmiscibleProgressBar, RunSummary
from example_projects.ddim.model import DDIMDiffusion


class DDIMCLI(LightningCLI):
    """Adds the example's callbacks as top-level config groups (``fid:``, ``grid:``...).

    So ``trainer.callbacks`` holds only the coupling, and an overlay that sets it (immiscible.yaml,
    baseline.yaml) replaces exactly that one entry.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(FIDCallback, "fid")
        parser.add_lightning_class_args(SampleGrid, "grid")
        parser.add_lightning_class_args(ImmiscibleProgressBar, "progress_bar")
        parser.add_lightning_class_args(RunSummary, "summary")
        # The model's image shape follows the data (resolved channels: 1 for MNIST, else 3).
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> DDIMCLI:
    return DDIMCLI(DDIMDiffusion, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()
