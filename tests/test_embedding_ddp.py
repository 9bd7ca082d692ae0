"""Embedding conditions on 2 real CPU processes (gloo): the group equals one process; bad conditions."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from lightning_immiscible import CouplingSpec, couple
from lightning_immiscible.distributed import couple_in_group
from lightning_immiscible.groups import build_rank_group
from lightning_immiscible.streams import draw_pool
from tests.helpers import run_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]

SIZES = (11, 6)  # uneven local batches
DRAWS = 2
SPEC = CouplingSpec("lsa", "sqeuclidean", candidate_share=0.25)


def _local_batch(rank: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data and its `(b, 2)` embedding, which predicts the data's mean."""
    gen = torch.Generator().manual_seed(1000 * draw + rank)
    z = torch.randn(SIZES[rank], 2, generator=gen)
    return z.repeat(1, 3) + 0.5 * torch.randn(SIZES[rank], 6, generator=gen), z


def _condition(rank: int, z: torch.Tensor, fault: str | None) -> object:
    if fault is None or rank != 1:
        return z
    nan = z.clone()
    nan[0, 0] = float("nan")
    faults = {"shape": torch.cat([z, z[:1]]), "nan": nan, "width": torch.cat([z, z[:, :1]], 1)}
    return {**faults, "labels": torch.zeros(len(z), dtype=torch.long)}[fault]


def _rank_main(rank: int, port: int, fault: str | None, queue) -> None:
    torch.set_num_threads(1)  # a forked child's first parallel op can hang otherwise: test_conditional_ddp
    draw = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = build_rank_group("global", ranks_per_node=2, timeout_s=30)
        out = []
        for draw in range(DRAWS):
            x, z = _local_batch(rank, draw)
            res = couple_in_group(x, group, 3, draw, SPEC, condition=_condition(rank, z, fault))
            out.append((res.index.numpy(), res.condition_weight, res.candidate_share, res.condition_leak))
        queue.put((rank, "ok", out))
    except Exception as exc:  # every rank reports its own error and the draw it failed at
        queue.put((rank, "error", (draw, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=1)}")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(fault: str | None = None) -> dict[int, tuple[str, object]]:
    return run_ranks(_rank_main, lambda r, port, queue: (r, port, fault, queue))


def test_each_rank_gets_the_pairing_and_weight_one_process_gives_the_concatenated_batch():
    # Catches: conditions lost or misaligned in the gathered rows (a rank weighing with its own
    # conditions only, a wrong column split), a weight searched on one rank's rows, and ranks that
    # find different weights. Oracle: couple() of the concatenated batch and conditions on the
    # group's pool, in one process.
    results = _run()
    for draw in range(DRAWS):
        batches = [_local_batch(r, draw) for r in range(2)]
        x, z = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        expected = SPEC.couple(x, draw_pool(x.shape, 3, 0, draw), z)
        offset = 0
        for r in range(2):
            status, out = results[r]
            assert status == "ok", out
            index, weight, share, leak = out[draw]
            assert torch.equal(torch.from_numpy(index), expected.index[offset : offset + SIZES[r]])
            # Each rank costs its own rows, couple() the full matrix: equal up to rounding. Between
            # the ranks, which solve the same gathered matrix, exactly equal.
            assert weight == pytest.approx(expected.condition_weight, rel=1e-6)
            assert share == pytest.approx(expected.candidate_share, abs=1e-3)
            assert (weight, share) == results[0][1][draw][1:3]
            assert leak is not None  # from this rank's own items: see couple_in_group
            offset += SIZES[r]
    assert expected.condition_weight > 0
    assert not torch.equal(expected.index, couple(x, draw_pool(x.shape, 3, 0, DRAWS - 1)).index)


@pytest.mark.parametrize(
    ("fault", "rank1", "rank0"),
    [
        ("shape", "condition has shape (7, 2) but the batch has 6", "rank 1: CouplingInputError: condition"),
        ("nan", "condition contains 1 NaN/Inf", "rank 1: CouplingInputError: condition contains 1 NaN/Inf"),
        ("width", "1: 'embedding (B, 3)'", "1: 'embedding (B, 3)'"),
        ("labels", "1: 'torch.int64'", "1: 'torch.int64'"),
    ],
)
def test_a_bad_condition_on_one_rank_fails_both_ranks_in_the_same_step_naming_it(fault, rank1, rank0):
    # Catches: a rank that fails alone while the other waits in the cost-row gather (a hang until
    # the timeout), rows of different widths gathered (E differs), and an embedding on one rank
    # read as labels on the other. Both ranks must fail at the first draw, with rank 1 named.
    results = _run(fault)
    for rank, (status, payload) in results.items():
        assert status == "error", f"rank {rank} did not fail"
        draw, message = payload
        assert draw == 0 and (rank1 if rank == 1 else rank0) in message
