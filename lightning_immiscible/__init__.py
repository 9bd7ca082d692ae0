"""Immiscible Diffusion (Li et al., NeurIPS 2024) noise assignment for PyTorch Lightning."""

from lightning_immiscible.callback import ImmiscibleCoupling
from lightning_immiscible.coupling import (
    CouplingInputError,
    CouplingResult,
    check_inputs,
    cost_matrix,
    couple,
    paired_distance,
)
from lightning_immiscible.mixin import ImmiscibleMixin, find_data_tensor
from lightning_immiscible.solvers import available_solvers, register_solver

__all__ = [
    "CouplingInputError",
    "CouplingResult",
    "ImmiscibleCoupling",
    "ImmiscibleMixin",
    "available_solvers",
    "check_inputs",
    "cost_matrix",
    "couple",
    "find_data_tensor",
    "paired_distance",
    "register_solver",
]

__version__ = "0.1.0"
