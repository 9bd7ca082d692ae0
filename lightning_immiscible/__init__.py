"""Immiscible Diffusion (Li et al., NeurIPS 2024) noise assignment for PyTorch Lightning."""

from lightning_immiscible.coupling import (
    CouplingInputError,
    CouplingResult,
    check_inputs,
    cost_matrix,
    couple,
    paired_distance,
)
from lightning_immiscible.solvers import available_solvers, register_solver

__all__ = [
    "CouplingInputError",
    "CouplingResult",
    "available_solvers",
    "check_inputs",
    "cost_matrix",
    "couple",
    "paired_distance",
    "register_solver",
]

__version__ = "0.1.0"
