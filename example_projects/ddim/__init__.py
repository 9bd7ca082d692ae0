"""DDIM example: DDPM training with DDIM sampling and FID logging, made immiscible by one line."""

from example_projects.ddim.model import DDIMDiffusion

__all__ = ["DDIMDiffusion", "cli_main"]


def cli_main(args: list[str] | None = None, run: bool = True) -> object:
    """Runs the example's LightningCLI (``fit``, ``validate``...); returns the CLI object."""
    from example_projects.ddim.__main__ import cli_main as _main

    return _main(args, run)
