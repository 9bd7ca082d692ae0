"""Tiny modules and data shared by the callback and DDP tests (module level: picklable)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_immiscible import ImmiscibleMixin

DIM = 12


def results_of_ranks(procs: list, queue, timeout: float = 120) -> dict[int, tuple[str, object]]:
    """Starts forked rank processes and collects one `(rank, status, payload)` from each.

    Args:
        procs: Unstarted `multiprocessing.Process`es, one per rank, each putting one tuple on `queue`.
        queue: Their shared queue.
        timeout: Seconds to wait for each result (a hung rank fails the test, not the suite).

    Returns:
        `{rank: (status, payload)}`; the processes are joined, or killed when they do not end.
    """
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=timeout)
            results[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


class ToyDiffusion(ImmiscibleMixin, L.LightningModule):
    """A tiny epsilon-prediction model that records what it saw per training batch."""

    def __init__(
        self,
        batch_format: str = "tuple",
        sizes: tuple[int, ...] = (32,),
        batch_size: int = 8,
        dim: int = DIM,
        same_data: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.net = nn.Linear(dim, dim)
        self.batch_format = batch_format
        self.sizes = sizes
        self.batch_size = batch_size
        self.same_data = same_data  # every rank gets rank 0's data (else each rank its own)
        self.records: list[dict[str, torch.Tensor]] = []
        self.val_noise_was_coupled: list[bool] = []

    def training_step(self, batch, batch_idx):
        x0 = self.immiscible_data(batch)
        noise = self.noise_like(x0)
        x_t = 0.8 * x0 + 0.6 * noise
        self.records.append({"x0": x0.detach().clone(), "noise": noise.detach().clone()})
        return nn.functional.mse_loss(self.net(x_t), noise)

    def validation_step(self, batch, batch_idx):
        x0 = self.immiscible_data(batch)
        self.val_noise_was_coupled.append(self.coupled_batch is not None)
        return nn.functional.mse_loss(self.net(x0 + self.noise_like(x0)), x0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _dataset(self) -> Dataset:
        rank = self.global_rank if self._trainer is not None else 0
        n = self.sizes[rank % len(self.sizes)]
        gen = torch.Generator().manual_seed(100 + (0 if self.same_data else rank))
        data = torch.rand(n, self.dim, generator=gen) * 2 - 1
        labels = torch.arange(n)
        if self.batch_format == "dict":
            return DictDataset(data, labels)
        return TensorDataset(data, labels)

    def train_dataloader(self):
        collate = _as_list if self.batch_format == "list" else None
        return DataLoader(self._dataset(), batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self._dataset(), batch_size=self.batch_size)


class DictDataset(Dataset):
    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"label": self.labels[i], "image": self.data[i]}


def _as_list(items):
    data = torch.stack([d for d, _ in items])
    return [torch.stack([lab for _, lab in items]), data]


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch (it has `state_dict` / `load_state_dict`).

    It skips the batches of the epoch that the interrupted run already trained on, so a resumed
    run sees the same data per step as an uninterrupted one (a plain DataLoader replays the epoch).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken, self.skip = 0, 0

    def __iter__(self):
        # The skip applies to the iterator created now (Lightning may create one it never reads).
        skip, self.skip, self.taken = self.skip, 0, 0
        return self._batches(super().__iter__(), skip)

    def _batches(self, batches, skip: int):
        for i, batch in enumerate(batches):
            if i >= skip:
                self.taken = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A finished epoch is not skipped again (like torchdata's StatefulDataLoader): Lightning
        # may restore the state after the epoch ended and only iterate in the next one.
        self.skip = state["taken"] if state["taken"] < len(self) else 0
