"""Coupling within each condition (labels): per-block optimality, the noise given each class, bad labels."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, TensorDataset

from lightning_immiscible import CouplingInputError, CouplingSpec, ImmiscibleCoupling, couple
from lightning_immiscible.distributed import couple_in_group
from lightning_immiscible.groups import build_rank_group
from lightning_immiscible.streams import draw_pool
from lightning_immiscible.workers import CouplingCollate, WorkerCoupling
from tests.helpers import ToyDiffusion, trainer


def _formula_cost(x: torch.Tensor, n: torch.Tensor, metric: str) -> np.ndarray:
    diff = x.double().reshape(len(x), 1, -1) - n.double().reshape(1, len(n), -1)
    per = {"l1": diff.abs().sum(-1), "sqeuclidean": diff.square().sum(-1)}.get(metric, diff.norm(dim=-1))
    return per.numpy()


def _blocks_by_hand(labels: torch.Tensor) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Label -> (its items in batch order, its pool positions): counts cumulated in label order."""
    out, start = {}, 0
    for c in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels.numpy() == c)
        out[c] = (rows, np.arange(start, start + len(rows)))
        start += len(rows)
    return out


@pytest.mark.parametrize(
    ("method", "metric"), [("lsa", "l2"), ("lsa", "sqeuclidean"), ("lsa", "l1"), ("flip", "l2")]
)
def test_each_condition_is_solved_optimally_within_its_own_block(method, metric):
    # Catches: an assignment across conditions (a noise taken from another label's block), a block
    # solved sub-optimally or with rows and columns mismatched, a data-dependent split of the pool,
    # and flip solved against +noise. Oracle: SciPy on each block's cost built from the formula.
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(40, 3, 2, generator=gen), torch.randn(40, 3, 2, generator=gen)
    labels = torch.randint(0, 5, (40,), generator=gen) * 7  # sparse, unsorted label values
    res = couple(x0, noise, method=method, metric=metric, condition=labels)
    assert sorted(res.index.tolist()) == list(range(40))
    torch.testing.assert_close(res.noise, noise[res.index], rtol=0, atol=0)
    for rows, cols in _blocks_by_hand(labels).values():
        assert set(res.index[rows].tolist()) == set(cols.tolist())
        target = -noise[cols] if method == "flip" else noise[cols]
        cost = _formula_cost(x0[rows], target, metric)
        r, c = linear_sum_assignment(cost)
        got = cost[np.arange(len(rows)), res.index[rows].numpy() - cols[0]].sum()
        assert got == pytest.approx(cost[r, c].sum(), rel=1e-6)


def test_without_a_split_the_same_labels_couple_across_classes():
    # Catches: within_condition=False still splitting (the comparison arm of the evidence would be
    # the conditional one); oracle: the unconditional coupling of the same batch.
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(24, 5, generator=gen), torch.randn(24, 5, generator=gen)
    labels = torch.randint(0, 3, (24,), generator=gen)
    across = CouplingSpec("lsa", within_condition=False).couple(x0, noise, labels)
    assert torch.equal(across.index, couple(x0, noise).index)
    assert across.prior_skew is not None


def test_knn_and_none_keep_their_pairing_with_a_condition():
    # Catches: knn or none re-paired by the labels (knn chooses per item among its own candidates;
    # none is the identity), which would change the baseline arm.
    gen = torch.Generator().manual_seed(2)
    x0, labels = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    cand, noise = torch.randn(12, 3, 4, generator=gen), torch.randn(12, 4, generator=gen)
    assert torch.equal(
        couple(x0, cand, method="knn", condition=labels).index, couple(x0, cand, method="knn").index
    )
    assert torch.equal(couple(x0, noise, method="none", condition=labels).index, torch.arange(12))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.zeros(8), "dtype torch.float32"),
        (torch.zeros(7, dtype=torch.long), "shape (7,) but the batch has 8 items"),
        (torch.zeros(8, 1, dtype=torch.long), "shape (8, 1)"),
        (torch.tensor([0, 1, -1, 0, 1, 0, 1, 0]), "negative labels"),
        ([0, 1, 0, 1, 0, 1, 0, 1], "must be a torch.Tensor"),
    ],
    ids=["float", "wrong_length", "two_dims", "negative", "list"],
)
def test_bad_labels_raise_a_message_that_says_what_to_fix(labels, message):
    # Catches: float labels silently truncated, a label tensor of another batch, negative ids.
    x0 = torch.randn(8, 4)
    with pytest.raises(CouplingInputError, match="integer class ids") as info:
        couple(x0, torch.randn_like(x0), condition=labels)
    assert message in str(info.value)


def test_one_process_group_coupling_equals_couple_on_the_same_pool_and_labels():
    # Catches: the group path (labels as an extra gathered column) disagreeing with couple(), and
    # labels >= 2**24 merged by float32 rows (2**24 and 2**24 + 1 are one float32 value).
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(30, 6, generator=gen)
    labels = 2**24 + torch.randint(0, 3, (30,), generator=gen)
    res = couple_in_group(x0, build_rank_group("global"), 5, 9, CouplingSpec("lsa"), condition=labels)
    pool = draw_pool((30, 6), 5, 0, 9)
    assert torch.equal(res.index, couple(x0, pool, condition=labels).index)
    for rows, cols in _blocks_by_hand(labels).values():
        assert set(res.index[rows].tolist()) == set(cols.tolist())


def _two_class_batches(batches: int, b: int = 32, d: int = 8, seed: int = 0):
    """Batches of two well-separated classes (means +-1.5 on every dimension), labels, noise."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.stack([torch.full((d,), -1.5), torch.full((d,), 1.5)])
    for _ in range(batches):
        labels = torch.randint(0, 2, (b,), generator=gen)
        yield (
            mu[labels] + 0.5 * torch.randn(b, d, generator=gen),
            labels,
            torch.randn(b, d, generator=gen),
            mu,
        )


def _lean_toward_own_class(spec: CouplingSpec, batches: int = 300) -> tuple[float, float, float]:
    """Over many batches: mean of sqrt(n_c) <mean noise of class c, unit (mu_c - mu)> (N(0,1) terms
    when the noise given each class is Gaussian and independent of the data), its null standard
    error, and the largest per-dimension |mean noise of a class| in units of its standard error."""
    terms, sums, counts = [], torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2)
    for x0, labels, noise, mu in _two_class_batches(batches):
        out = spec.couple(x0, noise, labels).noise.double()
        direction = (mu - mu.mean(0)) / (mu - mu.mean(0)).norm(dim=1, keepdim=True)
        for c in (0, 1):
            mine = out[labels == c]
            if len(mine):
                terms.append(math.sqrt(len(mine)) * float(mine.mean(0) @ direction[c].double()))
                sums[c] += mine.sum(0)
                counts[c] += len(mine)
    z_mean = (sums / counts[:, None]) * counts[:, None].sqrt()  # per dimension: N(0, 1) under the null
    return float(np.mean(terms)), 1 / math.sqrt(len(terms)), float(z_mean.abs().max())


def test_noise_given_each_class_has_mean_zero_and_no_lean_toward_the_class_only_within_conditions():
    # Catches: cross-class coupling (the statistic is then far from 0) and a split that depends on
    # the data. Thresholds from the null's standard error, computed here: 4.5 SE for the lean, and
    # 4.5 for the 16 per-dimension z-scores of the class noise means.
    within, se, z_within = _lean_toward_own_class(CouplingSpec("lsa"))
    across, _, z_across = _lean_toward_own_class(CouplingSpec("lsa", within_condition=False))
    assert abs(within) < 4.5 * se and z_within < 4.5
    assert across > 20 * se and z_across > 10


def test_the_prior_skew_diagnostic_is_about_zero_within_conditions_and_large_across():
    # Catches: a diagnostic with a non-zero null mean (e.g. noise means over the wrong items), a wrong
    # scale (the spread check), or one blind to cross-class coupling. Its per-batch null is N(0, 1),
    # so the mean over T batches has standard error 1 / sqrt(T).
    batches = 200
    skews = {}
    for name, spec in {
        "within": CouplingSpec("lsa"),
        "none": CouplingSpec("none"),
        "across": CouplingSpec("lsa", within_condition=False),
    }.items():
        skews[name] = [spec.couple(x, n, y).prior_skew for x, y, n, _ in _two_class_batches(batches, seed=7)]
    se = 1 / math.sqrt(batches)
    assert abs(np.mean(skews["within"])) < 4.5 * se and abs(np.mean(skews["none"])) < 4.5 * se
    assert 0.5 < np.std(skews["within"]) < 1.5  # about N(0, 1) per batch
    assert np.mean(skews["across"]) > 20 * se  # about 4 on this data


def test_prior_skew_matches_its_formula_on_one_batch():
    # Catches: a wrong normalisation (sqrt(n_c), sqrt(C)) or sign; oracle: the formula by hand.
    x0, labels, noise, _ = next(_two_class_batches(1, seed=3))
    res = CouplingSpec("lsa", within_condition=False).couple(x0, noise, labels)
    x, n = x0.double(), res.noise.double()
    terms = []
    for c in (0, 1):
        u = x[labels == c].mean(0) - x.mean(0)
        terms.append(
            math.sqrt(int((labels == c).sum())) * float(n[labels == c].mean(0) @ u) / float(u.norm())
        )
    assert res.prior_skew == pytest.approx(sum(terms) / math.sqrt(2), rel=1e-5)


class LabeledToy(ToyDiffusion):
    """ToyDiffusion whose batches carry three classes (`label % 3`) as the condition."""

    def __init__(self, bad: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def immiscible_condition(self, batch):
        labels = batch[1] % 3
        return labels.float() if self.bad else labels


@pytest.mark.parametrize("within", [True, False])
def test_the_callback_couples_within_the_module_labels_and_logs_the_prior_skew(within):
    # Catches: the callback ignoring immiscible_condition (or within_condition), labels of another
    # batch, and a prior_skew that is not logged. Oracle: couple() on the callback's pool, whose
    # per-block optimality is checked against SciPy above.
    module, cb = LabeledToy(), ImmiscibleCoupling(seed=4, within_condition=within)
    t = trainer(callbacks=[cb], max_steps=3)
    t.fit(module)
    for draw, rec in enumerate(module.records):
        labels = torch.arange(8 * draw, 8 * draw + 8) % 3
        pool = draw_pool(rec["x0"].shape, 4, 0, draw)
        expected = CouplingSpec("lsa", within_condition=within).couple(rec["x0"], pool, labels)
        assert torch.equal(rec["noise"], expected.noise)
    assert float(t.callback_metrics["immiscible/prior_skew"]) == pytest.approx(cb.last_result.prior_skew)


def test_bad_labels_from_the_module_stop_the_fit_with_the_fix():
    with pytest.raises(CouplingInputError, match=r"condition has dtype torch\.float32"):
        trainer(callbacks=[ImmiscibleCoupling(seed=0)], max_steps=1).fit(LabeledToy(bad=True))


def test_the_worker_collate_couples_within_its_labels_and_carries_them():
    # Catches: a collate that ignores condition_fn, labels dropped from the batch (a re-coupling on
    # the training process would then mix classes), and the diagnostic lost on the way.
    data = torch.randn(24, 5)
    collate = CouplingCollate("lsa", seed=2, condition_fn=lambda batch: batch[1] % 4)
    loader = DataLoader(TensorDataset(data, torch.arange(24)), batch_size=12, collate_fn=collate)
    for i, batch in enumerate(loader):
        worker = WorkerCoupling.from_batch(batch)
        x0, labels = worker.batch[0], worker.batch[1] % 4
        expected = couple(x0, collate.noise_for(x0, (0, 0, i)), condition=labels)
        assert torch.equal(worker.noise, expected.noise) and torch.equal(worker.condition, labels)
        assert worker.prior_skew == pytest.approx(expected.prior_skew)
        assert torch.equal(collate.couple_on(x0, (0, 0, i), worker.condition).noise, expected.noise)


def test_the_conditional_benchmark_runs_tiny_and_reports_both_couplings(tmp_path):
    # Catches: a benchmark that times the same coupling twice (the within-condition reduction must
    # differ from the one-assignment reduction on class-structured data) or writes no JSON.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import conditional as bench  # the script, from benchmarks/

    out = tmp_path / "c.json"
    result = bench.main(
        ["--batches", "32", "--conditions", "4", "--dim", "8", "--repeats", "1", "--json", str(out)]
    )
    row = result["rows"][0]
    assert (row["batch"], row["conditions"]) == (32, 4) and row["within_wall_ms"] > 0
    assert row["one_reduction_pct"] > row["within_reduction_pct"] > 0  # fewer choices within blocks
    assert json.loads(out.read_text())["rows"][0]["batch"] == 32


def test_the_preregistered_runner_resumes_and_reports_every_listed_comparison(tmp_path, monkeypatch):
    # Catches: a runner that retrains finished units on a rerun (not resumable), arms that are not
    # the listed ones (the ot arm must show the prior skew, ot-within must not: null SE of a run's
    # mean over its 4 batches is 1/2), and a report without the primary family.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import conditional_fm as runner  # the script, from benchmarks/
    from regimes_metrics import train_classifier

    monkeypatch.setattr(
        runner, "classifier_features", lambda n, x, y, c: train_classifier(x[:256], y[:256], 1)
    )
    runner.main(["--tiny", "--runs", str(tmp_path)])
    records = sorted(p.name for p in (tmp_path / "records").glob("*.json"))
    assert records == sorted(f"{a}-seed{s}.json" for a in runner.ARMS for s in (0, 1))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}
    result = runner.main(["--tiny", "--runs", str(tmp_path)])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # resumed: nothing retrained
    assert len(result["primary"]) == 4 and len(result["holm"]) == 4
    runs = [json.loads(p.read_text()) for p in stamps]
    skew = {a: [r["prior_skew_mean"] for r in runs if r["arm"] == a] for a in runner.ARMS}
    assert min(skew["ot"]) > 2.0 and max(abs(v) for v in skew["ot-within"] + skew["independent"]) < 2.5
    assert "Primary: ot-within vs ot" in (tmp_path / "report.md").read_text()


def test_worker_noise_coupled_without_the_module_labels_warns_once():
    # Catches: a module with labels fed by a collate without condition_fn, silently coupled across
    # classes (the worker's noise is used as it is).
    class WorkerFed(LabeledToy):
        def train_dataloader(self):
            data = TensorDataset(torch.rand(32, 12) * 2 - 1, torch.arange(32))
            return DataLoader(data, batch_size=8, collate_fn=CouplingCollate("lsa", seed=3))

    with pytest.warns(UserWarning, match="workers coupled across conditions") as record:
        trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=3).fit(WorkerFed())
    assert sum("workers coupled across conditions" in str(w.message) for w in record) == 1


def test_the_report_counts_a_better_class_accuracy_as_a_win():
    # Oracle: differences written by hand. Catches the committed report's first version, which
    # counted negative accuracy differences (A less accurate) as "A better".
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from conditional_fm_report import summary

    assert summary([-2.0, -1.0, 0.5])["a_better"] == 2  # FID: lower is better
    assert summary([0.10, 0.20, -0.05], lower_is_better=False)["a_better"] == 2  # accuracy


def test_the_docs_report_is_the_committed_records_rendered():
    # The results page's report is regenerated from the committed records, not edited by hand.
    # Catches a report left behind after the records or the report code changed.
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from conditional_fm import ARMS
    from conditional_fm_report import write_report

    out = root / "benchmarks" / "results" / "conditional_fm"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(out, Path(tmp) / "report.md", list(ARMS))
        rendered = (Path(tmp) / "report.md").read_text()
    assert rendered == (root / "docs" / "results" / "conditional_fm_report.md").read_text()
    assert rendered == (out / "report.md").read_text()
