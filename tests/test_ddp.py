"""Real 2-process CPU DDP fits (gloo, ddp_fork): global = single-process, uneven, local, failures."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_immiscible.distributed as li_dist
import lightning_immiscible.groups as li_groups
import lightning_immiscible.protocol as li_protocol
from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.mixin import hand_off
from lightning_immiscible.streams import draw_pool
from lightning_immiscible.workers import CouplingCollate
from tests.helpers import ResumableLoader, ToyDiffusion, trainer

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(180)]

SOLVER_CALLS: list[str] = []  # filled in the forked ranks by test_auto_solver_race_...


class Dump(Callback):
    """Saves each rank's records (and any exception) to ``out/rank{r}.pt``."""

    def __init__(self, out, coupling):
        self.out, self.coupling = out, coupling

    def _save(self, trainer, pl_module, error=None):
        torch.save(
            {
                "records": pl_module.records,
                "seed": self.coupling.resolved_seed,
                "auto_group_size": self.coupling.auto_group_size,
                "race": self.coupling.race.state_dict(),
                "solver_calls": list(SOLVER_CALLS),
                "error": error,
                "calls": dict(getattr(li_dist.dist, "calls", {})),
                "bytes": dict(getattr(li_dist.dist, "bytes", {})),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("immiscible/")}
        pl_module.records[-1]["logged"] = logged

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)


class RecordingCoupling(ImmiscibleCoupling):
    """Saves the error a rank raises inside the coupling (the launcher only re-raises one)."""

    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        try:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            # Written whole or not at all: the launcher may end this rank mid-write.
            tmp = self.out / f"error{trainer.global_rank}.tmp"
            torch.save({"error": message}, tmp)
            os.replace(tmp, self.out / f"error{trainer.global_rank}.pt")
            raise


class CountingDist:
    """Stands in for ``torch.distributed`` inside the library and counts collective calls."""

    COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "new_group", "all_gather_object", "barrier")

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __getattr__(self, name):
        target = getattr(torch_dist, name)
        if name not in self.COLLECTIVES:
            return target

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            sent = args[1] if name == "all_gather" else args[0] if args else None
            if isinstance(sent, torch.Tensor):
                self.bytes[name] = self.bytes.get(name, 0) + sent.numel() * sent.element_size()
            return target(*args, **kwargs)

        return counted


def count_collectives(monkeypatch) -> CountingDist:
    """Counts the library's collectives (every module that issues one), in the forked ranks too."""
    counting = CountingDist()
    for module in (li_dist, li_groups, li_protocol):
        monkeypatch.setattr(module, "dist", counting)
    return counting


def _run(tmp_path, module, coupling, **kwargs):
    t = trainer(
        callbacks=[coupling, Dump(tmp_path, coupling)],
        devices=2,
        strategy="ddp_fork",
        use_distributed_sampler=False,  # each rank has its own data (uneven sizes)
        **kwargs,
    )
    t.fit(module)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _formula_mean_distance(x: torch.Tensor, n: torch.Tensor, metric: str) -> float:
    diff = (x.double() - n.double()).reshape(len(x), -1)
    per_item = {"l1": diff.abs().sum(1), "sqeuclidean": diff.square().sum(1)}.get(metric, diff.norm(dim=1))
    return float(per_item.mean())


@pytest.mark.parametrize(
    ("sizes", "method", "metric"),
    [
        ((16, 16), "lsa", "l2"),
        ((16, 12), "lsa", "l2"),
        ((16, 12), "flip", "l2"),
        ((16, 12), "lsa", "sqeuclidean"),
        ((16, 12), "lsa", "l1"),
    ],
    ids=["even", "uneven_last_batch", "flip", "sqeuclidean", "l1"],
)
def test_global_coupling_equals_single_process_coupling_of_concatenated_batch(
    tmp_path, sizes, method, metric
):
    # Catches: a rank coupling only its own rows (or a wrong row offset in the gathered matrix), a
    # method or metric lost on the way to the ranks (flip / sqeuclidean / l1 through the callback),
    # and logged costs that are this rank's instead of the group's (the oracle is the formula on
    # the concatenated batch).
    coupling = ImmiscibleCoupling(method=method, metric=metric, scope="global", seed=None)
    ranks = _run(tmp_path, ToyDiffusion(sizes=sizes, batch_size=8), coupling, max_epochs=1)
    assert ranks[0]["seed"] == ranks[1]["seed"] is not None  # a random seed, shared by broadcast
    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    assert len(r0) == len(r1) == 2
    local_sizes = [(a["x0"].shape[0], b["x0"].shape[0]) for a, b in zip(r0, r1, strict=True)]
    assert local_sizes == ([(8, 8), (8, 8)] if sizes == (16, 16) else [(8, 8), (8, 4)])
    for draw, (a, b) in enumerate(zip(r0, r1, strict=True)):
        x_all = torch.cat([a["x0"], b["x0"]])
        pool = draw_pool(x_all.shape, ranks[0]["seed"], group_index=0, draw_index=draw)
        expected = couple(x_all, pool, method=method, metric=metric)
        noise_all = torch.cat([a["noise"], b["noise"]])
        assert torch.equal(noise_all, expected.noise)
        assert expected.reduction_pct < 0 if method == "flip" else expected.reduction_pct > 0
        before = _formula_mean_distance(x_all, pool, metric)
        after = _formula_mean_distance(x_all, noise_all, metric)
        for rec in (a, b):  # the logged values are the group's, identical on both ranks
            assert rec["logged"]["immiscible/cost_before"] == pytest.approx(before, rel=1e-5)
            assert rec["logged"]["immiscible/cost_after"] == pytest.approx(after, rel=1e-5)
            assert rec["logged"]["immiscible/group_size"] == 2


def _knn_oracle_candidates(shape, seed: int, rank: int, draw: int) -> torch.Tensor:
    """Rank ``rank``'s knn candidates as documented: a torch.Generator seeded from the 63-bit value
    NumPy's SeedSequence([seed, stream=1, rank, draw]) yields (written out here, not imported)."""
    words = np.random.SeedSequence([seed, 1, rank, draw]).generate_state(2)
    gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize(("scope", "method"), [("local", "lsa"), ("global", "knn")])
def test_local_scope_and_knn_exchange_only_a_header(tmp_path, monkeypatch, scope, method):
    # Both ranks get the same data: if the ranks drew the same pool / candidates (rank missing from
    # the seed) their noise would be equal. knn's oracle rebuilds each rank's candidates from the
    # seed and the rank. The only collective is the per-step header (so bad input on one rank fails
    # all ranks): catches noise or cost rows crossing the network for local coupling.
    count_collectives(monkeypatch)  # inherited by the forked ranks
    coupling = ImmiscibleCoupling(method=method, scope=scope, seed=5, k=4)
    ranks = _run(tmp_path, ToyDiffusion(sizes=(16, 16), batch_size=8, same_data=True), coupling, max_steps=2)
    for rank in ranks:
        collectives = {k: v for k, v in rank["calls"].items() if k in CountingDist.COLLECTIVES}
        assert collectives == {"all_gather": 2}  # one header per step
        assert rank["bytes"] == {"all_gather": 2 * li_protocol.HEADER_SIZE * 8}
        assert len(rank["records"]) == 2
    for r, rank in enumerate(ranks):
        for draw, rec in enumerate(rank["records"]):
            if method == "lsa":  # each rank couples alone, with its own pool
                pool = draw_pool(rec["x0"].shape, 5, group_index=r, draw_index=draw)
                assert torch.equal(rec["noise"], couple(rec["x0"], pool).noise)
            else:
                cand = _knn_oracle_candidates((8, 4, 12), 5, r, draw)
                dist = (rec["x0"][:, None] - cand).norm(dim=-1)
                assert torch.equal(rec["noise"], cand[torch.arange(8), dist.argmin(1)])
    assert torch.equal(ranks[0]["records"][0]["x0"], ranks[1]["records"][0]["x0"])
    assert not torch.equal(ranks[0]["records"][0]["noise"], ranks[1]["records"][0]["noise"])


@pytest.mark.parametrize("dim", [12, 3072])
def test_only_distance_rows_cross_the_network_never_noise_or_data(tmp_path, monkeypatch, dim):
    count_collectives(monkeypatch)
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=5)
    module = ToyDiffusion(sizes=(16, 12), batch_size=8, dim=dim)  # steps: (8, 8) then (8, 4) items
    ranks = _run(tmp_path, module, coupling, max_steps=2)
    # per step: one header all_gather, one cost-row all_gather, one stats all_reduce
    assert ranks[0]["calls"] == ranks[1]["calls"] == {"all_gather": 4, "all_reduce": 2}
    header = 2 * li_protocol.HEADER_SIZE * 8  # int64 header, once per step
    rows = (8 * 16 + 8 * 12) * 4  # each rank sends max(b_r) x B fp32 rows: B=16, then B=12
    stats = 2 * 3 * 8  # sums before / after and the count, float64
    expected = {"all_gather": header + rows, "all_reduce": stats}
    assert ranks[0]["bytes"] == ranks[1]["bytes"] == expected  # O(B^2), independent of dim


def test_collective_timeout_names_the_group_instead_of_hanging(tmp_path):
    class LateRankOne(RecordingCoupling):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1:
                time.sleep(6)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    coupling = LateRankOne(tmp_path, method="lsa", scope="global", seed=1, collective_timeout_s=2)
    t = trainer(callbacks=[coupling], devices=2, strategy="ddp_fork", max_steps=1)
    with pytest.raises(Exception):  # noqa: B017 - the launcher re-raises one rank's error
        t.fit(ToyDiffusion(sizes=(16,), batch_size=8))
    error = torch.load(tmp_path / "error0.pt")["error"]
    # A real time-out is named as one (not as a crash), with the group and the option that bounds it.
    assert "header all_gather of coupling group 0 (ranks [0, 1])" in error
    assert "did not reach it in time" in error and "collective_timeout_s" in error


def test_resume_on_a_different_world_size_continues_the_draw_counter(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=8)
    t = trainer(
        callbacks=[coupling, ckpt], devices=2, strategy="ddp_fork", max_steps=2, enable_checkpointing=True
    )
    t.fit(ToyDiffusion(sizes=(32,), batch_size=8))
    path = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    resumed, again = ToyDiffusion(sizes=(32,), batch_size=8), ImmiscibleCoupling(method="lsa", seed=0)
    trainer(callbacks=[again], max_steps=4).fit(resumed, ckpt_path=path)  # one process now
    assert again.resolved_seed == 8 and again.draws == 4
    for draw, rec in zip((2, 3), resumed.records, strict=True):  # draws 0-1 ran on two ranks
        pool = draw_pool(rec["x0"].shape, 8, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool).noise)


def test_auto_scope_probes_locally_then_adopts_the_largest_group_that_fits(tmp_path, monkeypatch):
    # A rank-dependent measurement (rank 1 would choose groups of 1): every rank must adopt rank 0's
    # decision. Catches ranks that decide the group size on their own measurements.
    from lightning_immiscible import callback as li_callback

    real = li_callback.choose_group_size

    def rank_dependent(*args, **kwargs):
        decision = real(*args, **kwargs)
        return decision if torch_dist.get_rank() == 0 else dataclasses.replace(decision, size=1)

    monkeypatch.setattr(li_callback, "choose_group_size", rank_dependent)
    count_collectives(monkeypatch)
    coupling = ImmiscibleCoupling(method="lsa", scope="auto", seed=4, max_step_fraction=1e6)
    ranks = _run(tmp_path, ToyDiffusion(sizes=(64, 64), batch_size=8), coupling, max_steps=7)
    assert coupling.auto_group_size is None  # the parent process never trained; the ranks decided
    assert ranks[0]["auto_group_size"] == ranks[1]["auto_group_size"] == 2
    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    probe = 4  # local coupling while measuring (warm-up batches + 1)
    for draw in range(probe):
        for r, recs in enumerate((r0, r1)):
            pool = draw_pool(recs[draw]["x0"].shape, 4, group_index=r, draw_index=draw)
            assert torch.equal(recs[draw]["noise"], couple(recs[draw]["x0"], pool).noise)
    for draw in range(probe, 7):  # then one group of both ranks
        x_all = torch.cat([r0[draw]["x0"], r1[draw]["x0"]])
        pool = draw_pool(x_all.shape, 4, group_index=0, draw_index=draw)
        assert torch.equal(torch.cat([r0[draw]["noise"], r1[draw]["noise"]]), couple(x_all, pool).noise)


def test_auto_solver_race_decides_alike_on_every_rank_from_the_groups_times(tmp_path, monkeypatch):
    # Rank 1's timings favour the other solver ("a" sleeps 40 ms there, 0 on rank 0): both ranks must
    # solve every batch with the same solver (both in the race, then the group's winner "b": per round
    # the slowest rank's time, a = 40 ms > b = 10 ms, counted from the same header rows on each rank),
    # and the noise is the exact single-process coupling of the concatenated batch. Catches ranks that
    # decide on their own timings (rank 0 would keep "a" and disagree with rank 1 on every later batch).
    import lightning_immiscible.solver_race as solver_race
    from lightning_immiscible.solvers import SOLVERS, SolverSpec, solve_scipy

    monkeypatch.setattr(solver_race, "RACE_MIN_POOL", 2)  # the forked ranks race pools of 16

    def racer(name, sleep_on_rank1):
        def fn(cost):
            SOLVER_CALLS.append(name)
            time.sleep(sleep_on_rank1 if torch_dist.get_rank() == 1 else 0.0)
            time.sleep(0.01 if name == "b" else 0.0)
            return solve_scipy(cost)

        return SolverSpec(name, fn, exact=True, priority=-2 if name == "b" else -3)

    monkeypatch.setitem(SOLVERS, "a", racer("a", 0.04))
    monkeypatch.setitem(SOLVERS, "b", racer("b", 0.0))
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=6)
    module = ToyDiffusion(sizes=(80, 80), batch_size=8, dim=100)
    ranks = _run(tmp_path, module, coupling, max_steps=9)
    # both race on the first 4 batches (who goes first alternates), then the group's winner
    expected = ["a", "b", "b", "a"] * 2 + ["b"] * 5
    assert ranks[0]["solver_calls"] == ranks[1]["solver_calls"] == expected
    decided = {"decided": [[16, 100, "l2", "b"]], "raced": 4}
    assert ranks[0]["race"] == ranks[1]["race"] == decided
    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    for draw, (a, b) in enumerate(zip(r0, r1, strict=True)):
        x_all = torch.cat([a["x0"], b["x0"]])
        pool = draw_pool(x_all.shape, 6, group_index=0, draw_index=draw)
        assert torch.equal(torch.cat([a["noise"], b["noise"]]), couple(x_all, pool, solver="scipy").noise)


def test_choose_group_size_respects_the_budget():
    from lightning_immiscible.sizing import candidate_sizes, choose_group_size

    assert candidate_sizes(8) == [1, 2, 4, 8] and candidate_sizes(6) == [1, 2, 3, 6]
    roomy = choose_group_size(8, 16, (3, 8, 8), step_ms=1e6, fraction=0.5)
    assert roomy.size == 8 and set(roomy.timings_ms) == {1, 2, 4, 8}
    tight = choose_group_size(8, 16, (3, 8, 8), step_ms=1e-6, fraction=0.5)
    assert tight.size == 1 and "chose groups of 1 rank" in tight.describe()


class NaNOnRankOne(ToyDiffusion):
    def immiscible_data(self, batch):
        x = batch[0]
        if self.global_rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        return x


def test_bad_input_on_one_rank_fails_all_ranks_without_hanging(tmp_path):
    coupling = RecordingCoupling(tmp_path, method="lsa", scope="global", seed=1)
    t = trainer(callbacks=[coupling], devices=2, strategy="ddp_fork", max_steps=1)
    with pytest.raises(Exception, match=r"NaN/Inf|invalid input"):
        t.fit(NaNOnRankOne(sizes=(16,), batch_size=8))
    errors = [torch.load(tmp_path / f"error{r}.pt")["error"] for r in range(2)]
    # Both ranks carry rank 1's own message, naming rank 1 (catches the healthy rank getting only
    # a generic "another rank failed", or the failing rank's error replaced by a collective's).
    for error in errors:
        assert "rank 1: CouplingInputError: x0 contains 1 NaN/Inf" in error


def test_partition_ranks_groups():
    assert li_groups.partition_ranks("global", 4, 2) == [(0, 1, 2, 3)]
    assert li_groups.partition_ranks("local", 4, 2) == [(0,), (1,), (2,), (3,)]
    assert li_groups.partition_ranks("node", 4, 2) == [(0, 1), (2, 3)]
    assert li_groups.partition_ranks(2, 4, 4) == [(0, 1), (2, 3)]
    assert li_groups.partition_ranks(8, 2, 2) == [(0, 1)]  # larger than the world: one group
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        li_groups.partition_ranks(3, 4, 4)
    pools = {draw_pool((4, 3), 1, g, d).sum().item() for g in range(2) for d in range(2)}
    assert len(pools) == 4  # different per group and per draw
    assert torch.equal(draw_pool((4, 3), 1, 0, 0), draw_pool((4, 3), 1, 0, 0))


class WorkerFed(ToyDiffusion):
    """Couples in DataLoader workers (CouplingCollate); every rank gets the same data."""

    def __init__(self, num_workers: int, **kwargs):
        super().__init__(same_data=True, **kwargs)
        self.num_workers = num_workers

    def train_dataloader(self):
        collate = CouplingCollate("lsa", seed=5)  # built per rank, after the process group exists
        return DataLoader(self._dataset(), batch_size=8, num_workers=self.num_workers, collate_fn=collate)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.records[-1]["position"] = hand_off(self).worker.position
        self.records[-1]["expected"] = (self.global_rank, self.current_epoch, batch_idx)
        return loss


def _worker_oracle(x0: torch.Tensor, rank: int, epoch: int, index: int) -> torch.Tensor:
    """The documented worker stream, written out: SeedSequence([seed, 2, rank, epoch, index])."""
    words = np.random.SeedSequence([5, 2, rank, epoch, index]).generate_state(2)
    gen = torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))
    return couple(x0, torch.randn(x0.shape, generator=gen)).noise


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_coupling_draws_per_rank_noise_reproducible_from_the_seed(tmp_path, num_workers):
    # Both ranks see identical batches. Before the rank was part of the worker stream, both drew
    # the same noise (num_workers=0: identical seeds; workers: worker seeds from a base seed that
    # equal RNG states make equal on every rank). The oracle rebuilds each batch's noise from
    # (seed, rank, epoch, batch index); epoch 1 must get new noise (set_epoch reaches the workers).
    coupling = ImmiscibleCoupling(method="lsa", scope="local", seed=1)
    ranks = _run(tmp_path, WorkerFed(num_workers, sizes=(16, 16)), coupling, max_epochs=2)
    for r, rank in enumerate(ranks):
        assert len(rank["records"]) == 4
        for i, rec in enumerate(rank["records"]):
            epoch, index = divmod(i, 2)
            assert rec["position"] == rec["expected"] == (r, epoch, index)  # coupled in the worker
            assert torch.equal(rec["noise"], _worker_oracle(rec["x0"], r, epoch, index))
    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    for a, b in zip(r0, r1, strict=True):
        assert torch.equal(a["x0"], b["x0"]) and not torch.equal(a["noise"], b["noise"])
    assert not torch.equal(r0[0]["noise"], r0[2]["noise"])  # same data, next epoch: new noise


class ResumableFed(ToyDiffusion):
    """Per-rank data through a resumable loader; optionally coupled in the loader (num_workers=0)."""

    def __init__(self, worker: bool, **kwargs):
        super().__init__(**kwargs)
        self.worker = worker

    def train_dataloader(self):
        collate = CouplingCollate("lsa", seed=5) if self.worker else None
        return ResumableLoader(self._dataset(), batch_size=8, collate_fn=collate)


@pytest.mark.parametrize("worker", [False, True], ids=["callback", "worker"])
def test_ddp_resume_mid_epoch_draws_the_same_noise_on_every_rank(tmp_path, worker):
    # 2 ranks, 4 batches per epoch: interrupted after 2 steps (mid-epoch), resumed to 6 steps.
    # Every later step's noise on every rank must equal the uninterrupted run's element-wise.
    # Catches a draw counter, seed or worker stream position that is not restored on all ranks.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    runs = {}
    for name, steps, path in [("first", 2, None), ("resumed", 6, "ckpt"), ("uninterrupted", 6, None)]:
        out = tmp_path / name
        out.mkdir()
        coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=3)
        callbacks = [coupling, Dump(out, coupling)] + ([ckpt] if name == "first" else [])
        t = trainer(callbacks=callbacks, devices=2, strategy="ddp_fork", max_steps=steps,
                    use_distributed_sampler=False, enable_checkpointing=name == "first")  # fmt: skip
        ckpt_path = next((tmp_path / "ckpt").glob("*step=2*.ckpt")) if path else None
        t.fit(ResumableFed(worker, sizes=(32, 32)), ckpt_path=ckpt_path)
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=False)["records"] for r in range(2)]
    for r in range(2):
        interrupted = runs["first"][r] + runs["resumed"][r]
        assert len(interrupted) == len(runs["uninterrupted"][r]) == 6
        for a, b in zip(interrupted, runs["uninterrupted"][r], strict=True):
            assert torch.equal(a["x0"], b["x0"])
            assert torch.equal(a["noise"], b["noise"])
    assert not torch.equal(runs["uninterrupted"][0][3]["noise"], runs["uninterrupted"][1][3]["noise"])
