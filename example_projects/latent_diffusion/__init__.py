"""Latent diffusion example: a stage-1 autoencoder and a stage-2 (class-conditional) latent DDPM.

The coupling acts on latents: ``LatentDiffusion.immiscible_data`` encodes the batch once.
"""

from example_projects.latent_diffusion.autoencoder import LatentAutoencoder
from example_projects.latent_diffusion.codecs import DiffusersCodec, OwnCodec, load_codec
from example_projects.latent_diffusion.grids import ClassGrid
from example_projects.latent_diffusion.model import LatentDiffusion, guided_eps

__all__ = [
    "ClassGrid",
    "DiffusersCodec",
    "LatentAutoencoder",
    "LatentDiffusion",
    "OwnCodec",
    "cli_main",
    "guided_eps",
    "load_codec",
]


def cli_main(args: list[str] | None = None, run: bool = True) -> object:
    """Runs the example's LightningCLI (``fit``, ``validate``...); returns the CLI object."""
    from example_projects.latent_diffusion.__main__ import cli_main as _main

    return _main(args, run)
