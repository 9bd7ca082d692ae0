"""Coupling in DataLoader workers: batch format, per-worker RNG, same pairing distribution."""

from __future__ import annotations

import pickle
import statistics
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_immiscible import couple
from lightning_immiscible.workers import (
    BATCH_KEY,
    INDEX_KEY,
    NOISE_KEY,
    POSITION_KEY,
    STATS_KEY,
    CouplingCollate,
    split_coupled_batch,
)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.cumsum(torch.randn(n, 3, 8, 8, generator=gen), dim=-1) / 3
    return (smooth + 0.5 * torch.rand(n, 1, 1, 1, generator=gen) - 0.25).clamp(-1, 1)


def _noises(loader: DataLoader) -> list[torch.Tensor]:
    return [split_coupled_batch(batch)[1] for batch in loader]


def _loader(collate: CouplingCollate, workers: int, seed: int = 0, n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(_images(n)), batch_size=16, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def test_tuple_batch_is_wrapped_and_split_back():
    collate = CouplingCollate("lsa", seed=1)
    samples = [(x, torch.tensor(i)) for i, x in enumerate(_images(8))]
    batch = collate(samples)
    assert set(batch) == {BATCH_KEY, NOISE_KEY, INDEX_KEY, STATS_KEY, POSITION_KEY}
    assert batch[POSITION_KEY].tolist() == [0, 0, 0]  # rank 0, epoch 0, first batch
    inner, noise = split_coupled_batch(batch)
    x0, labels = inner
    assert noise.shape == x0.shape == (8, 3, 8, 8) and labels.tolist() == list(range(8))
    assert batch[STATS_KEY].shape == (3,) and batch[STATS_KEY][1] <= batch[STATS_KEY][0]


def test_dict_batch_keeps_its_keys():
    collate = CouplingCollate("lsa", seed=1)
    batch = collate([{"image": x, "label": 3} for x in _images(6)])
    inner, noise = split_coupled_batch(batch)
    assert set(inner) == {"image", "label"} and noise.shape == inner["image"].shape
    assert batch["image"] is inner["image"]


def test_batch_without_noise_passes_through():
    batch = {"image": torch.zeros(2, 3)}
    assert split_coupled_batch(batch) == (batch, None)
    assert split_coupled_batch((1, 2)) == ((1, 2), None)


def test_lsa_noise_is_a_permutation_of_the_raw_draw():
    x = _images(32)
    coupled = CouplingCollate("lsa", seed=5)([(xi,) for xi in x])
    raw = CouplingCollate("none", seed=5)([(xi,) for xi in x])  # same seed and counter: same draw
    index = coupled[INDEX_KEY]
    assert sorted(index.tolist()) == list(range(32)) and not torch.equal(index, torch.arange(32))
    torch.testing.assert_close(coupled[NOISE_KEY], raw[NOISE_KEY][index])


def test_knn_returns_one_candidate_per_item():
    batch = CouplingCollate("knn", k=3, seed=0)([(xi,) for xi in _images(10)])
    assert batch[NOISE_KEY].shape == (10, 3, 8, 8)
    assert batch[INDEX_KEY].min() >= 0 and batch[INDEX_KEY].max() < 3


def test_main_process_stream_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first = _noises(_loader(CouplingCollate("none", seed=3), workers=0))
    again = _noises(_loader(CouplingCollate("none", seed=3), workers=0))
    other = _noises(_loader(CouplingCollate("none", seed=4), workers=0))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[1])  # the batch counter advances


def test_set_epoch_changes_the_stream():
    collate = CouplingCollate("none", seed=3)
    epoch0 = _noises(_loader(collate, workers=0))
    collate.set_epoch(0)  # the same epoch again: the same positions, the same noise
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _noises(_loader(collate, workers=0)), strict=True))
    collate.set_epoch(1)
    assert not torch.equal(_noises(_loader(collate, workers=0))[0], epoch0[0])


def test_workers_draw_different_noise_and_are_reproducible_under_a_seed():
    collate = CouplingCollate("none", seed=11)
    run1 = _noises(_loader(collate, workers=2, seed=0))
    run2 = _noises(_loader(collate, workers=2, seed=0))
    assert len(run1) == 4 and all(torch.equal(a, b) for a, b in zip(run1, run2, strict=True))
    # Batches 0 and 1 come from workers 0 and 1 with the same batch counter: they must differ.
    flat = torch.stack([n.flatten() for n in run1])
    assert torch.cdist(flat, flat).add(torch.eye(4) * 1e9).min() > 1.0
    # The noise is a function of (seed, rank, epoch, batch position), not of the workers' seeds:
    # the same positions with one worker or two give the same noise; a new epoch gives new noise.
    assert all(torch.equal(a, b) for a, b in zip(run1, _noises(_loader(collate, workers=1)), strict=True))
    collate.set_epoch(1)
    epoch2 = _noises(_loader(collate, workers=2, seed=1))
    assert not any(torch.equal(a, b) for a, b in zip(run1, epoch2, strict=True))


def test_noise_is_the_documented_function_of_seed_rank_epoch_and_position():
    # Oracle written out from the documented derivation (NumPy SeedSequence -> torch.Generator).
    # Catches a stream without the rank (every DDP rank would draw the same noise) or with
    # hidden state (a resumed run could not reproduce it).
    import numpy as np

    collate = CouplingCollate("none", seed=7, rank=3)
    collate.set_epoch(2)
    noises = _noises(_loader(collate, workers=2))
    for index, noise in enumerate(noises):
        words = np.random.SeedSequence([7, 2, 3, 2, index]).generate_state(2)
        gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
        assert torch.equal(noise, torch.randn(noise.shape, generator=gen))
    other_rank = CouplingCollate("none", seed=7, rank=4)
    other_rank.set_epoch(2)
    assert not torch.equal(_noises(_loader(other_rank, workers=2))[0], noises[0])


def test_worker_noise_is_standard_gaussian():
    noise = torch.cat(_noises(_loader(CouplingCollate("lsa", seed=2), workers=2, n=256)))
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02


def test_worker_pairing_matches_direct_couple_in_distribution():
    loader = _loader(CouplingCollate("lsa", seed=0), workers=2, n=16 * 24)  # the data of `direct`
    via_workers = [float(b[STATS_KEY][0] - b[STATS_KEY][1]) / float(b[STATS_KEY][0]) for b in loader]
    gen = torch.Generator().manual_seed(123)
    direct = []
    for x0 in _images(16 * 24, seed=0).split(16):
        res = couple(x0, torch.randn(x0.shape, generator=gen))
        direct.append(res.reduction_pct / 100)
    mean_w, mean_d = statistics.mean(via_workers), statistics.mean(direct)
    var = statistics.variance(via_workers) / len(via_workers) + statistics.variance(direct) / len(direct)
    se = var**0.5
    assert mean_w > 0.005 and mean_d > 0.005  # both really re-pair
    assert abs(mean_w - mean_d) < 4 * se + 1e-3


def test_collate_is_picklable_and_validates_arguments():
    assert pickle.loads(pickle.dumps(CouplingCollate("knn", k=2, seed=1))).k == 2
    with pytest.raises(ValueError, match="Unknown method"):
        CouplingCollate("sinkhorn")
    with pytest.raises(ValueError, match="k must be >= 1"):
        CouplingCollate("knn", k=0)


def counting_solvers(monkeypatch, path) -> None:
    """Two exact solvers, "first" (the rule's) and "second" (5 ms slower: never a race's winner, so
    only races call it), whose calls in any process (forked DataLoader workers too) are appended to
    the file `path`; races from pools of 2 items on."""
    import lightning_immiscible.solver_race as solver_race
    from lightning_immiscible.solvers import SOLVERS, SolverSpec, solve_scipy

    def spec(name: str, priority: int) -> SolverSpec:
        def fn(cost):
            with open(path, "a") as out:
                out.write(f"{name}\n")
            time.sleep(0.005 if name == "second" else 0.0)
            return solve_scipy(cost)

        return SolverSpec(name, fn, exact=True, priority=priority, low_dim_priority=priority)

    monkeypatch.setitem(SOLVERS, "first", spec("first", -3))
    monkeypatch.setitem(SOLVERS, "second", spec("second", -2))
    monkeypatch.setattr(solver_race, "RACE_MIN_POOL", 2)


def race_calls(path) -> int:
    """Race calls so far: calls of "second", which only a race runs (the rule picks "first")."""
    return path.read_text().split().count("second") if path.exists() else 0


@pytest.mark.parametrize(
    ("persistent", "credit", "again"),
    [(True, False, 0), (False, True, 0), (False, False, 8)],
    ids=["persistent_workers", "credited_batches", "neither"],
)
def test_a_worker_race_is_kept_across_epochs_without_the_callback(
    monkeypatch, tmp_path, persistent, credit, again
):
    # Two workers, 5 batches each per epoch: each worker races on its copy of the collate's race in
    # epoch 0 (1 warm-up + 3 counted calls = 8 race calls), then decides. In epoch 1 persistent
    # workers keep their decision; non-persistent ones are forked again from the main process's
    # collate, which knows the decision only if the loop credited the batches' race times
    # (`collate.credit(batch)`); otherwise they race again (the documented cost of neither).
    # Catches a credit that counts nothing, and a persistent worker that forgets its race.
    path = tmp_path / "calls.txt"
    counting_solvers(monkeypatch, path)
    collate = CouplingCollate("lsa", seed=2)
    loader = DataLoader(TensorDataset(torch.rand(160, 3, 8, 8)), batch_size=16, num_workers=2,
                        collate_fn=collate, persistent_workers=persistent,
                        multiprocessing_context="fork")  # fmt: skip
    counts = []
    for _epoch in range(2):
        for batch in loader:
            if credit:
                collate.credit(batch)
        counts.append(race_calls(path))
    assert counts == [8, 8 + again]
