"""Flow matching (rectified flow / minibatch-OT flow matching) with few-step FID, and a 2-D template.

Pure pieces, importable without Lightning's model code: ``objective`` (interpolant, target, loss,
time sampling), ``samplers`` (Euler, Heun), ``targets2d`` (2-D target distributions) and
``metrics2d`` (exact W2, path straightness).
"""

from example_projects.flow_matching.model import FlowMatching

__all__ = ["FlowMatching", "cli_main"]


def cli_main(args: list[str] | None = None, run: bool = True) -> object:
    """Runs the example's LightningCLI (``fit``, ``validate``...); returns the CLI object."""
    from example_projects.flow_matching.__main__ import cli_main as _main

    return _main(args, run)
