"""The dataset-level coupling in DataLoaders and Lightning fits: items chosen by noise, resume, DDP.

The oracle throughout: a batch's items must be the brute-force float64
`argmin_j |z - y_j|^2 - g_j` images of the batch's own noise under the map's potentials, and the
noise must be the documented stream at the batch's position (written out with NumPy's SeedSequence).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_immiscible import ImmiscibleCoupling
from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.dataset_coupling import DatasetCouplingLoader
from lightning_immiscible.map_fit import FitSemidiscreteMap
from lightning_immiscible.mixin import hand_off
from lightning_immiscible.semidiscrete import SemidiscreteMap
from lightning_immiscible.workers import split_coupled_batch
from tests.helpers import ToyDiffusion, trainer

DIM = 12


def data(n: int = 48, seed: int = 100) -> torch.Tensor:
    return torch.rand(n, DIM, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def brute_force(items: torch.Tensor, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    cost = torch.cdist(z.double().reshape(len(z), -1), items.double().reshape(len(items), -1)).pow(2)
    return (cost - g.double()[None]).argmin(1)


def stream_noise(seed: int, position: tuple[int, int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """Stream.DATASET (5) at (rank, epoch, index), as the streams module documents it."""
    words = np.random.SeedSequence([seed, 5, *position]).generate_state(2)
    gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen)


def fitted(x: torch.Tensor, labels: torch.Tensor | None = None) -> SemidiscreteMap:
    sd = SemidiscreteMap(x, labels, seed=3)
    sd.fit(steps=300, batch_size=256, lr=0.2, tol=None, check_every=300, check_samples=4096)
    return sd


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_batch_holds_the_items_its_own_noise_maps_to(num_workers):
    # Catches: items fetched for another batch's noise (workers out of order), noise re-drawn after
    # the search, positions that ignore the epoch, and 0 vs 2 workers giving other batches.
    x = data()
    sd = fitted(x)
    loader = DatasetCouplingLoader(TensorDataset(x, torch.arange(48)), sd, batch_size=8, seed=7,
                                   num_workers=num_workers)  # fmt: skip
    assert len(loader) == 6
    seen = []
    for epoch in range(2):
        loader.positions.set_epoch(epoch)
        for index, batch in enumerate(loader):
            inner, noise = split_coupled_batch(batch)
            x0, ids = inner
            assert tuple(batch["immiscible_position"].tolist()) == (0, epoch, index)
            torch.testing.assert_close(noise, stream_noise(7, (0, epoch, index), (8, DIM)), rtol=0, atol=0)
            assert torch.equal(ids, brute_force(x, sd.potentials, noise))
            assert torch.equal(x0, x[ids])
            seen.append(noise)
    assert len({tuple(n[0].tolist()) for n in seen}) == 12  # no batch's noise twice


def test_ranks_draw_distinct_noise_and_a_resumed_loader_continues_the_stream():
    # Catches the rank left out of the stream (two ranks with the same noise) and a state that
    # restarts the epoch (the resumed batches repeating the first ones).
    x = data()
    sd = fitted(x)
    make = lambda rank: DatasetCouplingLoader(TensorDataset(x), sd, batch_size=8, seed=7, rank=rank)  # noqa: E731
    r0, r1 = (next(iter(make(r)))["immiscible_noise"] for r in (0, 1))
    assert not torch.equal(r0, r1)
    whole = [b["immiscible_noise"] for b in make(0)]
    first = make(0)
    it = iter(first)
    part = [next(it)["immiscible_noise"] for _ in range(2)]
    resumed = make(0)
    resumed.load_state_dict(first.state_dict())
    rest = [b["immiscible_noise"] for b in resumed]
    assert len(part) + len(rest) == len(whole) == 6
    for a, b in zip(part + rest, whole, strict=True):
        assert torch.equal(a, b)


def test_a_map_with_labels_keeps_each_batch_within_the_drawn_labels():
    x, labels = data(), torch.arange(48) % 3
    sd = fitted(x, labels)
    loader = DatasetCouplingLoader(TensorDataset(x, labels), sd, batch_size=8, seed=7)
    for batch in loader:
        (x0, y), noise = split_coupled_batch(batch)
        assert torch.equal(batch["immiscible_condition"], y)
        for c in range(3):  # within each label, the brute-force map over that label's items
            rows, members = (y == c).nonzero().squeeze(1), (labels == c).nonzero().squeeze(1)
            if len(rows):
                want = x[members[brute_force(x[members], sd.potentials[members], noise[rows])]]
                assert torch.equal(x0[rows], want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shuffle": True}, ValueError, "chooses its items by noise"),
        ({"persistent_workers": True, "num_workers": 1}, ValueError, "persistent"),
        ({"dataset": TensorDataset(torch.zeros(5, DIM))}, ValueError, "has 5 items, the map 48"),
        ({"sd_map": object()}, TypeError, "needs a SemidiscreteMap"),
    ],
)
def test_refused_loader_arguments_say_what_to_do(kwargs, error, match):
    x = data()
    args = {"dataset": TensorDataset(x), "sd_map": SemidiscreteMap(x, seed=0), "batch_size": 8} | kwargs
    with pytest.raises(error, match=match):
        DatasetCouplingLoader(**args)


def test_a_dataset_whose_items_are_not_the_maps_is_refused_in_the_first_batch():
    # Catches a map built from other tensors (an augmented or reordered dataset): silently wrong pairs.
    x = data()
    loader = DatasetCouplingLoader(TensorDataset(x.flip(0)), SemidiscreteMap(x, seed=0), batch_size=8, seed=1)
    with pytest.raises(CouplingInputError, match="differ from the items the map was fitted on"):
        next(iter(loader))


# ------------------------------------------------------------------------------------------------
# Lightning


class MapToy(ToyDiffusion):
    """Trains on a DatasetCouplingLoader over its 48 items; records each batch's position."""

    def __init__(self, sd_map: SemidiscreteMap, x: torch.Tensor, num_workers: int = 0):
        super().__init__(sizes=(48,))
        self.sd_map, self.x, self.num_workers = sd_map, x, num_workers

    def train_dataloader(self):
        return DatasetCouplingLoader(TensorDataset(self.x, torch.arange(len(self.x))), self.sd_map,
                                     batch_size=8, seed=7, num_workers=self.num_workers)  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        worker = hand_off(self).worker
        self.records[-1] |= {"position": worker.position, "ids": batch[1].clone(),
                             "expected": (self.global_rank, self.current_epoch, batch_idx)}  # fmt: skip
        return loss


def test_a_fit_trains_on_the_fitted_maps_images_of_noise_like():
    # End to end: FitSemidiscreteMap fits before the loader starts, training_step's noise_like(x0) is
    # the noise that chose x0, at the loop's own positions. Catches a loader whose workers got the
    # unfitted map (the items would be the start map's images), noise_like returning fresh noise.
    x = data()
    sd = SemidiscreteMap(x, seed=3)
    start = sd.potentials.clone()
    module = MapToy(sd, x, num_workers=2)
    fit = FitSemidiscreteMap(sd, steps=300, batch_size=256, lr=0.2, tol=None, check_every=100)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training loop is at.*")
        trainer(callbacks=[fit, ImmiscibleCoupling(seed=1)], max_epochs=2).fit(module)
    assert sd.steps == 300 and fit.chi2 is not None and not torch.equal(sd.potentials, start)
    assert len(module.records) == 12
    for rec in module.records:
        assert rec["position"] == rec["expected"]
        assert torch.equal(rec["ids"], brute_force(x, sd.potentials, rec["noise"]))
        assert torch.equal(rec["x0"], x[rec["ids"]])


class LastLogged(Callback):
    """Keeps the logged coupling values after each training batch."""

    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("immiscible/")}
        )


def test_a_dataset_level_batch_logs_its_map_search_time_and_distinct_items():
    # Each step logs the worker's map search time and the batch's number of distinct items (the
    # oracle: the brute-force ids' unique count of that very batch), and no worker assignment time
    # (there was no assignment). Catches the search time carried but never logged (the batch's
    # coupling time would read 0), and a count from another batch.
    x = data()
    sd = fitted(x)
    module, seen = MapToy(sd, x, num_workers=2), LastLogged()
    trainer(callbacks=[ImmiscibleCoupling(seed=1), seen], max_steps=6).fit(module)
    assert len(seen.logged) == len(module.records) == 6
    for logged, rec in zip(seen.logged, module.records, strict=True):
        assert logged["immiscible/map_search_ms"] > 0
        assert logged["immiscible/map_items"] == len(brute_force(x, sd.potentials, rec["noise"]).unique())
        assert "immiscible/worker_assign_ms" not in logged
    assert len({rec["ids"].unique().numel() for rec in module.records}) > 1  # the counts vary by batch


def test_the_fits_collective_timeout_must_be_positive():
    # Catches a 0 or negative timeout accepted (a dedicated group that times out at once).
    with pytest.raises(ValueError, match=r"collective_timeout_s=0\): pass a number of seconds > 0"):
        FitSemidiscreteMap(SemidiscreteMap(data(), seed=3), collective_timeout_s=0)


def test_a_resumed_fit_does_not_refit_and_continues_the_noise_stream(tmp_path):
    # Interrupted after 4 steps, resumed to 10: the map comes from the checkpoint (no refit: its
    # step count stays), and every later batch equals the uninterrupted run's. Catches a resume that
    # refits (another map), restarts the positions, or loses the loader's state.
    x = data()
    first_map = SemidiscreteMap(x, seed=3)
    first = MapToy(first_map, x)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    fit = lambda sd: FitSemidiscreteMap(sd, steps=200, batch_size=128, lr=0.2, tol=None, check_every=100)  # noqa: E731
    trainer(callbacks=[fit(first_map), ImmiscibleCoupling(seed=1), ckpt], max_steps=4,
            enable_checkpointing=True).fit(first)  # fmt: skip
    resumed_map = SemidiscreteMap(x, seed=3)
    resumed = MapToy(resumed_map, x)
    path = next(tmp_path.glob("*step=4*.ckpt"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training loop is at.*")
        trainer(callbacks=[fit(resumed_map), ImmiscibleCoupling(seed=1)], max_steps=10).fit(
            resumed, ckpt_path=path
        )
    assert torch.equal(resumed_map.potentials, first_map.potentials) and resumed_map.steps == 200
    whole_map = SemidiscreteMap(x, seed=3)
    whole = MapToy(whole_map, x)
    trainer(callbacks=[fit(whole_map), ImmiscibleCoupling(seed=1)], max_steps=10).fit(whole)
    both = first.records + resumed.records
    assert len(both) == len(whole.records) == 10
    for a, b in zip(both, whole.records, strict=True):
        assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["noise"], b["noise"])


def test_the_fit_resumes_from_its_file(tmp_path):
    # An interrupted fit (100 of 200 steps saved to path) continues from step 100 in the next run
    # and ends where an uninterrupted fit ends. Catches a file that is written but never read.
    x = data()
    path = tmp_path / "map.pt"
    half = SemidiscreteMap(x, seed=3)
    cb = FitSemidiscreteMap(half, steps=100, batch_size=128, lr=0.2, tol=None, check_every=50, path=path)
    trainer(callbacks=[cb, ImmiscibleCoupling(seed=1)], max_steps=1).fit(MapToy(half, x))
    later = SemidiscreteMap(x, seed=3)
    cb = FitSemidiscreteMap(later, steps=200, batch_size=128, lr=0.2, tol=None, check_every=50, path=path)
    trainer(callbacks=[cb, ImmiscibleCoupling(seed=1)], max_steps=1).fit(MapToy(later, x))
    whole = SemidiscreteMap(x, seed=3)
    whole.fit(200, batch_size=128, lr=0.2, tol=None, check_every=50)
    assert later.steps == 200 and torch.equal(later.potentials, whole.potentials)


class Dump(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"records": pl_module.records, "g": pl_module.sd_map.potentials},
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_ranks_share_the_potentials_and_draw_their_own_noise(tmp_path):
    # 2 gloo ranks: the fit sums the ranks' hits each step, so both hold bitwise the same potentials;
    # each rank's batches come from its own stream (rank in the position) and are the map's images
    # of their noise. Catches a fit without the reduction (the ranks' potentials differ), Lightning
    # wrapping the sampler (positions sharded), and ranks training on the same noise.
    x = data()
    sd = SemidiscreteMap(x, seed=3)
    module = MapToy(sd, x)
    fit = FitSemidiscreteMap(sd, steps=100, batch_size=128, lr=0.2, tol=None, check_every=50)
    t = trainer(callbacks=[fit, ImmiscibleCoupling(seed=1, scope="local"), Dump(tmp_path)], devices=2,
                strategy="ddp_fork", max_epochs=1)  # fmt: skip
    t.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["g"], ranks[1]["g"])
    for r, got in enumerate(ranks):
        assert len(got["records"]) == 6
        for i, rec in enumerate(got["records"]):
            assert rec["position"] == (r, 0, i) == rec["expected"]
            torch.testing.assert_close(rec["noise"], stream_noise(7, (r, 0, i), (8, DIM)), rtol=0, atol=0)
            assert torch.equal(rec["ids"], brute_force(x, got["g"], rec["noise"]))
    assert not torch.equal(ranks[0]["records"][0]["noise"], ranks[1]["records"][0]["noise"])


def test_a_callback_without_a_map_looks_again_in_each_fit():
    # One FitSemidiscreteMap(sd_map=None) in two fits of two modules: each fit fits its own
    # module's map. Catches a callback that keeps the first fit's map (and its converged flag) and
    # leaves the second map unfitted while its loader trains on it.
    x = data()
    first, second = MapToy(SemidiscreteMap(x, seed=3), x), MapToy(SemidiscreteMap(x, seed=4), x)
    fit = FitSemidiscreteMap(steps=60, batch_size=128, lr=0.2, tol=None, check_every=30)
    for module in (first, second):
        trainer(callbacks=[fit, ImmiscibleCoupling(seed=1)], max_steps=1).fit(module)
        assert module.sd_map.steps == 60
