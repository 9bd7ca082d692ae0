"""Shared example toolkit: data modules (embedded, synthetic, bad paths), UNet, EMA, grids."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import pytest
import torch

from example_projects.common import data as data_mod
from example_projects.common.data import DatasetUnavailableError, ImageDataModule, open_dataset
from example_projects.common.ema import EMA
from example_projects.common.grids import save_grid
from example_projects.common.unet import UNet


def test_mnist5k_is_embedded_padded_and_scaled() -> None:
    images, labels = data_mod.mnist5k_tensor(32)
    assert images.shape == (5000, 1, 32, 32) and labels.shape == (5000,)
    assert images.min() == -1.0 and images.max() == 1.0
    assert torch.all(images[:, :, :2] == -1.0)  # the zero padding is black
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_datamodule_batches_are_in_range() -> None:
    dm = ImageDataModule("synthetic", image_size=16, batch_size=8, num_synthetic=32, val_size=8)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (8,)
    assert x.min() >= -1 and x.max() <= 1
    assert len(dm.val_dataloader().dataset) == 8 and dm.channels == 3


def test_missing_folder_names_the_path_and_the_quickstart(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_images"
    with pytest.raises(DatasetUnavailableError, match="no_such_images") as err:
        ImageDataModule("folder", root=str(missing)).setup("fit")
    assert "quickstart.yaml" in str(err.value)


def test_missing_torchvision_root_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"cifar10.*does not exist.*download=true"):
        open_dataset("cifar10", str(tmp_path / "cifar"), 32, 3, download=False)


def test_failed_download_is_one_quick_attempt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs.get("download"))
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="URLError") as err:
        ImageDataModule("cifar10", root=str(tmp_path / "c10"), download=True).prepare_data()
    assert calls == [True] and time.perf_counter() - start < 5
    assert str(tmp_path / "c10") in str(err.value) and "mnist5k" in str(err.value)


def test_file_datasets_need_a_root() -> None:
    with pytest.raises(DatasetUnavailableError, match=r"needs data.root"):
        ImageDataModule("cifar10")
    with pytest.raises(ValueError, match="Unknown dataset"):
        ImageDataModule("imagenet")


def test_image_folder(tmp_path: Path) -> None:
    save_grid(torch.zeros(1, 3, 20, 20), tmp_path / "imgs" / "a" / "one.png", nrow=1)
    save_grid(torch.ones(1, 3, 20, 20), tmp_path / "imgs" / "a" / "two.png", nrow=1)
    dm = ImageDataModule("folder", root=str(tmp_path / "imgs"), image_size=16, batch_size=2)
    dm.setup("fit")
    x, _ = dm.real_images()[0]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("num_classes", [None, 10])
def test_unet_shapes(num_classes: int | None) -> None:
    net = UNet(3, 8, (1, 2), 1, (8,), 0.0, 16, num_classes=num_classes)
    y = torch.tensor([0, 9]) if num_classes else None
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), y)
    assert out.shape == (2, 3, 16, 16)


def test_unet_cifar10_size_is_the_published_one() -> None:
    net = UNet(3, 128, (1, 2, 2, 2), 2, (16,), 0.1, 32)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(35.7e6, rel=0.01)


def test_ema_update_and_state() -> None:
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    before = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * net.weight)
    assert int(ema.num_updates) == 1 and not ema.model.weight.requires_grad
    assert {"model.weight", "model.bias", "num_updates"} <= set(ema.state_dict())
    assert EMA(net, 0.9999, warmup=True).current_decay() == pytest.approx(0.1)


# ----------------------------------------------------------------------------- resumable order


def _passes(loader, epochs, first_epoch: int = 0) -> list[list[int]]:
    """The item indices of each batch, epoch by epoch, as Lightning drives a loader (set_epoch, iter)."""
    out = []
    for epoch in range(first_epoch, first_epoch + epochs):
        loader.sampler.set_epoch(epoch)
        out += [batch[0].tolist() for batch in loader]
    return out


def _items(n: int = 9) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(n))


@pytest.mark.parametrize("stop", [1, 2, 4])
def test_resumable_loader_continues_where_its_state_left_it(stop: int) -> None:
    """A loader rebuilt from another's ``state_dict`` after ``stop`` batches hands out the rest of the
    uninterrupted loader's batches (the oracle: that loader, 2 epochs of 4 batches of 2 items).

    Catches: a position that is not restored (``stop`` 1 and 2 repeat epoch 0's first batches), a finished
    epoch that is not rolled over (``stop`` 4: the pass would be empty, or epoch 0 again), an order that
    depends on the global random state (reseeded between the two loaders below) and a seed lost on the way.
    """
    from example_projects.common.resumable import ResumableLoader, SeededShuffle

    oracle = _passes(ResumableLoader(_items(), seed=7, batch_size=2, drop_last=True), 2)
    first_epoch = [i for batch in oracle[:4] for i in batch]
    assert len(oracle) == 8 and sorted(first_epoch) != first_epoch  # shuffled; 1 item dropped
    assert oracle[:4] != oracle[4:]  # epochs differ
    cut = ResumableLoader(_items(), seed=7, batch_size=2, drop_last=True)
    cut.sampler.set_epoch(0)
    it = iter(cut)
    seen = [next(it)[0].tolist() for _ in range(stop)]
    state = cut.state_dict()
    assert state == {"seed": 7, "epoch": 0, "batches": stop}
    torch.manual_seed(123)  # a new process: another global random state, another default seed
    resumed = ResumableLoader(_items(), seed=99, batch_size=2, drop_last=True)
    resumed.load_state_dict(state)
    # Without Lightning's set_epoch: the restored epoch is what the next pass reads (workers read early).
    rest = [batch[0].tolist() for batch in resumed]
    if stop < 4:
        rest += _passes(resumed, 1, first_epoch=1)
    assert seen + rest == oracle
    assert isinstance(resumed.sampler, SeededShuffle) and resumed.sampler.seed == 7


def test_resumable_loader_with_another_sampler_drops_the_batches_already_read() -> None:
    """With Lightning's ``DistributedSampler`` in its place, a resumed pass skips the saved batches."""
    from torch.utils.data import DistributedSampler

    from example_projects.common.resumable import ResumableLoader

    def loader():
        sampler = DistributedSampler(_items(), num_replicas=1, rank=0, shuffle=True, seed=5)
        return ResumableLoader(_items(), seed=0, sampler=sampler, batch_size=2, drop_last=True)

    oracle = _passes(loader(), 1, first_epoch=3)
    cut = loader()
    cut.sampler.set_epoch(3)
    it = iter(cut)
    seen = [next(it)[0].tolist() for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(cut.state_dict())
    assert seen + [batch[0].tolist() for batch in resumed] == oracle  # catches a pass that starts over


def test_counted_stream_draws_are_a_function_of_seed_rank_and_count() -> None:
    """Draw ``i`` depends on (seed, name, rank, i) only: a restored count continues the stream."""
    from example_projects.common.resumable import CountedStream

    a, b = CountedStream("t", seed=1), CountedStream("t", seed=1)
    first = [torch.rand(3, generator=a.generator()) for _ in range(3)]
    b.load_state_dict({"seed": 1, "draws": 2})
    torch.manual_seed(5)  # the global state plays no part
    assert torch.equal(torch.rand(3, generator=b.generator()), first[2])
    assert not torch.equal(first[0], first[1])  # a stream stuck on one draw fails here
    other_rank = CountedStream("t", seed=1, rank=1)
    assert not torch.equal(torch.rand(3, generator=other_rank.generator()), first[0])
