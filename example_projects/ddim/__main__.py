"""``python -m example_projects.ddim fit --config .../quickstart.yaml --config .../immiscible.yaml``."""

from __future__ import annotations

from example_projects.common.cli import ExampleCLI
from example_projects.common.data import ImageDataModule
from example_projects.ddim.model import DDIMDiffusion


class DDIMCLI(ExampleCLI):
    """The shared example CLI: ``fid:`` logs ``val/fid..._ddim{steps}``, ``grid:`` DDIM grids."""


def cli_main(args: list[str] | None = None, run: bool = True) -> DDIMCLI:
    return DDIMCLI(DDIMDiffusion, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()
