"""The dataset-level map (`lightning_immiscible.semidiscrete`): its search, its fit, its convergence measure.

Oracles: a brute-force float64 `argmin_j |z - y_j|^2 - g_j`; in one dimension the semi-discrete map
from N(0, 1) to `N` points is monotone with cells at the normal quantiles `k / N`, and the hit
probabilities of any potentials are normal CDF differences between closed-form cell boundaries.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.semidiscrete import SemidiscreteMap


def brute_force(items: torch.Tensor, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """argmin_j |z - y_j|^2 - g_j in float64 (the map's definition)."""
    cost = torch.cdist(z.double(), items.double()).pow(2) - g.double()[None]
    return cost.argmin(1)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x.double() / math.sqrt(2)))


def cell_probabilities_1d(points: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Hit probabilities of the 1-D map under potentials g (points sorted, every cell non-empty)."""
    a, b = points[:-1].double(), points[1:].double()
    bounds = (b**2 - a**2 - g[1:].double() + g[:-1].double()) / (2 * (b - a))
    assert bool((bounds[1:] > bounds[:-1]).all()), "the test's potentials must leave every cell non-empty"
    edges = torch.cat([torch.tensor([-math.inf]), bounds, torch.tensor([math.inf])])
    return normal_cdf(edges[1:]) - normal_cdf(edges[:-1])


def test_assign_is_the_argmin_of_cost_minus_potential():
    # Catches: a sign error in the potential's term, a missing factor 1/2 in the inner-product
    # form, an off-by-one at a chunk boundary (chunk=7 splits the 40 items unevenly).
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(40, 2, 3, generator=gen)
    sd = SemidiscreteMap(data, seed=0)
    sd.potentials = torch.randn(40, generator=gen, dtype=torch.float64) * 3
    z = torch.randn(500, 2, 3, generator=gen)
    got = sd.assign(z, chunk=7)
    want = brute_force(data.reshape(40, -1), sd.potentials, z.reshape(500, -1))
    assert got.dtype == torch.int64 and got.shape == (500,)
    assert torch.equal(got, want)


def test_fitted_map_in_one_dimension_is_the_quantile_map():
    # The exact semi-discrete OT map from N(0, 1) to 5 points sends z to the point whose rank is
    # floor(5 Phi(z)). Catches: a fit that does not equalise the hits (wrong gradient sign, the
    # gradient taken at the averaged potentials instead of the iterate stalls it), a non-monotone map.
    points = torch.tensor([-2.0, -0.3, 0.1, 0.4, 3.0])
    sd = SemidiscreteMap(points[torch.tensor([3, 0, 4, 1, 2])][:, None], seed=1)  # unsorted items
    report = sd.fit(steps=3000, batch_size=512, lr=0.03, tol=None, check_every=1000)
    assert report.steps == 3000 and report.seconds > 0 and len(report.chi2) >= 1
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.2, 0.4, 0.6, 0.8]))
    z = torch.linspace(-3, 3, 601)
    near = (z[:, None] - quantiles[None]).abs().min(1).values < 0.08  # leave the boundaries' slack out
    rank_of_item = torch.argsort(torch.argsort(sd.items[:, 0]))
    got = rank_of_item[sd.assign(z[:, None])]
    want = torch.bucketize(z, quantiles)
    assert torch.equal(got[~near], want[~near])


def test_hit_chi2_matches_the_closed_form_in_one_dimension():
    # For fixed potentials the 1-D hit probabilities are known exactly. Catches a biased estimator
    # (sum c^2 / M^2 instead of sum c (c - 1) / (M (M - 1)) overstates by about N / M) and a wrong
    # normalisation (N sum p^2 - 1).
    points = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    sd = SemidiscreteMap(points[:, None], seed=2)
    sd.potentials = torch.tensor([0.5, -0.3, 0.0, 1.5], dtype=torch.float64)
    p = cell_probabilities_1d(points, sd.potentials)
    exact = float(4 * (p**2).sum() - 1)
    estimate = sd.hit_chi2(samples=400_000)
    # the U-statistic's standard error: 4/M Var(N p_a) + 2/M^2 Var(N 1[a = b])
    s2, s3, m = float((p**2).sum()), float((p**3).sum()), 400_000
    se = math.sqrt(4 * 16 * (s3 - s2**2) / m + 2 * 16 * s2 / m**2)
    assert exact > 0.1  # a clearly non-uniform map
    assert abs(estimate - exact) < 4 * se


def test_fitting_drives_the_hit_distribution_towards_uniform_on_digits_like_data():
    # 200 items in 64 dimensions with very different norms: the inner-product start is far from
    # uniform. Checked on fresh noise with the brute-force map, not the fit's own check sample.
    # Catches a fit that only looks converged on its own sample, and a divergent step size.
    gen = torch.Generator().manual_seed(3)
    data = torch.rand(200, 64, generator=gen) * torch.linspace(0.2, 2.0, 200)[:, None]
    sd = SemidiscreteMap(data, seed=3)

    def fresh_chi2() -> float:
        z = torch.randn(40_000, 64, generator=torch.Generator().manual_seed(99))
        counts = torch.bincount(brute_force(sd.items, sd.potentials, z), minlength=200).double()
        return float(200 * (counts * (counts - 1)).sum() / (40_000 * 39_999) - 1)

    start = fresh_chi2()
    report = sd.fit(steps=1500, batch_size=512, lr=0.1, tol=None, check_every=500)
    end = fresh_chi2()
    assert start > 1.0 and end < 0.1 * start and end < 0.2, (start, end, report.chi2)


def test_with_labels_every_draw_stays_in_its_class_and_classes_are_hit_by_their_share():
    # Catches matching across classes and a fit whose label draws ignore the class sizes (the
    # 30-item class must get 30 / 40 of the fitting noise: each item 1 / N).
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(40, 5, generator=gen)
    labels = torch.tensor([0] * 30 + [7] * 10)
    sd = SemidiscreteMap(data, labels, seed=4)
    sd.fit(steps=800, batch_size=256, lr=0.1, tol=None, check_every=400)
    z = torch.randn(300, 5, generator=gen)
    want = torch.randint(0, 2, (300,), generator=gen) * 7
    got = sd.assign(z, want)
    assert torch.equal(labels[got], want)
    for c in (0, 7):  # within a class: the brute-force map over that class's items
        rows, members = (want == c).nonzero().squeeze(1), (labels == c).nonzero().squeeze(1)
        brute = members[brute_force(data[members], sd.potentials[members], z[rows])]
        assert torch.equal(got[rows], brute)
    assert sd.hit_chi2(samples=100_000) < 0.2


def test_fit_resumes_exactly_across_calls_and_processes():
    # Catches a noise stream that restarts at each call (then fit(2) + fit(2) != fit(4)) and a
    # state_dict that loses the optimiser's moments or the step count.
    data = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    whole = SemidiscreteMap(data, seed=9)
    whole.fit(steps=40, batch_size=64, lr=0.3, tol=None, check_every=100)
    split = SemidiscreteMap(data, seed=9)
    split.fit(steps=25, batch_size=64, lr=0.3, tol=None, check_every=100)
    moved = SemidiscreteMap(data, seed=123)  # the seed comes from the state
    moved.load_state_dict(split.state_dict())
    moved.fit(steps=15, batch_size=64, lr=0.3, tol=None, check_every=100)
    assert moved.steps == whole.steps == 40
    assert torch.equal(moved.potentials, whole.potentials)


def test_fit_stops_at_tol_and_reports_it():
    data = torch.randn(20, 3, generator=torch.Generator().manual_seed(6))
    sd = SemidiscreteMap(data, seed=6)
    report = sd.fit(steps=5000, batch_size=256, lr=0.1, tol=0.05, check_every=50, check_samples=40_000)
    assert report.converged and report.steps < 5000 and report.chi2[-1][1] <= 0.05


def test_no_global_random_state_is_read_or_advanced():
    data = torch.randn(20, 3, generator=torch.Generator().manual_seed(7))
    before = torch.get_rng_state()
    sd = SemidiscreteMap(data, torch.arange(20) % 2, seed=0)
    sd.fit(steps=5, batch_size=32, check_every=5, check_samples=1000)
    sd.assign(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SemidiscreteMap(torch.arange(6).reshape(3, 2)), "floating tensor"),
        (lambda: SemidiscreteMap(torch.randn(1, 2)), "N >= 2"),
        (lambda: SemidiscreteMap(torch.tensor([[0.0], [math.nan]])), "NaN"),
        (lambda: SemidiscreteMap(torch.randn(3, 2), torch.zeros(2, dtype=torch.int64)), r"\(3,\) integer"),
        (lambda: SemidiscreteMap(torch.randn(3, 2), torch.zeros(3)), r"\(3,\) integer"),
        (lambda: SemidiscreteMap(torch.randn(3, 2)).assign(torch.randn(4, 3)), r"\(B, 2\)"),
        (
            lambda: SemidiscreteMap(torch.randn(3, 2)).assign(
                torch.randn(4, 2), torch.zeros(4, dtype=torch.int64)
            ),
            "without labels",
        ),
        (
            lambda: SemidiscreteMap(torch.randn(3, 2), torch.tensor([0, 0, 1])).assign(torch.randn(4, 2)),
            "pass labels",
        ),
        (
            lambda: SemidiscreteMap(torch.randn(3, 2), torch.tensor([0, 0, 1])).assign(
                torch.randn(2, 2), torch.tensor([0, 5])
            ),
            "label 5 has no items",
        ),
    ],
)
def test_bad_input_is_refused_with_what_to_do(build, match):
    with pytest.raises(CouplingInputError, match=match):
        build()


def test_a_state_from_other_data_is_refused():
    state = SemidiscreteMap(torch.randn(5, 2)).state_dict()
    with pytest.raises(ValueError, match="fitted on"):
        SemidiscreteMap(torch.randn(6, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        SemidiscreteMap(torch.randn(5, 2)).load_state_dict(state | {"version": 99})
