"""Coupling within conditions on real CPU processes (gloo): 2 and 4 ranks equal one process; bad labels."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_immiscible import CouplingSpec, ImmiscibleCoupling, couple
from lightning_immiscible.distributed import couple_in_group
from lightning_immiscible.groups import build_rank_group, partition_ranks
from lightning_immiscible.streams import draw_pool
from tests.helpers import run_ranks, trainer
from tests.test_conditional import LabeledToy

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]

SIZES = (5, 9, 3, 7)  # uneven local batches
DRAWS = 2


def _local_batch(rank: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * draw + rank)
    labels = torch.randint(0, 4, (SIZES[rank],), generator=gen)
    return labels[:, None] * 0.7 + torch.randn(SIZES[rank], 6, generator=gen), labels


def _condition(rank: int, labels: torch.Tensor, fault: str | None) -> object:
    if fault is None or rank != 1:
        return labels
    faults = {"float": labels.float(), "negative": labels - 5, "missing": None, "int32": labels.int()}
    return {**faults, "huge": labels + 2**24}[fault]


def _rank_main(rank: int, world: int, port: int, scope, method: str, fault, queue) -> None:
    # A child forked from a process whose torch thread pool is already running (any earlier test ran a
    # matrix product) can hang in its first parallel op (seen here: every rank stuck in the cost
    # matrix's GEMM). One thread, set before any op, is what DataLoader workers do for the same reason.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = build_rank_group(scope, ranks_per_node=world, timeout_s=30)
        out = []
        for draw in range(DRAWS):
            x, labels = _local_batch(rank, draw)
            res = couple_in_group(
                x, group, 3, draw, CouplingSpec(method), condition=_condition(rank, labels, fault)
            )
            # numpy copies travel by value. A tensor travels as a file descriptor that the parent
            # fetches from this process, which fails once it has exited (FileNotFoundError, EOFError:
            # every time with torch 2.1 and 2.3 here, a race with any torch).
            out.append((res.index.numpy(), res.noise.numpy(), res.prior_skew))
        queue.put((rank, "ok", out))
    except Exception as exc:  # every rank reports its own error: the test compares them
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=1)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world: int, scope, method: str = "lsa", fault: str | None = None) -> dict[int, tuple[str, object]]:
    args_of = lambda r, port, queue: (r, world, port, scope, method, fault, queue)  # noqa: E731
    return run_ranks(_rank_main, args_of, world)


@pytest.mark.parametrize(
    ("world", "scope", "method"),
    [(2, "global", "lsa"), (4, "global", "lsa"), (4, 2, "lsa"), (4, "global", "flip"), (2, "local", "lsa")],
    ids=["2_global", "4_global", "4_int_groups", "4_flip", "2_local"],
)
def test_each_rank_gets_the_noise_one_process_gives_the_concatenated_group(world, scope, method):
    # Catches: labels lost or misaligned in the gathered rows (a rank solving with its own labels
    # only, a wrong row offset), a pool split that differs between ranks, per-rank blocks instead of
    # group-wide ones, and local scope communicating labels. Oracle: couple() of the group's
    # concatenated batch and labels on the group's pool, in one process.
    results = _run(world, scope, method)
    groups = partition_ranks(scope, world, world)
    for draw in range(DRAWS):
        for g, ranks in enumerate(groups):
            batches = [_local_batch(r, draw) for r in ranks]
            x = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])
            pool = draw_pool(x.shape, 3, g, draw)
            expected = couple(x, pool, method=method, condition=labels)
            offset = 0
            for r in ranks:
                status, out = results[r]
                assert status == "ok", out
                index, noise, skew = out[draw]
                assert torch.equal(torch.from_numpy(index), expected.index[offset : offset + SIZES[r]])
                torch.testing.assert_close(
                    torch.from_numpy(noise), expected.noise[offset : offset + SIZES[r]], rtol=0, atol=0
                )
                assert skew is not None
                offset += SIZES[r]


def test_labels_beyond_float32_on_one_rank_only_travel_exactly():
    # Rank 1's labels are 2**24 and up (not exact in float32 rows: 2**24 and 2**24 + 1 are one
    # float32 value), rank 0's are small. The need for float64 rows must travel in the header, so
    # both ranks gather float64 rows. Catches a rank deciding the rows' dtype from its own labels
    # alone (rank 0 gathers float32 against rank 1's float64: the gather fails or merges labels).
    # Oracle: couple() of the concatenated batch and labels on the group's pool.
    results = _run(2, "global", fault="huge")
    for draw in range(DRAWS):
        batches = [_local_batch(r, draw) for r in range(2)]
        x = torch.cat([b[0] for b in batches])
        labels = torch.cat([batches[0][1], batches[1][1] + 2**24])
        expected = couple(x, draw_pool(x.shape, 3, 0, draw), condition=labels)
        offset = 0
        for r in range(2):
            status, out = results[r]
            assert status == "ok", out
            assert torch.equal(torch.from_numpy(out[draw][0]), expected.index[offset : offset + SIZES[r]])
            offset += SIZES[r]


@pytest.mark.parametrize(
    ("fault", "rank1", "others"),
    [
        ("float", "condition has dtype torch.float32", "rank 1: CouplingInputError: condition has dtype"),
        ("negative", "negative labels", "rank 1: CouplingInputError: condition has negative labels"),
        ("missing", "1: 'none'", "1: 'none'"),
        ("int32", "1: 'torch.int32'", "1: 'torch.int32'"),
    ],
)
@pytest.mark.parametrize("scope", ["global", "local"])
def test_bad_labels_on_one_rank_fail_every_rank_in_the_same_step(fault, rank1, others, scope):
    # Catches: a rank that fails alone while the others wait in the cost-row gather (a hang until
    # the timeout), a condition given on one rank only being used on the others, and different
    # label dtypes gathered as if equal. The first draw must fail on every rank with the message.
    results = _run(4, scope, fault=fault)
    for rank, (status, message) in results.items():
        assert status == "error", f"rank {rank} did not fail"
        assert (rank1 if rank == 1 else others) in message


class SaveRecords(Callback):
    """Saves each rank's records and its logged prior skew to ``out/rank{r}.pt`` at the end of the fit."""

    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.records[-1]["skew"] = float(trainer.callback_metrics["immiscible/prior_skew"])
        pl_module.records[-1]["labels"] = batch[1] % 3

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.records, self.out / f"rank{trainer.global_rank}.pt")


def test_a_two_process_fit_couples_within_the_module_labels_over_the_group(tmp_path):
    # Catches: the callback not passing immiscible_condition to the group coupling under DDP (the
    # noise would then be the cross-class coupling), uneven last batches, and a prior skew that is
    # not logged on every rank. Oracle: couple() of the concatenated batch and labels.
    coupling = ImmiscibleCoupling(scope="global", seed=11)
    t = trainer(callbacks=[coupling, SaveRecords(tmp_path)], devices=2, strategy="ddp_fork",
                use_distributed_sampler=False, max_epochs=1)  # fmt: skip
    t.fit(LabeledToy(sizes=(16, 12), batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert [(a["x0"].shape[0], b["x0"].shape[0]) for a, b in zip(r0, r1, strict=True)] == [(8, 8), (8, 4)]
    for draw, (a, b) in enumerate(zip(r0, r1, strict=True)):
        x_all, labels = torch.cat([a["x0"], b["x0"]]), torch.cat([a["labels"], b["labels"]])
        expected = couple(x_all, draw_pool(x_all.shape, 11, 0, draw), condition=labels)
        assert torch.equal(torch.cat([a["noise"], b["noise"]]), expected.noise)
        assert math.isfinite(a["skew"]) and math.isfinite(b["skew"])
