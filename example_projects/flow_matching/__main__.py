"""``python -m example_projects.flow_matching fit --config .../quickstart.yaml --config .../ot.yaml``."""

from __future__ import annotations

from example_projects.common.cli import ExampleCLI
from example_projects.common.data import ImageDataModule
from example_projects.flow_matching.callbacks import FlowMatchingFID
from example_projects.flow_matching.model import FlowMatching


class FlowMatchingCLI(ExampleCLI):
    """The shared example CLI: ``fid:`` logs ``val/fid..._{sampler}{steps}`` per sampler spec."""

    fid_class = FlowMatchingFID


def cli_main(args: list[str] | None = None, run: bool = True) -> FlowMatchingCLI:
    return FlowMatchingCLI(
        FlowMatching, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    cli_main()
