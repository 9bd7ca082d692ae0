"""Pools larger than a batch (issue 33): the loader's batches, the pool's noise, one assignment, labels."""

from __future__ import annotations

import pickle
from operator import itemgetter

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, TensorDataset, default_collate

from lightning_immiscible import CouplingCollate, CouplingSpec, PooledDataLoader
from lightning_immiscible.pools import PoolBatchSampler
from lightning_immiscible.workers import (
    BATCH_KEY,
    INDEX_KEY,
    NOISE_KEY,
    POSITION_KEY,
    SKEW_KEY,
    STATS_KEY,
    find_collates,
    split_coupled_batch,
)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.cumsum(torch.randn(n, 2, 4, 4, generator=gen), dim=-1) / 3
    return (smooth + 0.5 * torch.rand(n, 1, 1, 1, generator=gen) - 0.25).clamp(-1, 1)


def _dataset(n: int, classes: int = 3) -> TensorDataset:
    return TensorDataset(_images(n), torch.arange(n) % classes)


def _drawn(shape: tuple[int, ...], seed: int, rank: int, epoch: int, index: int) -> torch.Tensor:
    """The worker stream written out from its documented derivation: SeedSequence([seed, 2, words])."""
    words = np.random.SeedSequence([seed, 2, rank, epoch, index]).generate_state(2)
    gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen)


def _cost(x: torch.Tensor, n: torch.Tensor) -> np.ndarray:
    """Squared Euclidean costs in float64 NumPy (independent of the library's cost code)."""
    diff = x.double().reshape(len(x), 1, -1) - n.double().reshape(1, len(n), -1)
    return diff.square().sum(-1).numpy()


def _pooled(n: int, k: int, workers: int = 0, **collate_kwargs) -> list[dict]:
    collate = CouplingCollate("lsa", metric="sqeuclidean", seed=4, pool_batches=k, **collate_kwargs)
    loader = PooledDataLoader(_dataset(n), batch_size=8, num_workers=workers, collate_fn=collate)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("condition", [False, True], ids=["unconditional", "labels"])
def test_pool_batches_one_is_the_unpooled_collate_exactly(workers, condition):
    # A PooledDataLoader with pool_batches=1 and a plain DataLoader with the same collate settings give
    # equal batches, key by key, and both equal the documented oracle (spec.couple of the drawn noise
    # at each position). Catches a pool path that changes today's output: other positions, stats
    # recomputed per batch, the skew or the index moved.
    ds = _dataset(44)
    kwargs = {"seed": 3, "condition_fn": itemgetter(1) if condition else None}
    gen = torch.Generator().manual_seed(9)
    plain = list(DataLoader(ds, batch_size=8, shuffle=True, generator=gen, num_workers=workers,
                            collate_fn=CouplingCollate("lsa", **kwargs)))  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    pooled = list(PooledDataLoader(ds, batch_size=8, shuffle=True, generator=gen, num_workers=workers,
                                   collate_fn=CouplingCollate("lsa", pool_batches=1, **kwargs)))  # fmt: skip
    assert len(plain) == len(pooled) == 6
    spec = CouplingSpec("lsa")
    for i, (a, b) in enumerate(zip(plain, pooled, strict=True)):
        assert list(a) == list(b)  # the same keys in the same order
        for key in a:
            if key == STATS_KEY:  # the assignment time differs from run to run
                assert torch.equal(a[key][:2], b[key][:2])
            elif key == BATCH_KEY:  # the inner batch: [images, labels]
                assert all(torch.equal(u, v) for u, v in zip(a[key], b[key], strict=True))
            else:
                assert torch.equal(a[key], b[key]), key
        x0, labels = a["batch"]
        want = spec.couple(x0, _drawn(tuple(x0.shape), 3, 0, 0, i), labels if condition else None)
        assert torch.equal(a[NOISE_KEY], want.noise) and a[POSITION_KEY].tolist() == [0, 0, i]
        assert a[STATS_KEY][:2].tolist() == [want.cost_before, want.cost_after]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_pooled_loader_yields_the_plain_loaders_batches_in_order(drop_last, workers):
    # 101 items, batches of 8, pools of 3 batches: 12 or 13 training batches, the last pool shorter.
    # The inner batches must be the plain DataLoader's (same shuffle generator), item for item, and
    # len() must count training batches. Catches a pool cut at the wrong place, an item dropped or
    # repeated, a collated pool sliced instead of collated per batch, len() counting pools.
    ds = _dataset(101)
    plain = DataLoader(ds, batch_size=8, shuffle=True, drop_last=drop_last,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    collate = CouplingCollate("lsa", seed=2, pool_batches=3)
    pooled = PooledDataLoader(ds, batch_size=8, shuffle=True, drop_last=drop_last, num_workers=workers,
                              generator=torch.Generator().manual_seed(1), collate_fn=collate)  # fmt: skip
    want = list(plain)
    got = [split_coupled_batch(b)[0] for b in pooled]
    assert len(pooled) == len(plain) == len(want) == len(got) == (12 if drop_last else 13)
    for (x, y), (gx, gy) in zip(want, got, strict=True):
        assert torch.equal(x, gx) and torch.equal(y, gy)
    assert pooled.batch_sampler.batch_size == 8 and len(pooled.batch_sampler) == (4 if drop_last else 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_pool_noise_is_the_concatenated_draws_of_its_batch_positions(workers):
    # Pools of 3 batches: batch j of pool q is at position q*3 + j, and its coupled noise is a
    # selection of the pool's noise = the concatenation of the documented draws at those positions;
    # over the pool the indices are a permutation (each drawn vector used once: still i.i.d.).
    # Catches one draw for the whole pool (at position q: it would repeat other batches' noise),
    # positions counted per pool or per worker, an index into the batch instead of the pool.
    batches = _pooled(48, k=3, workers=workers)
    assert [b[POSITION_KEY].tolist() for b in batches] == [[0, 0, i] for i in range(6)]
    for q in range(2):
        pool = batches[3 * q : 3 * q + 3]
        shapes = [tuple(b["batch"][0].shape) for b in pool]
        draws = torch.cat([_drawn(shape, 4, 0, 0, 3 * q + j) for j, shape in enumerate(shapes)])
        index = torch.cat([b[INDEX_KEY] for b in pool])
        assert sorted(index.tolist()) == list(range(24))
        for b in pool:
            assert torch.equal(b[NOISE_KEY], draws[b[INDEX_KEY]])
        moved = [(b[INDEX_KEY] // 8 != j).any() for j, b in enumerate(pool)]
        assert any(moved)  # noise crossed batch borders: the assignment spanned the pool


def test_one_assignment_over_the_pool_is_optimal_and_beats_batch_by_batch():
    # The pool's total cost equals SciPy's optimum on the pool's NumPy cost matrix, and is lower
    # than coupling each batch alone (SciPy again). Catches batches coupled one by one (the
    # "pool" then costs the per-batch sum) and a split that mixes batches up.
    collate = CouplingCollate("lsa", metric="sqeuclidean", seed=0, pool_batches=4)
    x0s = list(_images(32, seed=5).split(8))
    noises = [_drawn((8, 2, 4, 4), 0, 0, 0, j) for j in range(4)]
    results = collate.couple_pool(x0s, noises)
    total = sum(float(((x - r.noise).double() ** 2).sum()) for x, r in zip(x0s, results, strict=True))
    cost = _cost(torch.cat(x0s), torch.cat(noises))
    rows, cols = linear_sum_assignment(cost)
    assert total == pytest.approx(float(cost[rows, cols].sum()), rel=1e-6)
    alone = 0.0
    for x, n in zip(x0s, noises, strict=True):
        c = _cost(x, n)
        alone += float(c[linear_sum_assignment(c)].sum())
    assert total < alone - 1e-6
    # "cat, spec.couple, split": what the experiment runner reproduces.
    whole = collate.spec.couple(torch.cat(x0s), torch.cat(noises))
    assert all(torch.equal(a.noise, b) for a, b in zip(results, whole.noise.split(8), strict=True))


def test_each_batch_carries_its_own_distances_and_a_share_of_the_pools_time():
    # Per batch: before = mean distance to its own drawn noise, after = to its coupled noise (NumPy);
    # assign_ms = the pool's time / batches, equal on every batch. Catches the pool's means copied
    # to every batch (wrong per-batch reduction) and the pool's time logged k times.
    collate = CouplingCollate("lsa", metric="sqeuclidean", seed=0, pool_batches=3)
    x0s = list(_images(24, seed=2).split(8))
    noises = [_drawn((8, 2, 4, 4), 0, 0, 0, j) for j in range(3)]
    results = collate.couple_pool(x0s, noises)
    for x, n, r in zip(x0s, noises, results, strict=True):
        assert r.cost_before == pytest.approx(float(np.diag(_cost(x, n)).mean()), rel=1e-5)
        assert r.cost_after == pytest.approx(float(np.diag(_cost(x, r.noise)).mean()), rel=1e-5)
    assert len({r.assign_ms for r in results}) == 1 and results[0].assign_ms > 0


def test_labels_couple_within_the_pools_blocks_and_noise_crosses_batches():
    # Two batches of one label each (batch 0: label 1, batch 1: label 0), one pool: the blocks are
    # the pool's, so label 0 (batch 1) gets pool positions 0-7, batch 0's draw, and label 1 gets
    # batch 1's draw. Catches blocks built per batch (the noise would stay in its batch).
    collate = CouplingCollate("lsa", seed=0, pool_batches=2)
    x0s = list(_images(16, seed=3).split(8))
    noises = [_drawn((8, 2, 4, 4), 0, 0, 0, j) for j in range(2)]
    labels = [torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)]
    first, second = collate.couple_pool(x0s, noises, labels)
    assert first.index.min() >= 8 and second.index.max() < 8
    assert torch.equal(first.noise, noises[1][first.index - 8])
    assert first.prior_skew is not None and second.prior_skew is None  # one skew draw per pool


def test_every_item_gets_noise_from_its_own_labels_block_of_the_pool():
    # Random labels over a pool of 4 batches: each item's index lies in its label's block of the
    # pool (labels ascending, blocks as large as the pool's counts), and each block's assignment is
    # SciPy's optimum. Catches blocks sized by one batch's counts and cross-label coupling.
    collate = CouplingCollate("lsa", metric="sqeuclidean", seed=0, pool_batches=4)
    gen = torch.Generator().manual_seed(0)
    x0s = list(_images(32, seed=4).split(8))
    noises = [_drawn((8, 2, 4, 4), 0, 0, 0, j) for j in range(4)]
    labels = [torch.randint(0, 5, (8,), generator=gen) for _ in range(4)]
    index = torch.cat([r.index for r in collate.couple_pool(x0s, noises, labels)])
    pool_labels, x, n = torch.cat(labels), torch.cat(x0s), torch.cat(noises)
    start = 0
    for c in sorted(set(pool_labels.tolist())):
        rows = np.flatnonzero(pool_labels.numpy() == c)
        block = np.arange(start, start + len(rows))
        start += len(rows)
        assert set(index[rows].tolist()) == set(block.tolist())
        cost = _cost(x[rows], n[block])
        best = float(cost[linear_sum_assignment(cost)].sum())
        got = float(_cost(x[rows], n[index[rows]]).diagonal().sum())
        assert got == pytest.approx(best, rel=1e-6)


def test_the_pools_skew_rides_on_its_first_batch_only():
    # Catches the pool's skew repeated on all k batches (its logged mean would get k times too small
    # a standard error) or dropped.
    batches = _pooled(32, k=2, condition_fn=itemgetter(1))
    skews = [float(b[SKEW_KEY][0]) for b in batches]
    assert all(np.isfinite(skews[0::2])) and all(np.isnan(skews[1::2]))


def test_a_pooled_collate_in_a_plain_dataloader_is_refused():
    # Catches the silent fallback of coupling batch by batch (no pooling at all).
    loader = DataLoader(_dataset(16), batch_size=8, collate_fn=CouplingCollate(pool_batches=2))
    with pytest.raises(RuntimeError, match="PooledDataLoader"):
        next(iter(loader))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_pool_batches_is_checked_and_named(bad):
    with pytest.raises(ValueError, match="pool_batches"):
        CouplingCollate(pool_batches=bad)
    with pytest.raises(ValueError, match="pool_batches"):
        PoolBatchSampler(SequentialSampler(range(4)), 2, False, bad)


def test_the_loader_checks_its_collate_dataset_and_batch_sampler():
    ds = _dataset(16)
    with pytest.raises(TypeError, match="CouplingCollate"):
        PooledDataLoader(ds, batch_size=8, collate_fn=default_collate)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(TypeError, match="map-style"):
        PooledDataLoader(Stream(), batch_size=2, collate_fn=CouplingCollate())
    with pytest.raises(TypeError, match="PoolBatchSampler"):
        PooledDataLoader(ds, batch_sampler=[[0, 1]], collate_fn=CouplingCollate())


def test_a_loader_rebuilt_from_its_attributes_keeps_the_pools_and_the_batch_size():
    # What Lightning does to a loader built outside its hooks: a PoolBatchSampler(sampler,
    # batch_size=, drop_last=) (pool_batches left out) and the loader's own collate_fn attribute.
    # Catches pools of k*k*B items or a lost pool size.
    collate = CouplingCollate("lsa", seed=1, pool_batches=2)
    first = PooledDataLoader(_dataset(40), batch_size=8, collate_fn=collate)
    sampler = PoolBatchSampler(SequentialSampler(range(20)), batch_size=8, drop_last=False)
    again = PooledDataLoader(_dataset(40), batch_sampler=sampler, collate_fn=first.collate_fn)
    assert again.batch_sampler.pool_batches == 2 and again.batch_sampler.batch_size == 8
    sizes = [len(split_coupled_batch(b)[1]) for b in again]
    assert sizes == [8, 8, 4] and len(again) == 3
    assert find_collates(again) == find_collates([first]) == [collate]  # set_epoch reaches it


def test_the_loaders_collate_is_picklable_for_spawned_workers():
    loader = PooledDataLoader(_dataset(16), batch_size=4, collate_fn=CouplingCollate(seed=1, pool_batches=2))
    copy = pickle.loads(pickle.dumps(loader.collate_fn))
    assert copy.batch_size == 4 and copy.collate.pool_batches == 2
