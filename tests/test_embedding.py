"""Embedding conditions: C²OT's weight rule, the assignment of M + w C, the condition leak, every path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, TensorDataset

from lightning_immiscible import CouplingInputError, CouplingSpec, ImmiscibleCoupling, couple
from lightning_immiscible.distributed import couple_in_group
from lightning_immiscible.embedding import candidate_share, condition_costs, condition_leak, search_weight
from lightning_immiscible.groups import build_rank_group
from lightning_immiscible.streams import draw_pool
from lightning_immiscible.workers import CouplingCollate, WorkerCoupling
from tests.helpers import ToyDiffusion, trainer


def _costs_by_hand(x: np.ndarray, n: np.ndarray, metric: str) -> np.ndarray:
    """`(B, B)` data-noise costs from the formula, row = item, column = noise."""
    diff = x.reshape(len(x), 1, -1) - n.reshape(1, len(n), -1)
    sq = (diff**2).sum(-1)
    return np.sqrt(sq) if metric == "l2" else sq


def _share_by_loop(m: np.ndarray, c: np.ndarray, w: float) -> float:
    """C²OT's r(w), literally: with `mt` noise by data (their orientation), count
    `mt[i, j] + w C[i, j] <= mt[j, j]` over all entries, one at a time."""
    mt, b = m.T, len(m)
    hits = sum(1 for i in range(b) for j in range(b) if mt[i, j] + w * c[j, i] <= mt[j, j])
    return hits / (b * b)


def _batch(b: int, d: int = 6, e: int = 2, seed: int = 0, lean: float = 1.5):
    """Data whose mean depends on a continuous condition, the condition, and independent noise."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, e, generator=gen, dtype=torch.float64).float()
    x = lean * z @ torch.randn(e, d, generator=gen) + 0.5 * torch.randn(b, d, generator=gen)
    return x, z, torch.randn(b, d, generator=gen)


def test_the_candidate_share_counts_the_entries_of_c2ots_definition():
    # Oracle: C²OT's comparison written entry by entry in its own orientation (noise by data).
    # Catches the diagonal of the wrong axis (M[j, j] with our item-by-noise rows: the data's own
    # length would then not cancel) and a strict `<` (the diagonal would not count).
    x, z, n = (t.double().numpy() for t in _batch(20, seed=1))
    m, c = _costs_by_hand(x, n, "sqeuclidean"), condition_costs(z, "sqeuclidean")
    for w in (0.0, 0.3, 1.0, 4.0, 50.0):
        assert candidate_share(m, c, w) == _share_by_loop(m, c, w)


def test_the_condition_cost_is_the_distance_between_the_items_conditions():
    # Oracle: the distances by hand. Catches the condition of another item (a shifted row: C[i, i]
    # would not be 0) and cosine written as a similarity.
    z = torch.randn(9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    sq = ((z[:, None] - z[None]) ** 2).sum(-1)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(condition_costs(z, "sqeuclidean"), sq, atol=1e-12)
    np.testing.assert_allclose(condition_costs(z, "cosine"), 1 - unit @ unit.T, atol=1e-12)
    assert np.all(np.diagonal(condition_costs(z, "cosine")) == 0)
    same = condition_costs(np.repeat(z[:1] * 1e3, 5, axis=0), "sqeuclidean")
    assert np.all(same == 0)  # identical conditions cost exactly nothing to swap


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("metric", ["sqeuclidean", "l2"])
def test_the_search_finds_a_weight_within_0_001_of_the_target_share(seed, metric):
    # Catches a search that stops early or bisects the wrong way (|r - 0.2| > 0.001), and an r that
    # is not the one C²OT counts (the loop oracle).
    x, z, n = (t.double().numpy() for t in _batch(64, seed=seed))
    m, c = _costs_by_hand(x, n, metric), condition_costs(z, "sqeuclidean")
    w, r = search_weight(m, c, 0.2)
    assert w > 0 and abs(r - 0.2) <= 0.001
    assert r == _share_by_loop(m, c, w)


def test_the_share_is_scale_free_and_the_weight_scales_with_the_cost():
    # Catches a starting weight or cap in absolute units (the search would then end elsewhere on
    # data stored at another scale). A power of two keeps every comparison exact.
    x, z, n = (t.double().numpy() for t in _batch(48, seed=5))
    m, c = _costs_by_hand(x, n, "sqeuclidean"), condition_costs(z, "sqeuclidean")
    w, r = search_weight(m, c, 0.2)
    assert search_weight(8 * m, c, 0.2) == (8 * w, r)


def test_a_target_above_the_unweighted_share_gives_weight_zero_and_the_plain_pairing():
    # r(0) is about one half (a random noise is as likely nearer as farther): a target of 0.9 is
    # already met without the condition. Catches a search that always moves the weight.
    x, z, n = _batch(24, seed=6)
    res = couple(x, n, condition=z, candidate_share=0.9)
    assert res.condition_weight == 0.0 and 0.3 < res.candidate_share <= 0.9
    assert torch.equal(res.index, couple(x, n).index)
    same = couple(x, n, condition=torch.ones(24, 3))  # identical conditions: nothing to weigh
    assert same.condition_weight == 0.0 and torch.equal(same.index, couple(x, n).index)
    assert same.condition_leak is None  # a constant condition predicts nothing


@pytest.mark.parametrize(
    ("method", "metric", "cmetric"),
    [("lsa", "sqeuclidean", "sqeuclidean"), ("lsa", "l2", "cosine"), ("flip", "sqeuclidean", "sqeuclidean")],
)
def test_the_pairing_is_scipys_optimum_of_the_cost_plus_the_weighted_condition(method, metric, cmetric):
    # Oracle: SciPy on M + w C built in NumPy (w from the result). Catches the weight applied to
    # the data cost instead (w M + C), the condition of the wrong item in C, and flip solved
    # against +noise.
    x, z, n = _batch(16, seed=7)
    res = couple(x, n, method=method, metric=metric, solver="scipy", condition=z, condition_metric=cmetric)
    assert res.condition_weight > 0 and res.candidate_share == pytest.approx(0.2, abs=0.05)
    target = -n if method == "flip" else n
    zd = z.double().numpy()
    if cmetric == "cosine":
        unit = zd / np.linalg.norm(zd, axis=1, keepdims=True)
        c = 1 - unit @ unit.T
    else:
        c = ((zd[:, None] - zd[None]) ** 2).sum(-1)
    k = _costs_by_hand(x.double().numpy(), target.double().numpy(), metric) + res.condition_weight * c
    rows, cols = linear_sum_assignment(k)
    assert k[np.arange(16), res.index.numpy()].sum() == pytest.approx(k[rows, cols].sum(), rel=1e-6)
    assert torch.equal(res.noise, n[res.index])


def test_conditions_far_apart_never_trade_noise_where_plain_ot_does():
    # Two clusters of conditions with a large gap; the data of each cluster sits on opposite
    # sides, so plain OT gives cluster A the noise drawn with cluster B's items. Catches a condition
    # term that is ignored or too weak at the default share.
    gen = torch.Generator().manual_seed(8)
    side = torch.arange(32) % 2
    z = (side[:, None] * 20.0 - 10.0) + 0.3 * torch.randn(32, 2, generator=gen)
    x = (side[:, None] * 2.0 - 1.0) * 1.5 + 0.5 * torch.randn(32, 8, generator=gen)
    n = torch.randn(32, 8, generator=gen)
    assert bool((side[couple(x, n).index] != side).any())
    res = couple(x, n, condition=z)
    assert torch.equal(side[res.index], side) and abs(res.candidate_share - 0.2) <= 0.001


def test_the_leak_equals_a_least_squares_fit_by_numpy():
    # Oracle: numpy.linalg.lstsq of the centred data on the centred conditions. Catches a fit
    # without centring, on the wrong items, or a wrong normalisation.
    x, z, n = _batch(20, e=3, seed=9)
    xd, zd, nd = (t.double().numpy() for t in (x, z, n))
    zc, xc = zd - zd.mean(0), xd - xd.mean(0)
    v = zc @ np.linalg.lstsq(zc, xc, rcond=None)[0]
    assert condition_leak(x, z, n) == pytest.approx(float((nd * v).sum() / np.linalg.norm(v)), rel=1e-9)
    assert condition_leak(x[:1], z[:1], n[:1]) is None


def test_the_leak_is_standard_normal_under_independent_pairs():
    # Null: N(0, 1) per batch. 400 batches: |mean| < 4 SE and SD within [0.85, 1.15] (the SD's own
    # SE is about 0.035). Catches a diagnostic with a non-zero null mean or a wrong scale.
    leaks = []
    for seed in range(400):
        x, z, n = _batch(32, seed=100 + seed)
        leaks.append(couple(x, n, method="none", condition=z).condition_leak)
    assert abs(np.mean(leaks)) < 4 / math.sqrt(400)
    assert 0.85 <= np.std(leaks) <= 1.15


def _mean_leak(spec: CouplingSpec, batches: int = 20) -> float:
    """Mean condition leak over batches of 64 whose data mean depends on the condition."""
    return float(np.mean([spec.couple(x, n, z).condition_leak
                          for x, z, n in (_batch(64, seed=500 + s) for s in range(batches))]))  # fmt: skip


def test_plain_ot_leaks_the_condition_and_the_condition_term_reduces_it():
    # Catches a diagnostic blind to a leak, a condition term that does not act on it (aware equal
    # to across), and a share that moves the weight the wrong way. Measured over 12 sets of 20
    # batches (seeds 500..739): plain OT 9.2-9.7; the default share 0.2 keeps 0.55-0.62 of it (C²OT's
    # default only reduces the leak, it does not remove it); share 0.05 about 0-0.7, 0.1 about 2.
    across = _mean_leak(CouplingSpec("lsa", "sqeuclidean", within_condition=False))
    aware = _mean_leak(CouplingSpec("lsa", "sqeuclidean"))
    tight = _mean_leak(CouplingSpec("lsa", "sqeuclidean", candidate_share=0.05))
    assert across > 6 and aware < 0.75 * across and tight < aware / 3


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (torch.zeros(7, 2), "shape (7, 2) but the batch has 8 items"),
        (torch.zeros(8, 2, 1), "flatten it"),
        (torch.zeros(8, 2, dtype=torch.long), "must be floating"),
        (torch.zeros(8), "(B, 1)"),
        (torch.tensor([[0.0, 1.0]] * 7 + [[float("nan"), 0.0]]), "1 NaN/Inf"),
        (torch.zeros(8, 0), "E >= 1"),
    ],
    ids=["wrong_length", "three_dims", "integer", "one_dim_float", "nan", "empty"],
)
def test_bad_embeddings_raise_a_message_that_says_what_to_fix(condition, message):
    x0 = torch.randn(8, 4)
    with pytest.raises(CouplingInputError) as info:
        couple(x0, torch.randn_like(x0), condition=condition)
    assert message in str(info.value)


def test_bad_condition_settings_name_the_setting():
    with pytest.raises(CouplingInputError, match=r"candidate_share=1\.5"):
        CouplingSpec(candidate_share=1.5)
    with pytest.raises(CouplingInputError, match="condition_metric"):
        CouplingSpec(condition_metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate_share=0"):
        ImmiscibleCoupling(candidate_share=0)
    x0 = torch.randn(4, 3)
    with pytest.raises(CouplingInputError, match="all-zero row"):
        couple(x0, torch.randn_like(x0), condition=torch.zeros(4, 2), condition_metric="cosine")


def test_knn_and_none_keep_their_pairing_and_report_the_leak():
    x, z, n = _batch(12, seed=10)
    cand = torch.randn(12, 3, 6, generator=torch.Generator().manual_seed(1))
    knn = couple(x, cand, method="knn", condition=z)
    assert torch.equal(knn.index, couple(x, cand, method="knn").index) and knn.condition_leak is not None
    assert knn.condition_weight is None
    none = couple(x, n, method="none", condition=z)
    assert torch.equal(none.index, torch.arange(12)) and none.condition_leak is not None


def test_one_process_group_coupling_equals_couple_on_the_same_pool_and_conditions():
    # Catches the group path (conditions as extra gathered columns) disagreeing with couple().
    x, z, _ = _batch(30, seed=11)
    res = couple_in_group(x, build_rank_group("global"), 5, 9, CouplingSpec("lsa"), condition=z)
    expected = couple(x, draw_pool(x.shape, 5, 0, 9), condition=z)
    assert torch.equal(res.index, expected.index)
    # The group path costs its rows apart from couple()'s full matrix: equal up to rounding.
    assert res.condition_weight == pytest.approx(expected.condition_weight, rel=1e-6)
    assert res.candidate_share == pytest.approx(expected.candidate_share, abs=1e-3)
    assert res.condition_leak == pytest.approx(expected.condition_leak)


class EmbeddedToy(ToyDiffusion):
    """ToyDiffusion whose condition is a 2-D embedding of each item's data (it predicts the data)."""

    def immiscible_condition(self, batch):
        return batch[0][:, :2] * 3.0


@pytest.mark.parametrize("within", [True, False])
def test_the_callback_couples_with_the_module_embedding_and_logs_leak_and_weight(within):
    # Catches the callback dropping the embedding (plain OT), settings not passed to the spec, and
    # the diagnostics not logged. Oracle: couple() on the callback's pool.
    module = EmbeddedToy()
    cb = ImmiscibleCoupling(seed=4, within_condition=within, candidate_share=0.3, condition_metric="cosine")
    t = trainer(callbacks=[cb], max_steps=3)
    t.fit(module)
    spec = CouplingSpec("lsa", within_condition=within, candidate_share=0.3, condition_metric="cosine")
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, 4, 0, draw)
        expected = spec.couple(rec["x0"], pool, rec["x0"][:, :2] * 3.0)
        assert torch.equal(rec["noise"], expected.noise)
    logged = t.callback_metrics
    assert float(logged["immiscible/condition_leak"]) == pytest.approx(cb.last_result.condition_leak)
    if within:
        assert float(logged["immiscible/condition_weight"]) == pytest.approx(cb.last_result.condition_weight)
        assert float(logged["immiscible/candidate_share"]) == pytest.approx(cb.last_result.candidate_share)
    else:
        assert "immiscible/condition_weight" not in logged
    assert cb.settings()["candidate_share"] == 0.3 and cb.settings()["condition_metric"] == "cosine"


def _embed(batch):
    """A picklable condition_fn: a 2-D embedding of the collated data."""
    return batch[0][:, :2] * 3.0


def test_the_worker_collate_couples_with_the_embedding_and_carries_leak_and_weight():
    # Catches a collate that ignores a float condition_fn, and the diagnostics lost on the way to
    # the callback (the fit below logs the worker's values).
    data = torch.randn(24, 5)
    collate = CouplingCollate("lsa", seed=2, condition_fn=_embed, candidate_share=0.25)
    loader = DataLoader(TensorDataset(data, torch.arange(24)), batch_size=12, collate_fn=collate)
    for i, batch in enumerate(loader):
        worker = WorkerCoupling.from_batch(batch)
        x0, z = worker.batch[0], _embed(worker.batch)
        expected = couple(x0, collate.noise_for(x0, (0, 0, i)), condition=z, candidate_share=0.25)
        assert torch.equal(worker.noise, expected.noise) and torch.equal(worker.condition, z)
        assert worker.condition_leak == pytest.approx(expected.condition_leak)
        assert (worker.condition_weight, worker.candidate_share) == pytest.approx(
            (expected.condition_weight, expected.candidate_share)
        )
        assert worker.prior_skew is None

    class WorkerFed(EmbeddedToy):
        def train_dataloader(self):
            ds = TensorDataset(torch.rand(32, 12) * 2 - 1, torch.arange(32))
            collate = CouplingCollate("lsa", seed=3, condition_fn=_embed)
            return DataLoader(ds, batch_size=8, collate_fn=collate)

    cb = ImmiscibleCoupling(seed=1, scope="local")
    t = trainer(callbacks=[cb], max_steps=2)
    t.fit(WorkerFed())
    assert cb.last_result.method == "worker"
    logged = t.callback_metrics
    assert float(logged["immiscible/condition_leak"]) == pytest.approx(cb.last_result.condition_leak)
    assert float(logged["immiscible/condition_weight"]) > 0


def test_the_results_diagnostics_are_plain_python_floats():
    # Catches a numpy scalar in the result (np.count_nonzero / size is np.float64): it cannot be
    # written to JSON by a user's records (the conditions experiment runner failed on one).
    import json

    x, z, n = _batch(32)
    res = couple(x, n, method="lsa", metric="sqeuclidean", condition=z)
    values = (res.condition_weight, res.candidate_share, res.condition_leak)
    assert all(type(v) is float for v in values), [type(v) for v in values]
    json.dumps(values)
