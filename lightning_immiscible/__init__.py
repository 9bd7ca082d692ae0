"""Immiscible Diffusion (Li et al., NeurIPS 2024) noise assignment for PyTorch Lightning.

The names below are imported on first use (PEP 562), so `from lightning_immiscible import couple`
and `import lightning_immiscible.coupling` load only torch, NumPy and SciPy; Lightning is imported
with the first Lightning adapter (`ImmiscibleCoupling`, `ImmiscibleMixin`, `CoupledBatch`).
Everything else lives in the module that defines it (`lightning_immiscible.distributed`, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

#: The public names, each with the module that defines it (`__all__` is its keys).
_EXPORTS: dict[str, str] = {
    "ImmiscibleCoupling": "callback",
    "ImmiscibleMixin": "mixin",
    "CoupledBatch": "mixin",
    "CouplingCollate": "workers",
    "couple": "coupling",
    "CouplingSpec": "coupling",
    "CouplingResult": "coupling",
    "CouplingInputError": "coupling",
    "available_solvers": "solvers",
    "register_solver": "solvers",
}

__all__ = list(_EXPORTS)

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
