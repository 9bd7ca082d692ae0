"""Real 2-process CPU DDP fits (gloo, ddp_fork): global = single-process, uneven, local, failures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist
from lightning.pytorch.callbacks import Callback

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

    def __getattr__(self, name):
        target = getattr(torch_dist, name)
        if name not in self.COLLECTIVES:
            return target

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
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


def test_global_scope_counts_only_header_rows_and_stats_collectives(tmp_path, monkeypatch):
    monkeypatch.setattr(li_dist, "dist", CountingDist())
    coupling = ImmiscibleCoupling(method="lsa", scope="global", seed=5)
    ranks = _run(tmp_path, ToyDiffusion(sizes=(16, 16), batch_size=8), coupling, max_steps=2)
    # per step: one header all_gather, one cost-row all_gather, one stats all_reduce
    assert ranks[0]["calls"] == {"all_gather": 4, "all_reduce": 2}


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
