"""Invariants of the pure coupling: direction, optimality, permutation, marginal, bad input, the spec."""

import itertools
from dataclasses import FrozenInstanceError

import pytest
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment

from lightning_immiscible import CouplingInputError, CouplingSpec, cost_matrix, couple, paired_distance


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(b: int, *dims: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, *dims, generator=_gen(seed)) * 2 - 1


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_planted_permutation_is_recovered(metric, precision):
    x0 = _data(48, 3, 8, 8)
    perm = torch.randperm(48, generator=_gen(1))
    noise = x0[perm] + 1e-3 * torch.randn(x0.shape, generator=_gen(2))
    res = couple(x0, noise, method="lsa", metric=metric, precision=precision)
    # noise[j] = x0[perm[j]] + jitter, so x0[i] must get noise[perm^-1[i]]
    assert torch.equal(perm[res.index], torch.arange(48))
    assert torch.allclose(res.noise, x0, atol=1e-2)
    assert res.cost_after < 0.01 * res.cost_before


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
@pytest.mark.parametrize("method", ["lsa", "flip"])
def test_lsa_matches_brute_force_optimum(metric, method):
    x0, noise = _data(6, 5, seed=3), torch.randn(6, 5, generator=_gen(4))
    target = -noise if method == "flip" else noise
    cost = cost_matrix(x0, target, metric, "fp32").double()
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    res = couple(x0, noise, method=method, metric=metric, precision="fp32")
    assert float(cost[torch.arange(6), res.index].sum()) == pytest.approx(float(best), rel=1e-9)


@pytest.mark.parametrize("method", ["lsa", "flip", "none"])
def test_output_is_a_permutation_of_the_input_noise(method):
    x0, noise = _data(64, 2, 4, 4), torch.randn(64, 2, 4, 4, generator=_gen(5))
    res = couple(x0, noise, method=method)
    assert sorted(res.index.tolist()) == list(range(64))
    assert torch.equal(res.noise, noise[res.index])
    assert res.noise.shape == x0.shape and res.noise.dtype == noise.dtype


def test_lsa_reduces_and_flip_increases_the_distance_reports_in_metric():
    x0, noise = _data(128, 3, 16, 16), torch.randn(128, 3, 16, 16, generator=_gen(6))
    lsa, flip, none = (couple(x0, noise, method=m) for m in ("lsa", "flip", "none"))
    assert lsa.cost_after < lsa.cost_before and lsa.reduction_pct > 0.5
    # flip pairs each item with the noise closest to -x0: the real distance grows
    assert flip.cost_after > flip.cost_before
    assert none.cost_after == none.cost_before and torch.equal(none.index, torch.arange(128))
    expected = float(paired_distance(x0, lsa.noise).mean())
    assert lsa.cost_after == pytest.approx(expected, rel=1e-6)
    assert lsa.cost_ms > 0 and lsa.solve_ms > 0


def test_half_precision_costs_keep_the_gain_without_overflow():
    x0 = _data(128, 3, 32, 32) * 300.0  # large values: an unscaled fp16 product would overflow
    noise = torch.randn(x0.shape, generator=_gen(7)) * 300.0
    exact = couple(x0, noise, precision="fp32")
    for precision in ("bf16", "fp16"):
        half = couple(x0, noise, precision=precision)
        assert torch.isfinite(cost_matrix(x0, noise, "l2", precision)).all()
        assert half.reduction_pct >= 0.97 * exact.reduction_pct


def test_cost_matrix_row_blocks_equal_full_matrix():
    x0, noise = _data(20, 7, seed=8), torch.randn(20, 7, generator=_gen(9))
    full = cost_matrix(x0, noise)
    parts = torch.cat([cost_matrix(x0[:7], noise), cost_matrix(x0[7:], noise)])
    assert torch.allclose(full, parts, atol=1e-5)
    assert torch.allclose(full, torch.cdist(x0, noise), atol=1e-4)


def test_cost_matrix_never_materialises_a_broadcast_tensor():
    b, d = 256, 20_000  # a (B, B, D) fp32 tensor would be 5.2 GB
    x0, noise = _data(b, d), torch.randn(b, d, generator=_gen(10))
    with torch.profiler.profile(profile_memory=True) as prof:
        cost_matrix(x0, noise, "l2", "fp32")
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest < 4 * b * d * 4  # O(B*D + B^2), far below B*B*D


def test_lsa_marginal_stays_gaussian_per_coordinate():
    # Data far from symmetric, so a biased assignment would shift the coupled noise's marginal.
    gen, coords = _gen(11), []
    for _ in range(150):
        x0 = torch.rand(32, 6, generator=gen) * 2
        res = couple(x0, torch.randn(32, 6, generator=gen), method="lsa")
        coords.append(res.noise[:4])  # the noise paired with fixed batch positions
    pooled = torch.cat(coords)
    pvals = [stats.kstest(pooled[:, c].numpy(), "norm").pvalue for c in range(6)]
    assert min(pvals) > 0.01 / 6  # Bonferroni over coordinates


def test_knn_picks_nearest_candidate_and_its_tilt_is_measurable():
    gen = _gen(12)
    x0 = torch.rand(256, 64, generator=gen) * 2 - 1
    cand = torch.randn(256, 8, 64, generator=gen)
    res = couple(x0, cand, method="knn")
    dists = torch.linalg.vector_norm(x0[:, None] - cand, dim=-1)
    assert torch.equal(res.index, dists.argmin(1))
    assert torch.equal(res.noise, cand[torch.arange(256), res.index])
    assert res.cost_after < res.cost_before
    # knn selects shorter noise vectors: the coupled noise is no longer N(0, I) (documented).
    assert float(res.noise.square().mean()) < 0.97


@pytest.mark.parametrize(
    ("x0", "noise", "match"),
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.randn(2, 2), "x0 contains 1 NaN/Inf"),
        (torch.randn(2, 2), torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), "noise contains 1 NaN/Inf"),
        (torch.ones(3, 2, dtype=torch.int64), torch.randn(3, 2), "x0 has dtype torch.int64"),
        (torch.randn(3, 2), torch.ones(3, 2, dtype=torch.bool), "noise has dtype torch.bool"),
        (torch.randn(3, 2), torch.randn(4, 2), "does not match x0 shape"),
        (torch.randn(3, 2), torch.randn(3, 2, 1), "does not match x0 shape"),
    ],
)
def test_bad_input_gets_a_clear_error(x0, noise, match):
    with pytest.raises(CouplingInputError, match=match):
        couple(x0, noise)


def test_knn_shape_mismatch_and_unknown_names():
    with pytest.raises(CouplingInputError, match=r"knn needs noise of shape \(B, k"):
        couple(torch.randn(3, 2), torch.randn(3, 2), method="knn")
    with pytest.raises(CouplingInputError, match="Unknown method"):
        couple(torch.randn(3, 2), torch.randn(3, 2), method="ot")
    with pytest.raises(ValueError, match="Unknown metric"):
        couple(torch.randn(3, 2), torch.randn(3, 2), metric="cosine")
    with pytest.raises(ValueError, match="Unknown solver"):
        couple(torch.randn(3, 2), torch.randn(3, 2), solver="magic")


def test_empty_and_single_item_batches_are_no_ops():
    empty = couple(torch.randn(0, 3), torch.randn(0, 3))
    assert empty.noise.shape == (0, 3) and empty.index.numel() == 0 and empty.cost_before == 0.0
    one_x, one_n = torch.randn(1, 3), torch.randn(1, 3)
    single = couple(one_x, one_n)
    assert torch.equal(single.noise, one_n) and single.index.tolist() == [0]


def test_output_keeps_device_and_dtype_of_inputs():
    x0 = _data(16, 4).double()
    noise = torch.randn(16, 4, generator=_gen(13), dtype=torch.float64)
    res = couple(x0, noise)
    assert res.noise.dtype == torch.float64 and res.index.dtype == torch.int64
    assert res.noise.device == x0.device


def test_spec_is_validated_once_and_couple_keywords_build_the_same_spec():
    # Catches: a spec that accepts typos (each would only fail deep inside a fit), and couple()'s
    # keywords drifting from CouplingSpec.couple (the results would differ).
    x0, noise = _data(24, 3, 4, 4), torch.randn(24, 3, 4, 4, generator=_gen(14))
    spec = CouplingSpec(method="flip", metric="sqeuclidean", precision="fp32", solver="scipy")
    via_spec = spec.couple(x0, noise)
    via_keywords = couple(x0, noise, method="flip", metric="sqeuclidean", precision="fp32", solver="scipy")
    assert torch.equal(via_spec.index, via_keywords.index) and via_spec.method == "flip"
    cost = cost_matrix(x0, -noise, "sqeuclidean", "fp32").double().numpy()
    rows, cols = linear_sum_assignment(cost)  # the oracle: scipy on the cost built here
    assert via_spec.index[torch.from_numpy(rows)].tolist() == cols.tolist()
    for bad, match in [
        ({"method": "ot"}, "Unknown method 'ot'; choose one of lsa, knn, flip, none"),
        ({"metric": "cos"}, "Unknown metric 'cos'; choose one of l2, sqeuclidean, l1"),
        ({"precision": "fp8"}, "Unknown precision 'fp8'; choose one of auto, fp32, bf16, fp16"),
        ({"solver": "magic"}, "Unknown solver 'magic'"),
        ({"k": 0}, "k must be >= 1"),
        ({"k": True}, "k must be >= 1"),
    ]:
        with pytest.raises(CouplingInputError, match=match):
            CouplingSpec(**bad)
    with pytest.raises(FrozenInstanceError):
        spec.method = "lsa"  # type: ignore[misc]


def test_group_coupling_config_is_the_spec_under_its_former_name():
    from lightning_immiscible.distributed import GroupCouplingConfig

    assert GroupCouplingConfig is CouplingSpec
    assert GroupCouplingConfig("knn", "l1", "auto", "auto", 3, False) == CouplingSpec(
        method="knn", metric="l1", k=3, check_finite=False
    )
