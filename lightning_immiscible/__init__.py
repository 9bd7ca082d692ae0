"""Immiscible Diffusion (Li et al., NeurIPS 2024) noise assignment for PyTorch Lightning.

The names below are imported on first use (PEP 562), so `from lightning_immiscible import couple`
and `import lightning_immiscible.coupling` load only torch, NumPy and SciPy; Lightning is imported
with the first Lightning adapter (`ImmiscibleCoupling`, `ImmiscibleMixin`, `CoupledBatch`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_immiscible.batches import find_data_tensor
    from lightning_immiscible.callback import ImmiscibleCoupling
    from lightning_immiscible.costs import cost_matrix, paired_distance
    from lightning_immiscible.coupling import (
        CouplingInputError,
        CouplingResult,
        CouplingSpec,
        check_inputs,
        couple,
    )
    from lightning_immiscible.mixin import CoupledBatch, ImmiscibleMixin
    from lightning_immiscible.solvers import available_solvers, register_solver

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "CoupledBatch": "mixin",
    "CouplingInputError": "coupling",
    "CouplingResult": "coupling",
    "CouplingSpec": "coupling",
    "ImmiscibleCoupling": "callback",
    "ImmiscibleMixin": "mixin",
    "available_solvers": "solvers",
    "check_inputs": "coupling",
    "cost_matrix": "costs",
    "couple": "coupling",
    "find_data_tensor": "batches",
    "paired_distance": "costs",
    "register_solver": "solvers",
}

__all__ = [
    "CoupledBatch",
    "CouplingInputError",
    "CouplingResult",
    "CouplingSpec",
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


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_immiscible' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_immiscible.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
