"""The process-group side of the coupling: rank groups, shared noise pools, gathered cost rows.

Per training step, for a coupling group of W ranks with local batches ``b_r`` (sum ``B``):

1. every rank exchanges a small header (its ``b_r``, item shape, epoch and draw counter, the cost
   dtype it needs, and whether its input is valid), so a bad input on one rank, or ranks that
   reached different batches, fail the step on all of them instead of hanging or pairing wrongly;
2. every rank draws the *same* pool of ``B`` noise vectors from a generator seeded by
   ``(seed, group, draw)``: no noise crosses the network;
3. rank ``r`` computes its ``b_r x B`` rows of the cost matrix, the rows are all-gathered
   (padded to the largest ``b_r`` and trimmed: uneven batches work) into the ``B x B`` matrix;
4. every rank solves the same assignment and takes the pool rows assigned to its own items.

Without a process group (single process) no collective is called. With one-rank groups
(``scope="local"``, ``knn``) in a world of several ranks only step 1 crosses the network (one
header all-gather per step over the world), so that a bad input on one rank still fails all ranks
with a clear message; noise and cost rows never do.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_immiscible.costs import cost_dtype
from lightning_immiscible.coupling import (
    INPUT_ERROR_REASONS,
    Assignment,
    CouplingInputError,
    CouplingResult,
    CouplingSpec,
    assign,
    check_inputs,
    pair_distances,
)

HEADER_DIMS = 6
"""Item dims sent in the per-step header; shapes with more dims are compared by numel only."""
_FIXED = 7  # header fields before the dims: b, status, epoch, draw, wide, ndim, numel
HEADER_SIZE = _FIXED + HEADER_DIMS
"""Length of the per-step int64 header each rank sends.

`[b, status, epoch, draw, wide, ndim, numel, dims...]`: 13 values, 104 bytes.
"""


@dataclass(frozen=True)
class RankGroup:
    """The ranks that pool their batches for one assignment.

    Attributes:
        index: Group number (``0..num_groups-1``); seeds the group's noise pool.
        ranks: Global ranks in the group, ascending.
        process_group: The ``torch.distributed`` group, or ``None`` for a one-rank group.
        check_group: For a one-rank group in a world of several ranks: the group (the world)
            over which ranks still exchange their small header each step, so that bad input on
            one rank fails all of them; ``None`` otherwise.

    """

    index: int
    ranks: tuple[int, ...]
    process_group: Any = None
    check_group: Any = None

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return len(self.ranks)


def partition_ranks(scope: str | int, world_size: int, ranks_per_node: int) -> list[tuple[int, ...]]:
    """Splits ``range(world_size)`` into coupling groups.

    Args:
        scope: ``"global"`` (one group), ``"local"`` (one group per rank), ``"node"`` (groups of
            ``ranks_per_node`` consecutive ranks) or an int (groups of that many consecutive ranks).
        world_size: Number of processes.
        ranks_per_node: Processes per node (Lightning: ``trainer.num_devices``).

    Returns:
        The groups as tuples of global ranks.

    Raises:
        ValueError: If the scope is unknown or does not divide the world size.

    """
    if scope == "global":
        size = world_size
    elif scope == "local":
        size = 1
    elif scope == "node":
        size = ranks_per_node
    elif isinstance(scope, int) and not isinstance(scope, bool) and scope >= 1:
        size = scope
    else:
        raise ValueError(f"Unknown scope {scope!r}: use 'global', 'local', 'node' or a positive int.")
    size = min(size, world_size)
    if world_size % size:
        raise ValueError(
            f"scope={scope!r} means groups of {size} ranks, which does not divide the world size "
            f"{world_size}. Choose a group size that divides it (or 'global' / 'local')."
        )
    return [tuple(range(start, start + size)) for start in range(0, world_size, size)]


def build_rank_group(scope: str | int, ranks_per_node: int = 1, timeout_s: float | None = None) -> RankGroup:
    """Creates this rank's `RankGroup` (a collective call when subgroups are needed).

    Every rank must call it, in the same order, since ``torch.distributed.new_group`` is collective.

    Args:
        scope: See [partition_ranks][lightning_immiscible.distributed.partition_ranks].
        ranks_per_node: Processes per node.
        timeout_s: Timeout for the subgroup's collectives (``None``: the backend's default).

    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return RankGroup(0, (0,), None)
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = partition_ranks(scope, world, ranks_per_node)
    mine = next(i for i, g in enumerate(groups) if rank in g)
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if len(groups[mine]) == 1:  # one-rank groups: headers still go over the world
        world_group = dist.group.WORLD
        if timeout_s is not None:
            with _collective(RankGroup(mine, groups[mine]), "new_group"):
                world_group = dist.new_group(list(range(world)), **kwargs)
        return RankGroup(mine, groups[mine], None, world_group)
    if len(groups) == 1 and timeout_s is None:
        return RankGroup(0, groups[0], dist.group.WORLD)
    # A dedicated group per coupling group (also for the whole world when a timeout is asked for).
    with _collective(RankGroup(mine, groups[mine]), "new_group"):
        handles = [dist.new_group(list(g), **kwargs) for g in groups]  # collective: all ranks, all groups
    return RankGroup(mine, groups[mine], handles[mine])


@contextmanager
def _collective(group: RankGroup, what: str) -> Iterator[None]:
    """Turns a failed or timed-out collective into an error that says what to check."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(
            f"ImmiscibleCoupling: the {what} collective of coupling group {group.index} (ranks "
            f"{list(group.ranks)}) failed: {exc}. Another rank of the group did not reach the coupling "
            "(it crashed, or ranks run different numbers of training batches: use the same number of "
            "batches per rank, e.g. Lightning's DistributedSampler). `collective_timeout_s` bounds the wait."
        ) from exc


def pool_generator_seed(seed: int, group_index: int, draw_index: int, stream: int = 0) -> int:
    """Derives a 63-bit generator seed from ``(seed, group, draw, stream)`` (NumPy SeedSequence)."""
    words = np.random.SeedSequence([seed, stream, group_index, draw_index]).generate_state(2)
    return int(((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1))


def draw_pool(
    shape: Sequence[int],
    seed: int,
    group_index: int,
    draw_index: int,
    device: torch.device | str = "cpu",
    stream: int = 0,
) -> Tensor:
    """Draws the group's noise pool: identical on every rank of the group, different per draw.

    Args:
        shape: ``(B, *dims)`` pool shape.
        seed: Run seed shared by all ranks.
        group_index: The group's number (different groups draw different pools).
        draw_index: Counter of coupled micro-batches (different per step and micro-batch).
        device: Where to draw.
        stream: Separates independent uses of the same (seed, group, draw) (e.g. knn candidates).

    Returns:
        ``shape`` fp32 standard normal noise.

    """
    gen = torch.Generator(device=device)
    gen.manual_seed(pool_generator_seed(seed, group_index, draw_index, stream))
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _comm_device(process_group: Any, fallback: torch.device) -> torch.device:
    return fallback if dist.get_backend(process_group) == "nccl" else torch.device("cpu")


def _header(x: Tensor | None, error: BaseException | None, epoch: int, draw: int, wide: bool) -> Tensor:
    """``[b, status, epoch, draw, wide, ndim, numel, dims...]`` int64; status 0 = ok, else 1 + reason."""
    head = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    head[2], head[3] = epoch, draw
    if error is not None or x is None:
        reason = getattr(error, "reason", "exception")
        head[1] = 1 + (INPUT_ERROR_REASONS.index(reason) if reason in INPUT_ERROR_REASONS else 0)
        return head
    dims = tuple(x.shape[1:])
    head[0], head[4], head[5], head[6] = x.shape[0], int(wide), len(dims), int(np.prod(dims, dtype=np.int64))
    head[_FIXED : _FIXED + min(len(dims), HEADER_DIMS)] = torch.tensor(dims[:HEADER_DIMS], dtype=torch.int64)
    return head


def _exchange_headers(group: RankGroup, head: Tensor, device: torch.device) -> Tensor:
    """All-gathers the group's headers (the world's for one-rank groups): ``(W, HEADER_SIZE)``."""
    process_group = group.process_group if group.process_group is not None else group.check_group
    if process_group is None:
        return head[None]
    head = head.to(_comm_device(process_group, device))
    out = [torch.empty_like(head) for _ in range(dist.get_world_size(process_group))]
    with _collective(group, "header all_gather"):
        dist.all_gather(out, head, group=process_group)
    return torch.stack(out).cpu()


def _agree_or_raise(group: RankGroup, heads: Tensor, error: BaseException | None) -> None:
    """Raises the same failure on every rank when any rank's input was invalid or out of step."""
    ranks = _header_ranks(group, heads.shape[0])
    bad = [i for i in range(heads.shape[0]) if heads[i, 1] != 0]
    if bad:
        if error is not None:
            raise error
        first = bad[0]
        reason = INPUT_ERROR_REASONS[int(heads[first, 1]) - 1]
        what = (
            "raised an exception while preparing its batch" if reason == "exception" else "got invalid input"
        )
        raise CouplingInputError(
            f"Immiscible coupling aborted on all ranks of group {group.index}: rank "
            f"{ranks[first]} {what} ({reason}); that rank's error says why.",
            reason,
        )
    steps = heads[:, 2:4]
    if not bool((steps == steps[0]).all()):
        raise CouplingInputError(
            f"Ranks reached the coupling at different batches ((epoch, draw) per rank {ranks}: "
            f"{steps.tolist()}): they run different numbers of training batches per epoch, so their "
            "batches would be coupled across epochs. Give every rank the same number of batches "
            "(Lightning's DistributedSampler does; with drop_last or equal-size shards).",
            "out_of_step",
        )
    items = heads[:, 5:]
    if group.process_group is not None and not bool((items == items[0]).all()):
        raise CouplingInputError(
            f"Ranks of coupling group {group.index} have different item shapes "
            f"(ndim, numel, dims per rank: {items.tolist()}); all ranks must couple tensors "
            "of the same shape (B_r, *dims).",
            "shape",
        )


def _header_ranks(group: RankGroup, count: int) -> list[int]:
    """Global ranks of the gathered headers (the group's, or the world's for one-rank groups)."""
    return list(group.ranks) if count == len(group.ranks) else list(range(count))


def _gather_rows(group: RankGroup, rows: Tensor, sizes: list[int]) -> Tensor:
    """All-gathers uneven ``(b_r, B)`` cost rows into the ``(B, B)`` matrix (pad, gather, trim)."""
    if group.process_group is None:
        return rows
    comm = _comm_device(group.process_group, rows.device)
    padded = rows.new_zeros((max(sizes), rows.shape[1]), device=comm)
    padded[: rows.shape[0]] = rows.to(comm)
    out = [torch.empty_like(padded) for _ in sizes]
    with _collective(group, "cost-row all_gather"):
        dist.all_gather(out, padded, group=group.process_group)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]).cpu()


def _group_mean(group: RankGroup, values: list[Tensor], device: torch.device) -> list[float]:
    """Group-wide means of per-item tensors (one tiny all-reduce of the sums and the count)."""
    sums = torch.tensor([float(v.sum()) for v in values] + [float(values[0].numel())], dtype=torch.float64)
    if group.process_group is not None:
        sums = sums.to(_comm_device(group.process_group, device))
        with _collective(group, "statistics all_reduce"):
            dist.all_reduce(sums, group=group.process_group)
        sums = sums.cpu()
    count = float(sums[-1])
    return [float(s) / count if count else 0.0 for s in sums[:-1]]


GroupCouplingConfig = CouplingSpec
"""The former name of [CouplingSpec][lightning_immiscible.coupling.CouplingSpec], kept so that code
written against it keeps working (same fields, same order)."""


def _validate_local(
    x: Tensor | None, error: BaseException | None, spec: CouplingSpec
) -> BaseException | None:
    if error is not None or x is None:
        return error or CouplingInputError("No data tensor to couple.", "no_tensor")
    try:
        check_inputs(x, x, "lsa", spec.check_finite)  # x0 against itself: dtype, ndim, NaN/Inf
    except CouplingInputError as exc:
        return exc
    if x.shape[0] == 0:
        return CouplingInputError(
            f"This rank's batch has 0 items (x0 shape {tuple(x.shape)}); the coupling needs at least "
            "one item per rank. Check the sampler / dataloader that yields empty batches.",
            "empty",
        )
    return None


def _needs_float64(x: Tensor, metric: str) -> bool:
    """Whether this rank's costs need float64 (float64 data, or fp32 costs that could overflow).

    Decided from ``x`` and a bound on the noise (10 standard deviations) before the pool is drawn,
    so the group can agree on one dtype for the gathered rows in the header exchange.
    """
    bound = torch.full((1, *x.shape[1:]), 10.0, dtype=torch.float32, device=x.device)
    return cost_dtype(x, bound, metric) == torch.float64


def couple_in_group(
    x: Tensor | None,
    group: RankGroup,
    seed: int,
    draw_index: int,
    spec: CouplingSpec,
    error: BaseException | None = None,
    epoch: int = 0,
) -> CouplingResult:
    """Couples this rank's `x` with noise from its group's shared pool (the steps in this module's docs).

    Every rank of `group` must call it for the same `draw_index`. Bad input on any rank (passed
    as `error` or found here: NaN/Inf, integer dtype, an empty batch, item shapes that differ
    between ranks) and ranks at different `(epoch, draw_index)` raise on every rank of the group
    after one header exchange (for one-rank groups, `knn` and `scope="local"`: on every rank of
    the world).

    Args:
        x: `(b_r, *dims)` this rank's data (`None` when `error` is given).
        group: This rank's [RankGroup][lightning_immiscible.distributed.RankGroup].
        seed: Run seed, equal on all ranks.
        draw_index: Counter of coupled micro-batches, equal on all ranks.
        spec: Method, metric, precision, solver, knn `k`
            ([CouplingSpec][lightning_immiscible.coupling.CouplingSpec]).
        error: An exception this rank hit while preparing `x` (shared with the group, re-raised).
        epoch: The training epoch, compared across ranks with `draw_index`: ranks that run
            different numbers of batches per epoch fail at the first batch where they diverge.

    Returns:
        The local [CouplingResult][lightning_immiscible.coupling.CouplingResult]: `noise`
        `(b_r, *dims)`; `index` `(b_r,)` into the group pool (for `knn`: the chosen candidate);
        costs are group-wide means.

    Examples:
        ```python
        import torch
        from lightning_immiscible import CouplingSpec
        from lightning_immiscible.distributed import build_rank_group, couple_in_group

        group = build_rank_group("global")  # every rank, same order; one process: a group of one
        x0 = torch.rand(8, 16) * 2 - 1
        res = couple_in_group(x0, group, seed=0, draw_index=0, spec=CouplingSpec("lsa"))
        ```
    """
    error = _validate_local(x, error, spec)
    device = x.device if x is not None else torch.device("cpu")
    wide = x is not None and error is None and _needs_float64(x, spec.metric)
    own = _header(x, error, epoch, draw_index, wide)
    heads = _exchange_headers(group, own, device)
    _agree_or_raise(group, heads, error)
    assert x is not None
    if spec.method == "knn":
        return _knn_local(x, seed, draw_index, spec)
    if group.process_group is None:  # one-rank group: the world's headers were only a check
        heads = own[None]
    sizes = [int(s) for s in heads[:, 0]]
    dtype = torch.float64 if bool(heads[:, 4].any()) else torch.float32
    offset, total = sum(sizes[: group.ranks.index(_rank())]), sum(sizes)
    pool = draw_pool((total, *x.shape[1:]), seed, group.index, draw_index, device)
    found = Assignment(torch.arange(offset, offset + x.shape[0], device=device), 0.0, 0.0)
    if spec.method != "none" and total > 1:
        gather = functools.partial(_gather_rows, group, sizes=sizes)
        found = assign(x, pool, spec, gather_rows=gather, offset=offset, dtype=dtype)
    noise = pool.index_select(0, found.index).to(x.dtype)
    before, after = _group_mean(group, list(pair_distances(found, x, pool, offset, spec)), device)
    return found.result(noise, before, after, spec)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _knn_local(x: Tensor, seed: int, draw_index: int, spec: CouplingSpec) -> CouplingResult:
    """Knn needs no cross-item matching: each rank draws its own candidates (after the header check)."""
    # a per-rank stream, whatever the scope
    cand = draw_pool((x.shape[0], spec.k, *x.shape[1:]), seed, _rank(), draw_index, x.device, stream=1)
    return CouplingSpec("knn", spec.metric, check_finite=False).couple(x, cand.to(x.dtype))
