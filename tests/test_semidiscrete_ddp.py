"""Fitting a dataset-level map on 2 real CPU processes (gloo): shared potentials, failing, stalled ranks."""

from __future__ import annotations

import time
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lightning_immiscible.map_fit import FitSemidiscreteMap
from lightning_immiscible.semidiscrete import SemidiscreteMap
from tests.helpers import run_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]


def _data() -> torch.Tensor:
    return torch.randn(30, 4, generator=torch.Generator().manual_seed(0))


class FailsAtStep3(SemidiscreteMap):
    """A map that fails on rank 1 only: in its search or its noise draw at fitting step 3, or in the
    convergence check after step 4 (the first check: `check_every=4`)."""

    where = "search"

    def hits(self, noise, labels=None, potentials=None):
        if self.where == "search" and self.steps == 3:
            raise MemoryError("rank 1 ran out of memory in its search")
        return super().hits(noise, labels, potentials)

    def _fit_noise(self, b, rank):
        if self.where == "noise" and self.steps == 3:
            raise MemoryError("rank 1 ran out of memory drawing its noise")
        return super()._fit_noise(b, rank)

    def hit_chi2(self, samples=65536, batch_size=2048):
        if self.where == "check" and self.steps == 4:
            raise MemoryError("rank 1 ran out of memory in its check")
        return super().hit_chi2(samples, batch_size)


def _rank_main(rank: int, port: int, fault: str | None, queue) -> None:
    torch.set_num_threads(1)  # a forked child's first parallel op can hang otherwise
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

        def reduce(v: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(v)
            return v

        sd = (FailsAtStep3 if fault and rank == 1 else SemidiscreteMap)(_data(), seed=5)
        sd.where = fault
        sd.fit(steps=6, batch_size=64, tol=None, check_every=4, rank=rank, reduce=reduce)
        # plain floats (exact for float64): a tensor would travel as shared memory that the
        # exiting child can take with it before the parent reads it (an EOFError in the parent)
        queue.put((rank, "ok", sd.potentials.tolist()))
    except Exception as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=1)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(fault: str | None) -> dict[int, tuple[str, object]]:
    return run_ranks(_rank_main, lambda r, port, queue: (r, port, fault, queue))


def test_ranks_fit_the_same_potentials_from_their_summed_hits():
    # Both ranks must hold bitwise the same potentials, and not those of a rank fitting alone on its
    # own stream. Catches a reduce that is skipped (rank 0 would equal the lone fit, rank 1 differ)
    # and ranks drawing the same fitting noise (summed hits = twice one rank's: again the lone fit).
    results = _run(fault=None)
    assert [results[r][0] for r in range(2)] == ["ok", "ok"], results
    shared = [torch.tensor(results[r][1], dtype=torch.float64) for r in range(2)]
    assert torch.equal(shared[0], shared[1])
    for rank in range(2):
        alone = SemidiscreteMap(_data(), seed=5)
        alone.fit(steps=6, batch_size=64, tol=None, check_every=4, rank=rank)
        assert not torch.equal(alone.potentials, shared[0])


@pytest.mark.parametrize(
    ("fault", "healthy"),
    [
        ("search", "another rank failed at fitting step 3"),
        ("noise", "another rank failed at fitting step 3"),
        ("check", "another rank failed at the convergence check after step 4"),
    ],
)
def test_a_rank_that_fails_in_a_step_or_a_check_stops_every_rank_there(fault, healthy):
    # Each local part of the fit fails on rank 1 alone: its noise draw or its search (step 3), or
    # the convergence check after step 4. Catches a failure outside the guarded search that leaves the
    # other rank waiting in the next all-reduce (a hang: the launcher's stack dump, then a failed
    # test), and a healthy rank that goes on fitting alone or learns only a collective's error.
    results = _run(fault=fault)
    assert results[1][0] == "error" and "MemoryError: rank 1 ran out of memory" in results[1][1], results
    assert results[0][0] == "error" and healthy in results[0][1], results


def _fit_main(rank: int, port: int, case: str, path: str | None, steps: int, queue) -> None:
    """FitSemidiscreteMap.on_fit_start on a gloo rank, with the trainer attributes it reads."""
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        sd = (Stalls if case == "stall" and rank == 1 else SemidiscreteMap)(_data(), seed=5)
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        trainer = SimpleNamespace(global_rank=rank, world_size=2, is_global_zero=rank == 0, logger=None,
                                  strategy=strategy)  # fmt: skip
        fit = FitSemidiscreteMap(sd, steps=steps, batch_size=64, tol=None, check_every=4, path=path,
                                 collective_timeout_s=3)  # fmt: skip
        start = time.monotonic()
        fit.on_fit_start(trainer, None)
        queue.put((rank, "ok", (sd.steps, sd.potentials.tolist())))
    except Exception as exc:
        queue.put((rank, "error", (f"{type(exc).__name__}: {exc}", time.monotonic() - start)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _fit(case: str, path: str | None, steps: int) -> dict[int, tuple[str, object]]:
    return run_ranks(_fit_main, lambda r, port, queue: (r, port, case, path, steps, queue))


class Stalls(SemidiscreteMap):
    """A rank whose search stalls for 20 s at step 2 (longer than the fit's 3 s timeout)."""

    def hits(self, noise, labels=None, potentials=None):
        if self.steps == 2:
            time.sleep(20)
        return super().hits(noise, labels, potentials)


def test_the_fit_resumes_every_rank_from_rank_0s_file(tmp_path):
    # A 2-rank fit of 4 steps saves its state to a file (rank 0 writes it); a later 2-rank fit to 8
    # steps resumes from it, and only rank 0 reads it: rank 1 gets the state by the broadcast in the
    # fit's own group. Oracle: an uninterrupted 2-rank fit of 8 steps; both resumed ranks must end
    # bitwise on its potentials. Catches a broadcast that leaves rank 1 without the state (it would
    # refit from step 0 and its all-reduces no longer line up with rank 0's: a timeout error).
    path = str(tmp_path / "map.pt")
    whole = _fit("plain", None, 8)
    assert [whole[r][0] for r in range(2)] == ["ok", "ok"], whole
    first = _fit("plain", path, 4)
    assert [first[r][0] for r in range(2)] == ["ok", "ok"], first
    resumed = _fit("plain", path, 8)
    assert [resumed[r][0] for r in range(2)] == ["ok", "ok"], resumed
    for rank in range(2):
        assert first[rank][1][0] == 4 and resumed[rank][1][0] == 8
        assert resumed[rank][1][1] == whole[0][1][1]  # plain floats: exact for float64
    assert first[0][1][1] != whole[0][1][1]  # the file's fit is really a partial one


def test_a_stalled_rank_fails_the_fit_within_its_collective_timeout(tmp_path):
    # Rank 1 stalls 20 s in its search at step 2; rank 0 must fail within the fit's 3 s timeout
    # with the library's message naming the fit's all-reduce and the setting. Catches a fit whose
    # collectives ignore collective_timeout_s (rank 0 would wait the whole 20 s, or the default 30 min).
    results = _fit("stall", str(tmp_path / "m.pt"), 8)
    status, (message, elapsed) = results[0]
    assert status == "error" and "did not reach it in time" in message, results
    assert (
        "FitSemidiscreteMap's all-reduce of the hit counts" in message and "collective_timeout_s" in message
    )
    assert elapsed < 15
    assert results[1][0] == "error"  # rank 1 wakes to a closed group, and fails too
