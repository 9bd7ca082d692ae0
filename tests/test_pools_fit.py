"""PooledDataLoader in Lightning fits: positions, resume, labels, and 2-process DDP (gloo) rebuilds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from scipy.optimize import linear_sum_assignment
from torch.utils.data import TensorDataset

from lightning_immiscible import CouplingCollate, ImmiscibleCoupling, PooledDataLoader
from lightning_immiscible.mixin import hand_off
from tests.helpers import ResumableLoader, ToyDiffusion, trainer


def parity(batch) -> torch.Tensor:
    """The labels of a ToyDiffusion batch for the conditional tests: item id % 2 (picklable)."""
    return batch[1] % 2


class PooledToy(ToyDiffusion):
    """Couples in a PooledDataLoader (pools of `pool_batches` batches of 8); records positions."""

    def __init__(self, num_workers: int = 0, pool_batches: int = 2, labels: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_workers, self.pool_batches, self.labels = num_workers, pool_batches, labels

    def collate(self) -> CouplingCollate:
        condition = parity if self.labels else None
        return CouplingCollate("lsa", seed=5, condition_fn=condition, pool_batches=self.pool_batches)

    def train_dataloader(self):
        return PooledDataLoader(self._dataset(), batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=self.collate())  # fmt: skip

    def immiscible_condition(self, batch):
        return parity(batch) if self.labels else None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        worker, coupled = hand_off(self).worker, self.coupled_batch
        self.records[-1] |= {
            "position": worker.position,
            "expected": (self.global_rank, self.current_epoch, batch_idx),
            "items": batch[1].clone(),
            "skew": coupled.result.prior_skew,
            "steps": self.trainer.num_training_batches,
        }
        return loss


class ResumablePooledLoader(ResumableLoader, PooledDataLoader):
    """Skips the batches the interrupted run trained on (helpers.ResumableLoader), in pools."""


class ResumablePooledToy(PooledToy):
    def train_dataloader(self):
        return ResumablePooledLoader(self._dataset(), batch_size=8, num_workers=self.num_workers,
                                     collate_fn=self.collate())  # fmt: skip


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_uninterrupted_run_uses_every_pooled_batch_at_its_own_position(num_workers):
    # 48 items, batches of 8, pools of 2: 6 steps per epoch, 2 epochs. Each batch's position must be
    # the loop's (rank, epoch, batch_idx), so the callback uses the worker's noise as it is, with no
    # re-coupling warning. Catches a worker counting batches instead of pools (positions off by the
    # pool size), an epoch that does not reach the workers, and a len() that counts pools.
    module = PooledToy(num_workers, sizes=(48,))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*coupling it again.*")
        trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_epochs=2).fit(module)
    assert len(module.records) == 12
    for rec in module.records:
        assert rec["position"] == rec["expected"] and rec["steps"] == 6 and rec["x0"].shape[0] == 8
    epoch0 = torch.cat([r["items"] for r in module.records[:6]])
    assert epoch0.tolist() == list(range(48))  # the plain loader's order, item for item


def test_a_resume_in_the_middle_of_a_pool_continues_the_pooled_stream(tmp_path):
    # Interrupted after step 3 (inside the second pool), resumed to 12 steps: every later batch's
    # noise equals the uninterrupted run's, the pool's coupling included. Catches a resume whose
    # positions restart (the first batches' noise again) and a batch re-coupled alone after a resume.
    first = ResumablePooledToy(0, sizes=(48,))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(callbacks=[ImmiscibleCoupling(seed=1), ckpt], max_steps=3, enable_checkpointing=True).fit(first)
    resumed = ResumablePooledToy(0, sizes=(48,))
    path = next(tmp_path.glob("*step=3*.ckpt"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*coupling it again.*")
        trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=12).fit(resumed, ckpt_path=path)
    uninterrupted = PooledToy(0, sizes=(48,))
    trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=12).fit(uninterrupted)
    interrupted = first.records + resumed.records
    assert len(interrupted) == len(uninterrupted.records) == 12
    for a, b in zip(interrupted, uninterrupted.records, strict=True):
        assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["noise"], b["noise"])


def test_a_conditional_fit_logs_one_prior_skew_per_pool():
    # Labels through the collate and the module: the skew is the pool's, on its first batch only.
    # Catches a skew repeated on every batch of the pool (too small a standard error when averaged).
    module = PooledToy(0, labels=True, sizes=(32,))
    trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=4).fit(module)
    skews = [r["skew"] for r in module.records]
    assert skews[0] is not None and skews[2] is not None and skews[1] is None and skews[3] is None


class Dump(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.records, self.out / f"rank{trainer.global_rank}.pt")


class BuiltOutside(PooledToy):
    """The loader is passed to fit(): Lightning rebuilds it from its attributes, not its arguments."""

    def train_dataloader(self):
        raise AssertionError("not called: fit(train_dataloaders=...) gives the loader")


def _pool_oracle(x0s: list[torch.Tensor], rank: int, epoch: int, first: int) -> list[torch.Tensor]:
    """The pooled noise from the documented stream and SciPy's assignment (l2), written out."""
    draws = []
    for j, x0 in enumerate(x0s):
        words = np.random.SeedSequence([5, 2, rank, epoch, first + j]).generate_state(2)
        gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
        draws.append(torch.randn(x0.shape, generator=gen))
    x, n = torch.cat(x0s).double(), torch.cat(draws)
    cost = torch.cdist(x.reshape(len(x), -1), n.double().reshape(len(n), -1)).numpy()
    rows, cols = linear_sum_assignment(cost)
    return list(n[torch.from_numpy(cols[np.argsort(rows)])].split([len(x0) for x0 in x0s]))


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("built", ["in_hook", "outside"])
def test_ddp_ranks_get_disjoint_pools_of_batch_size_items_with_their_own_noise(tmp_path, built):
    # 2 gloo ranks, one dataset of 64 items, Lightning's DistributedSampler: each rank trains on 32
    # items as 4 steps of 8 (pools of 2 batches), the ranks' items are disjoint, their noise differs
    # and equals the oracle's pooled coupling for (rank, epoch, position). Both ways Lightning rebuilds
    # the loader (from the hook's arguments, and from the attributes of a loader given to fit()) must
    # keep the training batch size. Catches pools of k*k*B items, batches of k*B, len() in pools,
    # ranks drawing the same noise or the same items.
    module = (PooledToy if built == "in_hook" else BuiltOutside)(0, sizes=(64,), same_data=True)
    t = trainer(callbacks=[ImmiscibleCoupling(seed=1, scope="local"), Dump(tmp_path)], devices=2,
                strategy="ddp_fork", max_epochs=1)  # fmt: skip
    if built == "in_hook":
        t.fit(module)
    else:
        data = TensorDataset(torch.rand(64, 12) * 2 - 1, torch.arange(64))
        t.fit(module, train_dataloaders=PooledDataLoader(data, batch_size=8, collate_fn=module.collate()))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, records in enumerate(ranks):
        assert [rec["x0"].shape[0] for rec in records] == [8, 8, 8, 8]
        assert all(rec["steps"] == 4 and rec["position"] == rec["expected"] for rec in records)
        for q in range(2):
            pool = records[2 * q : 2 * q + 2]
            want = _pool_oracle([rec["x0"] for rec in pool], r, 0, 2 * q)
            for rec, noise in zip(pool, want, strict=True):
                torch.testing.assert_close(rec["noise"], noise, rtol=0, atol=0)
    items = [torch.cat([rec["items"] for rec in records]).tolist() for records in ranks]
    assert not set(items[0]) & set(items[1]) and sorted(items[0] + items[1]) == list(range(64))
    assert not torch.equal(ranks[0][0]["noise"], ranks[1][0]["noise"])
