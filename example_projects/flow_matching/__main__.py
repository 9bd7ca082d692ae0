"""``python -m example_projects.flow_matching fit|validate|compare --config .../quickstart.yaml ...``.

``fit`` and the other LightningCLI subcommands train or evaluate one run; ``compare`` trains the
independent-pairs and OT-pairs arms on the same seed and reports them side by side (``compare.py``).
"""

from __future__ import annotations

import sys
from typing import Any

from example_projects.common.cli import ExampleCLI
from example_projects.common.data import ImageDataModule
from example_projects.flow_matching.callbacks import FlowMatchingFID
from example_projects.flow_matching.compare import compare
from example_projects.flow_matching.model import FlowMatching


class FlowMatchingCLI(ExampleCLI):
    """The shared example CLI: ``fid:`` logs ``val/fid..._{sampler}{steps}`` per sampler spec.

    The data's order is seeded and resumable by default (``data.seeded_order``): with the module's own
    training-time stream, a resumed run continues exactly as an uninterrupted one, and the evaluation
    schedule does not change what training draws.
    """

    fid_class = FlowMatchingFID

    def add_arguments_to_parser(self, parser: Any) -> None:
        """The shared groups, and ``data.seeded_order: true`` as the default."""
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"data.seeded_order": True})


def cli_main(args: list[str] | None = None, run: bool = True) -> Any:
    """The LightningCLI of one run, or, for ``compare ...``, the side-by-side report (a dict)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        return compare(argv[1:], cli_factory=fit_cli)
    return fit_cli(args, run)


def fit_cli(args: list[str] | None = None, run: bool = True) -> FlowMatchingCLI:
    """The example's LightningCLI (``run=False``: instantiated, not run; ``args`` without a subcommand)."""
    return FlowMatchingCLI(
        FlowMatching, ImageDataModule, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    cli_main()
