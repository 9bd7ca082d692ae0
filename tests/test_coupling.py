"""Invariants of the pure coupling: direction, optimality, permutation, marginal, bad input, the spec."""

import itertools
from dataclasses import FrozenInstanceError

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lightning_immiscible import CouplingInputError, CouplingSpec, couple
from lightning_immiscible.costs import cost_dtype, cost_matrix, paired_distance


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


def _formula_cost(x: torch.Tensor, n: torch.Tensor, metric: str) -> torch.Tensor:
    """The metric from its definition, in float64, through the (b, B, D) differences (tiny sizes)."""
    diff = x.reshape(len(x), 1, -1).double() - n.reshape(1, len(n), -1).double()
    if metric == "l1":
        return diff.abs().sum(-1)
    sq = diff.square().sum(-1)
    return sq.sqrt() if metric == "l2" else sq


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
def test_cost_matrix_equals_the_metric_formula(metric):
    # Catches a wrong metric (e.g. sqeuclidean returning the l2 distance, a dropped factor 2 in the
    # cross term, l1 through p=2): the oracle is the definition, not the library's GEMM form.
    x, n = _data(9, 2, 5, seed=20), torch.randn(11, 2, 5, generator=_gen(21))
    expected = _formula_cost(x, n, metric)
    torch.testing.assert_close(cost_matrix(x, n, metric, "fp32").double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
@pytest.mark.parametrize("method", ["lsa", "flip"])
def test_lsa_matches_brute_force_optimum(metric, method):
    # The brute-force oracle costs pairs from the metric's formula (float64), not with cost_matrix:
    # catches a solver or cost bug that the library's own cost would share (e.g. flip assigning
    # against +noise, a metric mixed up with another).
    x0, noise = _data(6, 5, seed=3), torch.randn(6, 5, generator=_gen(4))
    cost = _formula_cost(x0, -noise if method == "flip" else noise, metric)
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    res = couple(x0, noise, method=method, metric=metric, precision="fp32")
    assert float(cost[torch.arange(6), res.index].sum()) == pytest.approx(float(best), rel=1e-6)


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


@pytest.mark.parametrize(("method", "sign"), [("lsa", 1), ("none", 0), ("flip", -1)])
def test_coupled_noise_leans_toward_its_data(method, sign):
    # Marginal invariant: the multiset is kept (test_output_is_a_permutation...), and the pairing is
    # not arbitrary: lsa's noise leans toward its own item (mean <x0_i, noise_i> > 0), the baseline's
    # does not, flip's leans away. Catches a coupling that returns a random or fixed permutation, or
    # an assignment that maximises instead of minimises (a per-coordinate normality test, which any
    # permutation of Gaussian noise passes, caught none of these).
    gen, products, norms = _gen(11), [], []
    for _ in range(40):
        x0 = torch.rand(32, 6, generator=gen) * 2 - 1
        res = couple(x0, torch.randn(32, 6, generator=gen), method=method)
        products.append((x0 * res.noise).sum(1))
        norms.append(x0.square().sum(1))
    mean = float(torch.cat(products).mean())
    # Under independence <x0_i, n_i> has variance ||x0_i||^2: the standard error of the mean.
    stderr = float((torch.cat(norms).mean() / (40 * 32)) ** 0.5)
    if sign == 0:
        assert abs(mean) < 5 * stderr
    else:
        assert sign * mean > 20 * stderr  # measured: lsa +2.29, flip -2.29, stderr 0.040


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


def test_huge_finite_values_are_costed_without_overflow():
    # x0 and noise scaled by 1e20: fp32 squared norms overflow (1e40 > 3.4e38). The assignment is
    # scale invariant, so the oracle is the unscaled coupling. Catches a cost computed in fp32
    # (inf/NaN entries: a raw SciPy error, or NaN reduction_pct).
    x0, noise = _data(64, 3, 8, 8, seed=30), torch.randn(64, 3, 8, 8, generator=_gen(31))
    small = couple(x0, noise)
    for metric in ("l2", "sqeuclidean", "l1"):
        big = couple(x0 * 1e20, noise * 1e20, metric=metric)
        ref = small if metric == "l2" else couple(x0, noise, metric=metric)
        assert torch.equal(big.index, ref.index), metric
        assert big.reduction_pct == pytest.approx(ref.reduction_pct, rel=1e-4)
    assert cost_dtype(x0 * 1e20, noise) == torch.float64 and cost_dtype(x0, noise) == torch.float32


def test_data_so_large_that_noise_is_negligible_gives_finite_costs():
    # x0 * 1e30 with unit noise: every pairing is equally good to float64's precision. Catches NaN
    # costs / NaN reduction_pct (fp32 overflow: inf - inf) and a raw SciPy error.
    x0, noise = _data(16, 32, seed=32) * 1e30, torch.randn(16, 32, generator=_gen(33))
    for metric in ("l2", "sqeuclidean", "l1"):
        res = couple(x0, noise, metric=metric)
        assert sorted(res.index.tolist()) == list(range(16))
        norms = _formula_cost(x0, torch.zeros(1, 32), metric)[:, 0]  # ||x0_i|| dominates each cost
        assert res.cost_before == pytest.approx(float(norms.mean()), rel=1e-6)
        assert res.reduction_pct == pytest.approx(0.0, abs=1e-6)


def test_float64_inputs_are_costed_in_float64():
    # Near-identical rows (all items within 1e-3 of the same point, norms ~40): fp32 costs lose the
    # differences (measured 33 % above the optimum when float64 inputs were costed in fp32). The
    # oracle is SciPy on the float64 formula cost.
    x0 = 10 + 1e-3 * torch.randn(32, 16, generator=_gen(34), dtype=torch.float64)
    noise = 10 + 1e-3 * torch.randn(32, 16, generator=_gen(35), dtype=torch.float64)
    cost = _formula_cost(x0, noise, "l2").numpy()
    rows, cols = linear_sum_assignment(cost)
    res = couple(x0, noise)
    assert float(cost[range(32), res.index.numpy()].sum()) == pytest.approx(
        float(cost[rows, cols].sum()), rel=1e-12
    )
    assert cost_matrix(x0, noise).dtype == torch.float64
    assert res.cost_after == pytest.approx(float(cost[range(32), res.index.numpy()].mean()), rel=1e-12)


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


def test_the_spec_has_no_check_finite_and_within_condition_is_keyword_only():
    # The sixth positional slot was check_finite (removed: inputs are always checked). Catches
    # within_condition moving into it: an old `(..., k, False)` call would silently couple across
    # labels instead of failing.
    assert CouplingSpec("knn", "l1", "auto", "auto", 3) == CouplingSpec(method="knn", metric="l1", k=3)
    with pytest.raises(TypeError):
        CouplingSpec("knn", "l1", "auto", "auto", 3, False)  # type: ignore[misc]
    with pytest.raises(TypeError, match="check_finite"):
        CouplingSpec(check_finite=False)  # type: ignore[call-arg]


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
@pytest.mark.parametrize("method", ["lsa", "flip", "none"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_costs_before_and_after_equal_the_formula_for_the_returned_pairs(metric, method, precision):
    # cost_before/after are read back from the cost matrix. Oracle: the metric's formula in float64
    # on the pairs couple() returned. Catches: the diagonal of the flip cost (against -noise) taken
    # as "before", assigned entries read from the wrong rows/columns, half-precision cross terms
    # reported as distances, l1 flip distances read from the |x + n| costs. The last rows are
    # near-duplicates of their noise (distance ~1e-3 of the norms): there the GEMM form cancels.
    x0, noise = _data(40, 3, 4, 4, seed=40), torch.randn(40, 3, 4, 4, generator=_gen(41))
    noise[-4:] = x0[-4:] + 1e-4 * torch.randn(4, 3, 4, 4, generator=_gen(42))
    res = couple(x0, noise, method=method, metric=metric, precision=precision)
    ident = torch.arange(40)
    before = _formula_cost(x0, noise, metric)[ident, ident]
    after = _formula_cost(x0, res.noise, metric)[ident, ident]
    assert res.cost_before == pytest.approx(float(before.mean()), rel=1e-6)
    assert res.cost_after == pytest.approx(float(after.mean()), rel=1e-6)


def test_group_coupling_reports_the_formula_distances_of_its_pool_pairs():
    # The group path reads its before/after from its own cost rows (pool rows offset by the rank's
    # position). Oracle: the formula on the pool that draw_pool returns for the same seed and draw.
    from lightning_immiscible.distributed import couple_in_group
    from lightning_immiscible.groups import build_rank_group
    from lightning_immiscible.streams import draw_pool

    x0 = _data(24, 2, 3, 3, seed=43)
    for method in ("lsa", "flip"):
        res = couple_in_group(x0, build_rank_group("global"), 7, 3, CouplingSpec(method, precision="fp32"))
        pool = draw_pool(x0.shape, 7, 0, 3)
        ident = torch.arange(24)
        before = _formula_cost(x0, pool, "l2")[ident, ident].mean()
        after = _formula_cost(x0, pool[res.index], "l2")[ident, ident].mean()
        assert res.cost_before == pytest.approx(float(before), rel=1e-6)
        assert res.cost_after == pytest.approx(float(after), rel=1e-6)


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_non_finite_values_are_found_by_the_single_scan(metric):
    # The NaN/Inf check rides on the norms (l2) or one min/max scan (l1). Catches: an Inf hidden by
    # an overflow path (taken for a huge finite value and costed in float64), a NaN that slips
    # through one metric's path.
    x0, noise = _data(6, 5, seed=44), torch.randn(6, 5, generator=_gen(45))
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = noise.clone()
        broken[2, 3] = bad
        with pytest.raises(CouplingInputError, match="noise contains 1 NaN/Inf"):
            couple(x0, broken, metric=metric)


def test_one_pass_checks_report_ranges_and_norms_or_hand_over():
    # value_ranges: min/max per tensor with NaN/Inf visible (oracle: Python's min/max on the
    # values). norm_checked_dtype: the norms the cost uses (oracle: float64 sums of squares) when
    # fp32 is safe, None (so the inputs get scanned) for NaN, Inf and values whose fp32 costs would
    # overflow. Catches a NaN hidden by max() (torch.max propagates it, Python's does not), norms
    # returned in another dtype or of the wrong rows, and an overflow passed off as fp32.
    from lightning_immiscible.costs import norm_checked_dtype, value_ranges

    a, b = torch.tensor([[1.0, -3.0], [2.0, 0.5]]), torch.tensor([float("inf"), 0.0])
    assert value_ranges(a, torch.empty(0), b) == [(-3.0, 2.0), (0.0, 0.0), (0.0, float("inf"))]
    assert all(v != v for v in value_ranges(torch.tensor([0.0, float("nan")]))[0])  # NaN, NaN
    x, n = _data(5, 2, 3, seed=46), torch.randn(5, 2, 3, generator=_gen(47))
    dtype, (x_sq, n_sq) = norm_checked_dtype(x, n)
    assert dtype == torch.float32 and x_sq.dtype == torch.float32
    torch.testing.assert_close(x_sq.double(), x.double().square().sum((1, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(n_sq.double(), n.double().square().sum((1, 2)), rtol=1e-6, atol=0)
    assert norm_checked_dtype(x.double(), n)[0] == torch.float64
    for broken in (x * 1e19, x.masked_fill(x > 0.5, float("nan")), x.masked_fill(x > 0.5, float("inf"))):
        assert norm_checked_dtype(broken, n) is None


def _untouched(t: torch.Tensor, before: torch.Tensor) -> bool:
    return torch.equal(t.detach(), before) and t.requires_grad


def test_inputs_that_require_grad_are_coupled_detached_and_left_as_they_are():
    # An immiscible_data that returns an encoder's output: x0 requires grad (a non-leaf). Oracle:
    # the same coupling of detached copies. Catches: costs built from the attached x0 (every path
    # crashed in .numpy(): "Can't call numpy() on Tensor that requires grad"), res.noise carrying
    # the noise's graph, and x0 cut from its graph or modified in place.
    from lightning_immiscible.distributed import couple_in_group
    from lightning_immiscible.groups import build_rank_group
    from lightning_immiscible.workers import NOISE_KEY, CouplingCollate

    weight = torch.ones((), requires_grad=True)
    x0, noise = _data(12, 2, 3, seed=50) * weight, torch.randn(12, 2, 3, generator=_gen(51)).requires_grad_()
    before_x, before_n = x0.detach().clone(), noise.detach().clone()
    labels = torch.arange(12) % 3
    for condition in (None, labels):
        res = couple(x0, noise, condition=condition)
        ref = couple(before_x, before_n, condition=condition)
        assert torch.equal(res.index, ref.index) and not res.noise.requires_grad
    group = couple_in_group(x0, build_rank_group("global"), 0, 0, CouplingSpec())
    assert torch.equal(
        group.index, couple_in_group(before_x, build_rank_group("global"), 0, 0, CouplingSpec()).index
    )
    assert not group.noise.requires_grad
    worker = CouplingCollate(seed=0, collate_fn=lambda samples: x0)(list(range(12)))
    assert not worker[NOISE_KEY].requires_grad
    assert _untouched(x0, before_x) and _untouched(noise, before_n)
    (x0 * res.noise).sum().backward()  # the caller's graph still reaches the encoder's weights
    assert weight.grad is not None


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "l1"])
def test_values_whose_costs_overflow_float64_fail_naming_it(metric):
    # float64 data near 1e200 (l2, sqeuclidean: squared distances ~1e400) or float64's max / 2
    # (every metric): no cost can hold them. Catches NaN/Inf costs handed to a solver (a raw SciPy
    # "invalid numeric entries", or lapx silently pairing wrong), and a limit so loose that the GEMM
    # form's intermediates (||x||^2 + ||n||^2 + 2|x.n|) overflow although the distances would not.
    x0 = _data(6, 4, seed=52).double()
    noise = torch.randn(6, 4, generator=_gen(53), dtype=torch.float64).clamp(-1, 1)
    scales = [float(torch.finfo(torch.float64).max) / 2] + ([] if metric == "l1" else [1e200])
    for scale in scales:
        for condition in (None, torch.arange(6) % 2):
            with pytest.raises(CouplingInputError, match="overflow float64") as info:
                couple(x0 * scale, noise * scale, metric=metric, condition=condition)
            assert info.value.reason == "non_finite"
    # Just inside the limit: float64 costs, an optimal pairing. Oracle: the formula on the data
    # scaled back by the same power of two (exact).
    scale = 2.0**500 if metric != "l1" else 2.0**1000  # squared distances ~1e301 / distances ~1e301
    res = couple(x0 * scale, noise * scale, metric=metric)
    cost = _formula_cost(x0, noise, metric).numpy()
    rows, cols = linear_sum_assignment(cost)
    assert float(cost[rows, res.index.numpy()].sum()) == pytest.approx(
        float(cost[rows, cols].sum()), rel=1e-9
    )


def test_the_group_path_names_a_float64_overflow_before_any_exchange():
    # float64 data at 1e200: squared distances (~1e400 per value) overflow float64. The group path
    # must refuse it on the rank that holds it, with the overflow named, in the header exchange
    # (every rank learns it in the same step). Catches the check left to the last guard before the
    # solver, whose message only counts NaN/Inf cost entries after the rows were gathered.
    from lightning_immiscible.distributed import couple_in_group
    from lightning_immiscible.groups import build_rank_group

    x0 = _data(8, 4, seed=40).double() * 1e200
    assert not torch.isfinite((x0[:, None] - x0[None]).square().sum(-1)).all()  # the oracle: it overflows
    with pytest.raises(CouplingInputError, match=r"hold values up to .*e\+199 .* overflow float64"):
        couple_in_group(x0, build_rank_group("global"), seed=0, draw_index=0, spec=CouplingSpec())
