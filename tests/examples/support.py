"""Shared by the example tests: another small network (the "bring your own network" case) and CSV metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn


class TinyNet(nn.Module):
    """A network that is not the shared UNet: two convolutions with a timestep (and class) bias.

    ``net(x, t[, y])``: ``(B, C, H, W)``, ``(B,)`` integer or float timesteps, optional ``(B,)``
    labels (``num_classes`` means "no class") -> ``(B, C, H, W)``; any ``H, W``.
    """

    def __init__(self, in_channels: int = 1, width: int = 8, num_classes: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        h = self.inp(x) + self.time(t.float().view(-1, 1) / 1000)[:, :, None, None]
        if self.label is not None and y is not None:
            h = h + self.label(y)[:, :, None, None]
        return self.out(F.silu(h))


def logged_values(metrics_csv: Path, key: str) -> list[float]:
    """Every value of ``key`` in a ``CSVLogger``'s ``metrics.csv``, as floats (empty cells skipped).

    Reading them as floats matters: the CSV holds strings, and the string ``"0.0"`` is truthy.
    """
    with Path(metrics_csv).open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key, "") != ""]
