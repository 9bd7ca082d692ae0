"""FID and sample grids for one- and multistep consistency sampling, on the shared toolkit.

The shared ``FIDCallback`` tags its metrics with the sampler (``val/fid64_n256_ddim20``); here the
same component logs ``val/fid{feature}_n{num_samples}_cm{steps}`` (``cm1``: one-step, ``cm2``:
two-step).
The grids callback writes one PNG per step count (``grids/cm1/latest.png``, ``grids/cm2/...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from example_projects.common.fid import FIDCallback, fid_metric_name
from example_projects.common.grids import SampleGrid, log_grid, make_grid, save_grid

#: Sampler tag in metric names and grid folders: ``cm{steps}``.
SAMPLER_TAG = "cm"


def cm_fid_metric_name(feature: int, num_samples: int, steps: int, prefix: str = "val") -> str:
    """E.g. ``val/fid2048_n50000_cm1``: layer, sample count and consistency steps in the name."""
    return fid_metric_name(feature, num_samples, steps, prefix, sampler=SAMPLER_TAG)


class ConsistencyFID(FIDCallback):
    """The shared ``FIDCallback`` for consistency models: logs ``val/fid{feature}_n{num}_cm{steps}``.

    Same arguments as ``FIDCallback``; ``sampling_steps`` are network evaluations per sample
    (``[1, 2]``: one- and two-step generation).

    Example::

        fid = ConsistencyFID(feature=2048, num_samples=50_000, sampling_steps=[1, 2])
        trainer = L.Trainer(callbacks=[fid])
    """

    sampler_tag = SAMPLER_TAG

    def __init__(
        self,
        feature: int = 2048,
        num_samples: int = 1000,
        num_real: int | None = None,
        sampling_steps: Sequence[int] = (1, 2),
        weights: str = "auto",
        batch_size: int = 256,
        seed: int = 0,
        cache_real_stats: bool = True,
        extractor: nn.Module | None = None,
    ) -> None:
        super().__init__(
            feature,
            num_samples,
            num_real,
            sampling_steps,
            weights,
            batch_size,
            seed,
            cache_real_stats,
            extractor,
        )


class ConsistencyGrid(SampleGrid):
    """Sample grids for several step counts from the same starting noise.

    Files: ``{dirpath}/cm{steps}/step{global_step:07d}.png`` and ``.../cm{steps}/latest.png``;
    ``latest`` points to the grid of the first step count (one-step by default).

    Args:
        num_images: Samples per grid.
        steps: Step counts, one grid each (``[1, 2]``).
        seed: Seed of the starting noise.
        dirpath: Output directory (``None``: ``{trainer.log_dir}/grids``).
    """

    def __init__(
        self, num_images: int = 64, steps: Sequence[int] = (1, 2), seed: int = 0, dirpath: str | None = None
    ) -> None:
        step_list = [int(s) for s in steps]
        if not step_list:
            raise ValueError("steps must name at least one step count, e.g. [1, 2].")
        super().__init__(num_images, min(step_list), seed, dirpath)
        self.step_list = step_list

    @override
    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: Any) -> None:
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_images, *pl_module.sample_shape()), generator=g).to(pl_module.device)
        latest: Path | None = None
        for steps in self.step_list:
            images = pl_module.sample(noise, steps)
            out = self.output_dir(trainer) / f"{SAMPLER_TAG}{steps}"
            save_grid(images, out / f"step{trainer.global_step:07d}.png")
            path = save_grid(images, out / "latest.png")
            latest = latest or path
            for logger in trainer.loggers:
                log_grid(logger, f"samples/{SAMPLER_TAG}{steps}", make_grid(images), trainer.global_step)
        self.latest = latest
