"""Stage 2's data with the coupling in the DataLoader workers: images encoded there, pools coupled there.

`CouplingCollate` couples the tensor it collates, so for latent diffusion the workers must hold the
latents: [EncodeCollate][example_projects.latent_diffusion.worker_data.EncodeCollate] collates the
`(image, label)` items and encodes the images with a CPU copy of the model's frozen codec, and
`CouplingCollate(pool_batches=k)` couples `k` training batches' latents in one assignment, within
each class for a class-conditional model (`configs/pooled_workers.yaml`). The training process then
gets `[latents, labels]` batches with their coupled noise and pays nothing for the coupling.
"""

from __future__ import annotations

import copy
from operator import itemgetter
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from example_projects.common.data import ImageDataModule
from lightning_immiscible import CouplingCollate, PooledDataLoader


class EncodeCollate:
    """Collates `(image, label)` items and encodes the images: `[latents (B, c, h, w), labels (B,)]`.

    Args:
        codec: A frozen codec (`encode(images) -> latents`), used on the CPU of the worker.
    """

    def __init__(self, codec: nn.Module) -> None:
        self.codec = codec

    def __call__(self, items: list[Any]) -> list[Tensor]:
        """`[latents, labels]` of the items."""
        images, labels = default_collate(items)
        return [self.codec.encode(images), labels]


class LatentDataModule(ImageDataModule):
    """[ImageDataModule][example_projects.common.data.ImageDataModule], optionally coupled in workers.

    Args:
        pool_batches: `0` (the default): image batches, which the callback couples on the training
            process. `k >= 1`: latent batches encoded and coupled in the DataLoader workers, `k`
            training batches per assignment (a `PooledDataLoader`; needs
            `model.init_args.encoded_batches: true`). Shuffled with PyTorch's `RandomSampler`
            (`seeded_order` does not apply), last incomplete batch dropped, workers started anew
            each epoch.
        worker_method: The workers' coupling method (`none`: the baseline, same path).
        **kwargs: `ImageDataModule`'s arguments (`batch_size`, `num_workers`, ...).
    """

    def __init__(
        self, pool_batches: int = 0, worker_method: Literal["lsa", "none"] = "lsa", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if pool_batches < 0:
            raise ValueError(f"data.pool_batches must be >= 0 (0: no worker coupling), got {pool_batches}.")
        self.pool_batches, self.worker_method = pool_batches, worker_method

    def train_dataloader(self) -> DataLoader:
        """Image batches, or with `pool_batches` latent batches coupled in pools in the workers."""
        if not self.pool_batches:
            return super().train_dataloader()
        self.setup()
        module = self.trainer.lightning_module
        if not module.hparams.get("encoded_batches"):
            raise ValueError(
                "data.pool_batches encodes the images in the DataLoader workers: set "
                "model.init_args.encoded_batches: true so that the model does not encode them again."
            )
        encode = EncodeCollate(copy.deepcopy(module.codec).cpu())
        condition = itemgetter(1) if module.hparams.get("num_classes") else None
        collate = CouplingCollate(self.worker_method, collate_fn=encode, condition_fn=condition,
                                  pool_batches=self.pool_batches)  # fmt: skip
        return PooledDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                num_workers=self.num_workers, collate_fn=collate)  # fmt: skip
