"""Consistency training (iCT) example: one- and two-step generation with FID, made immiscible by one line."""

from example_projects.consistency.model import ConsistencyFunction, ConsistencyTraining

__all__ = ["ConsistencyFunction", "ConsistencyTraining", "cli_main"]


def cli_main(args: list[str] | None = None, run: bool = True) -> object:
    """Runs the example's LightningCLI (``fit``, ``validate``...); returns the CLI object."""
    from example_projects.consistency.__main__ import cli_main as _main

    return _main(args, run)
