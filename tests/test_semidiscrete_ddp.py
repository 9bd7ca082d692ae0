"""Fitting a dataset-level map on 2 real CPU processes (gloo): shared potentials, a failing rank."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from lightning_immiscible.semidiscrete import SemidiscreteMap
from tests.helpers import run_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]


def _data() -> torch.Tensor:
    return torch.randn(30, 4, generator=torch.Generator().manual_seed(0))


class FailsAtStep3(SemidiscreteMap):
    """A map whose search fails at fitting step 3 (the fault, on rank 1 only)."""

    def hits(self, noise, labels=None, potentials=None):
        if self.steps == 3:
            raise MemoryError("rank 1 ran out of memory in its search")
        return super().hits(noise, labels, potentials)


def _rank_main(rank: int, port: int, fault: bool, queue) -> None:
    torch.set_num_threads(1)  # a forked child's first parallel op can hang otherwise
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

        def reduce(v: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(v)
            return v

        sd = (FailsAtStep3 if fault and rank == 1 else SemidiscreteMap)(_data(), seed=5)
        sd.fit(steps=6, batch_size=64, tol=None, check_every=100, rank=rank, reduce=reduce)
        # plain floats (exact for float64): a tensor would travel as shared memory that the
        # exiting child can take with it before the parent reads it (an EOFError in the parent)
        queue.put((rank, "ok", sd.potentials.tolist()))
    except Exception as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=1)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(fault: bool) -> dict[int, tuple[str, object]]:
    return run_ranks(_rank_main, lambda r, port, queue: (r, port, fault, queue))


def test_ranks_fit_the_same_potentials_from_their_summed_hits():
    # Both ranks must hold bitwise the same potentials, and not those of a rank fitting alone on its
    # own stream. Catches a reduce that is skipped (rank 0 would equal the lone fit, rank 1 differ)
    # and ranks drawing the same fitting noise (summed hits = twice one rank's: again the lone fit).
    results = _run(fault=False)
    assert [results[r][0] for r in range(2)] == ["ok", "ok"], results
    shared = [torch.tensor(results[r][1], dtype=torch.float64) for r in range(2)]
    assert torch.equal(shared[0], shared[1])
    for rank in range(2):
        alone = SemidiscreteMap(_data(), seed=5)
        alone.fit(steps=6, batch_size=64, tol=None, check_every=100, rank=rank)
        assert not torch.equal(alone.potentials, shared[0])


def test_a_rank_that_fails_in_its_search_stops_every_rank_at_that_step():
    # Catches a failing rank that leaves the other waiting in the next all-reduce (a hang until the
    # test's timeout), and a healthy rank that goes on fitting alone.
    results = _run(fault=True)
    assert results[1][0] == "error" and "MemoryError: rank 1 ran out of memory" in results[1][1]
    assert results[0][0] == "error" and "another rank failed at fitting step 3" in results[0][1]
