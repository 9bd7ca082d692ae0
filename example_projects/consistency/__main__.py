"""Entry point: ``python -m example_projects.consistency fit --config ... --config ...``."""

from __future__ import annotations

from example_projects.common.cli import ExampleCLI
from example_projects.common.data import ImageDataModule
from example_projects.consistency.callbacks import ConsistencyFID, ConsistencyGrid
from example_projects.consistency.model import ConsistencyTraining


class ConsistencyCLI(ExampleCLI):
    """The shared example CLI with one- and few-step FID (``..._cm{steps}``) and grids."""

    fid_class = ConsistencyFID
    grid_class = ConsistencyGrid


def cli_main(args: list[str] | None = None, run: bool = True) -> ConsistencyCLI:
    return ConsistencyCLI(
        ConsistencyTraining, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    cli_main()
