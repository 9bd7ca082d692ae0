"""A deliberately small network that is not the UNet: the "bring your own network" example.

The configs ``example_projects/<name>/configs/tiny_network.yaml`` put it in place of the shared UNet,
to show (and test) that the network is a config entry: any ``nn.Module`` with the example's call
signature can take its place. It trains in seconds and learns little; use it for smoke runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TinyConvNet(nn.Module):
    """Two convolutions with a per-channel bias from the timestep (and the class label).

    Works for all three examples: ``net(x, t)`` (DDIM: integer ``t``; consistency: float noise
    embeddings) and ``net(z, t, y)`` (latent diffusion, ``y`` a label or ``None``).

    Args:
        in_channels: Channels of the input and of the output.
        width: Hidden channels.
        num_classes: If set, adds a class embedding; label ``num_classes`` means "no class".
    """

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``(B, C, H, W)``, ``(B,)`` timesteps, optional ``(B,)`` labels -> ``(B, C, H, W)``."""
        h = self.inp(x) + self.time(t.float().view(-1, 1) / 1000)[:, :, None, None]
        if self.label is not None and y is not None:
            h = h + self.label(y)[:, :, None, None]
        return self.out(F.silu(h))
