"""Immiscible Diffusion (Li et al., NeurIPS 2024) noise assignment for PyTorch Lightning.

The names below are imported on first use (PEP 562), so `from lightning_immiscible import couple`
and `import lightning_immiscible.coupling` load only torch, NumPy and SciPy; Lightning is imported
with the first Lightning adapter (`ImmiscibleCoupling`, `ImmiscibleMixin`, `CoupledBatch`).
Everything else lives in the module that defines it (`lightning_immiscible.distributed`, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API reference; at run time see __getattr__
    from lightning_immiscible.callback import ImmiscibleCoupling
    from lightning_immiscible.coupling import CouplingInputError, CouplingResult, CouplingSpec, couple
    from lightning_immiscible.dataset_coupling import DatasetCouplingLoader
    from lightning_immiscible.map_fit import FitSemidiscreteMap
    from lightning_immiscible.mixin import CoupledBatch, ImmiscibleMixin
    from lightning_immiscible.pools import PooledDataLoader
    from lightning_immiscible.semidiscrete import SemidiscreteMap
    from lightning_immiscible.solvers import available_solvers, register_solver
    from lightning_immiscible.workers import CouplingCollate

__all__ = [
    "CoupledBatch",
    "CouplingCollate",
    "CouplingInputError",
    "CouplingResult",
    "CouplingSpec",
    "DatasetCouplingLoader",
    "FitSemidiscreteMap",
    "ImmiscibleCoupling",
    "ImmiscibleMixin",
    "PooledDataLoader",
    "SemidiscreteMap",
    "available_solvers",
    "couple",
    "register_solver",
]

#: Where `__getattr__` looks for a public name, in this order: the pure modules first, so that a
#: name of theirs never imports Lightning.
_MODULES = (
    "coupling", "solvers", "workers", "pools", "semidiscrete", "dataset_coupling", "mixin", "callback",
    "map_fit",
)  # fmt: skip

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first access (PEP 562)."""
    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(f"lightning_immiscible.{module}"), name, None)
            if value is not None:
                globals()[name] = value  # later lookups skip __getattr__
                return value
    raise AttributeError(f"module 'lightning_immiscible' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
