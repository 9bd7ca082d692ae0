"""FID per sampler and step count for flow matching, on the shared ``FIDCallback``.

Logs ``val/fid{feature}_n{num_samples}_{sampler}{steps}``, e.g. ``val/fid64_n256_euler1``,
``..._euler2``, ``..._euler8``, ``..._heun8``: the coupling's claimed benefit is in few-step
sampling, so every configured (sampler, steps) pair gets its own curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import nn
from typing_extensions import override

from example_projects.common.fid import FIDCallback
from example_projects.flow_matching.samplers import parse_sampler_spec


class FlowMatchingFID(FIDCallback):
    """The shared ``FIDCallback``, run once per sampler with that sampler's step counts.

    For each sampler it sets the callback's ``sampler_tag`` (the name in the metric keys) and
    ``sampling_steps``, selects the sampler on the module (``pl_module.using_sampler``) and runs
    the shared evaluation. ``timing/fid_eval_s`` is then the mean over samplers.

    Args:
        samplers: ``{sampler}{steps}`` specs, e.g. ``["euler1", "euler2", "euler8", "heun8"]``.
        feature: Inception layer: 64, 192, 768 or 2048.
        num_samples: Generated samples per evaluation and spec.
        num_real: Real images for the statistics (``None``: ``num_samples``; ``-1``: all).
        weights: ``auto``, ``official``, ``offline`` or a path.
        batch_size: Samples generated / images embedded per batch.
        seed: Seed of the starting noise (the same noise every evaluation and spec).
        cache_real_stats: Cache real statistics on disk.
        extractor: A custom frozen feature extractor (tests).
        copies: Also log the memorisation measures of the same samples (see ``FIDCallback``).

    Examples:
        ```python
        fid = FlowMatchingFID(samplers=["euler1", "euler8", "heun8"], feature=2048, num_samples=50_000)
        trainer = L.Trainer(callbacks=[fid])
        ```
    """

    sampler_tag = "euler"

    def __init__(
        self,
        samplers: Sequence[str] = ("euler1", "euler2", "euler8", "heun8"),
        feature: int = 2048,
        num_samples: int = 1000,
        num_real: int | None = None,
        weights: str = "auto",
        batch_size: int = 256,
        seed: int = 0,
        cache_real_stats: bool = True,
        extractor: nn.Module | None = None,
        copies: bool = False,
    ) -> None:
        if not samplers:
            raise ValueError("samplers must name at least one '{sampler}{steps}' spec, e.g. ['euler1'].")
        self.groups: dict[str, list[int]] = {}
        for spec in samplers:
            name, steps = parse_sampler_spec(spec)
            self.groups.setdefault(name, []).append(steps)
        self.samplers = list(samplers)
        all_steps = [s for steps in self.groups.values() for s in steps]
        super().__init__(
            feature,
            num_samples,
            num_real,
            all_steps,
            weights,
            batch_size,
            seed,
            cache_real_stats,
            extractor,
            copies,
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not callable(getattr(pl_module, "using_sampler", None)):
            raise TypeError(
                "FlowMatchingFID needs `using_sampler(name)` on the LightningModule (see FlowMatching)."
            )

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        for name, steps in self.groups.items():
            self.sampler_tag, self.sampling_steps = name, steps
            with pl_module.using_sampler(name):
                super().on_validation_epoch_end(trainer, pl_module)
