"""A small, configurable DDPM-style UNet (Ho et al. 2020, App. B) with time and class embeddings.

The defaults are tiny (CPU quickstart); the DDPM/DDIM CIFAR-10 network is
``UNet(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
dropout=0.1)`` (35.7 M parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        t: ``(B,)`` timesteps.
        dim: Embedding width (even).
        max_period: Longest period of the sinusoids.

    Returns:
        ``(B, dim)`` float embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels // 4) if channels >= 8 else 1, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block conditioned on an embedding ``(B, emb_dim)``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``(B, in_ch, H, W)`` -> ``(B, out_ch, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Predicts ``epsilon`` (or any image-shaped target) from ``(x_t, t[, y])``.

    Args:
        in_channels: Image channels (1 for MNIST, 3 for CIFAR-10).
        base_channels: Width of the first level.
        channel_mult: Width multiplier per resolution level (one downsampling between levels).
        num_res_blocks: Residual blocks per level.
        attn_resolutions: Feature-map sizes (e.g. ``(16,)``) that get self-attention.
        dropout: Dropout inside residual blocks.
        image_size: Input height = width; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        num_classes: If set, adds a learned class embedding; ``y == num_classes`` means "no class"
            (for classifier-free guidance).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        image_size: int = 32,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image_size={image_size} is not divisible by 2**{len(channel_mult) - 1}.")
        self.base_channels, emb_dim = base_channels, 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        attn = tuple(attn_resolutions)
        self.down, chans, ch = self._build_down(
            base_channels, channel_mult, num_res_blocks, attn, dropout, image_size
        )
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch), ResBlock(ch, ch, emb_dim, dropout)]
        )
        low_res = image_size // 2 ** (len(channel_mult) - 1)
        self.up, ch = self._build_up(
            base_channels, channel_mult, num_res_blocks, attn, dropout, low_res, chans, ch
        )
        self.head = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _build_down(
        self, base: int, mults: Sequence[int], blocks: int, attn: tuple[int, ...], dropout: float, res: int
    ) -> tuple[nn.ModuleList, list[int], int]:
        down, chans, ch, emb_dim = nn.ModuleList(), [base], base, 4 * base
        for level, mult in enumerate(mults):
            for _ in range(blocks):
                down.append(self._block(ch, base * mult, emb_dim, dropout, res in attn))
                ch = base * mult
                chans.append(ch)
            if level < len(mults) - 1:
                down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                chans.append(ch)
                res //= 2
        return down, chans, ch

    def _build_up(
        self,
        base: int,
        mults: Sequence[int],
        blocks: int,
        attn: tuple[int, ...],
        dropout: float,
        res: int,
        chans: list[int],
        ch: int,
    ) -> tuple[nn.ModuleList, int]:
        up, emb_dim = nn.ModuleList(), 4 * base
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                up.append(self._block(ch + chans.pop(), base * mult, emb_dim, dropout, res in attn))
                ch = base * mult
            if level > 0:
                upsample = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                )
                up.append(upsample)
                res *= 2
        return up, ch

    @staticmethod
    def _block(in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool) -> nn.ModuleList:
        layers: list[nn.Module] = [ResBlock(in_ch, out_ch, emb_dim, dropout)]
        if attn:
            layers.append(AttnBlock(out_ch))
        return nn.ModuleList(layers)

    def _embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.class_emb.num_embeddings - 1, dtype=torch.long)
            emb = emb + self.class_emb(y)
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Runs the network.

        Args:
            x: ``(B, C, H, W)`` noisy input.
            t: ``(B,)`` timesteps (integer or float).
            y: ``(B,)`` class labels (only with ``num_classes``), or ``None``.

        Returns:
            ``(B, C, H, W)`` prediction.
        """
        emb = self._embed(t, y)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run_layer(layer, h, emb)
        return self.head(h)

    @staticmethod
    def _run_layer(layer: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if not isinstance(layer, nn.ModuleList):
            return layer(h)
        for sub in layer:
            h = sub(h, emb) if isinstance(sub, ResBlock) else sub(h)
        return h
