"""Real 2-process CPU DDP fits (gloo, ddp_fork): global = single-process, uneven, local, failures."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as torch_dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_immiscible.distributed as li_dist
from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.distributed import draw_pool
from tests.helpers import ToyDiffusion, trainer

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(180)]


class Dump(Callback):
    """Saves each rank's records (and any exception) to ``out/rank{r}.pt``."""

    def __init__(self, out, coupling):
        self.out, self.coupling = out, coupling

    def _save(self, trainer, pl_module, error=None):
        torch.save(
            {
                "records": pl_module.records,
                "seed": self.coupling.seed,
                "error": error,
                "calls": dict(getattr(li_dist.dist, "calls", {})),
                "bytes": dict(getattr(li_dist.dist, "bytes", {})),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )

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
            torch.save({"error": message}, self.out / f"error{trainer.global_rank}.pt")
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


@pytest.mark.parametrize("sizes", [(16, 16), (16, 12)], ids=["even", "uneven_last_batch"])
def test_global_coupling_equals_single_process_coupling_of_concatenated_batch(tmp_path, sizes):
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=None)
    ranks = _run(tmp_path, ToyDiffusion(sizes=sizes, batch_size=8), coupling, max_epochs=1)
    assert ranks[0]["seed"] == ranks[1]["seed"] is not None  # a random seed, shared by broadcast
    r0, r1 = ranks[0]["records"], ranks[1]["records"]
    assert len(r0) == len(r1) == 2
    local_sizes = [(a["x0"].shape[0], b["x0"].shape[0]) for a, b in zip(r0, r1, strict=True)]
    assert local_sizes == ([(8, 8), (8, 8)] if sizes == (16, 16) else [(8, 8), (8, 4)])
    for draw, (a, b) in enumerate(zip(r0, r1, strict=True)):
        x_all = torch.cat([a["x0"], b["x0"]])
        pool = draw_pool(x_all.shape, ranks[0]["seed"], group_index=0, draw_index=draw)
        expected = couple(x_all, pool, method="lsa")
        assert torch.equal(torch.cat([a["noise"], b["noise"]]), expected.noise)
        assert expected.reduction_pct > 0


@pytest.mark.parametrize(("scope", "method"), [("local", "lsa"), ("global", "knn")])
def test_local_scope_and_knn_make_no_collective_call(tmp_path, monkeypatch, scope, method):
    monkeypatch.setattr(li_dist, "dist", CountingDist())  # inherited by the forked ranks
    coupling = ImmiscibleCoupling(method=method, scope=scope, seed=5)
    ranks = _run(tmp_path, ToyDiffusion(sizes=(16, 16), batch_size=8), coupling, max_steps=2)
    for r, rank in enumerate(ranks):
        collectives = {k: v for k, v in rank["calls"].items() if k in CountingDist.COLLECTIVES}
        assert collectives == {}, f"rank {r} called {collectives}"
        assert len(rank["records"]) == 2
    if method == "lsa":  # each rank couples alone, with its own pool
        for r, rank in enumerate(ranks):
            for draw, rec in enumerate(rank["records"]):
                pool = draw_pool(rec["x0"].shape, 5, group_index=r, draw_index=draw)
                assert torch.equal(rec["noise"], couple(rec["x0"], pool).noise)
    assert not torch.equal(ranks[0]["records"][0]["noise"], ranks[1]["records"][0]["noise"])


@pytest.mark.parametrize("dim", [12, 3072])
def test_only_distance_rows_cross_the_network_never_noise_or_data(tmp_path, monkeypatch, dim):
    monkeypatch.setattr(li_dist, "dist", CountingDist())
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=5)
    module = ToyDiffusion(sizes=(16, 12), batch_size=8, dim=dim)  # steps: (8, 8) then (8, 4) items
    ranks = _run(tmp_path, module, coupling, max_steps=2)
    # per step: one header all_gather, one cost-row all_gather, one stats all_reduce
    assert ranks[0]["calls"] == ranks[1]["calls"] == {"all_gather": 4, "all_reduce": 2}
    header = 2 * li_dist.HEADER_SIZE * 8  # int64 header, once per step
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
    assert "collective of coupling group 0 (ranks [0, 1]) failed" in error
    assert "collective_timeout_s" in error


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
    assert again.seed == 8 and again.draws == 4
    for draw, rec in zip((2, 3), resumed.records, strict=True):  # draws 0-1 ran on two ranks
        pool = draw_pool(rec["x0"].shape, 8, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool).noise)


def test_auto_scope_probes_locally_then_adopts_the_largest_group_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(li_dist, "dist", CountingDist())
    coupling = ImmiscibleCoupling(method="lsa", scope="auto", seed=4, max_step_fraction=1e6)
    ranks = _run(tmp_path, ToyDiffusion(sizes=(64, 64), batch_size=8), coupling, max_steps=7)
    assert coupling.auto_group_size is None  # the parent process never trained; the ranks decided
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
    assert "x0 contains 1 NaN/Inf" in errors[1]
    assert "rank 1 got invalid input (non_finite)" in errors[0]


def test_partition_ranks_groups():
    assert li_dist.partition_ranks("global", 4, 2) == [(0, 1, 2, 3)]
    assert li_dist.partition_ranks("local", 4, 2) == [(0,), (1,), (2,), (3,)]
    assert li_dist.partition_ranks("node", 4, 2) == [(0, 1), (2, 3)]
    assert li_dist.partition_ranks(2, 4, 4) == [(0, 1), (2, 3)]
    assert li_dist.partition_ranks(8, 2, 2) == [(0, 1)]  # larger than the world: one group
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        li_dist.partition_ranks(3, 4, 4)
    pools = {li_dist.draw_pool((4, 3), 1, g, d).sum().item() for g in range(2) for d in range(2)}
    assert len(pools) == 4  # different per group and per draw
    assert torch.equal(li_dist.draw_pool((4, 3), 1, 0, 0), li_dist.draw_pool((4, 3), 1, 0, 0))
