"""The process-group side of the coupling: rank groups, shared noise pools, gathered cost rows.

Per training step, for a coupling group of W ranks with local batches ``b_r`` (sum ``B``):

1. every rank exchanges a small header (its ``b_r``, item shape, epoch and draw counter, the cost
   dtype it needs, its solver, whether its input is valid, and the ``solver="auto"`` race's
   times), so a bad input on one rank, ranks that reached different batches or would solve with
   different solvers fail the step on all of them instead of hanging or pairing wrongly;
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

import dataclasses
import functools
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_immiscible.checks import check_tensors, checked_ranges
from lightning_immiscible.conditional import (
    assign_gathered,
    class_noise_means,
    condition_code,
    condition_codes_problem,
    condition_problem,
    needs_wide_rows,
    prior_skew,
)
from lightning_immiscible.costs import range_cost_dtype
from lightning_immiscible.coupling import (
    INPUT_ERROR_REASONS,
    Assignment,
    CouplingInputError,
    CouplingResult,
    CouplingSpec,
    assign,
    pair_distances,
)
from lightning_immiscible.solvers import SOLVERS, SolverSpec

HEADER_DIMS = 6
"""Item dims sent in the per-step header; shapes with more dims are compared by numel only."""
HEADER_FIELDS = (
    "b", "status", "epoch", "draw", "wide", "solver", "race_pool", "race_dim", "race_us0", "race_us1",
    "condition", "ndim", "numel",
)  # fmt: skip
"""Named int64 fields of the per-step header, before the item dims (add new fields here)."""
FIELD = {name: i for i, name in enumerate(HEADER_FIELDS)}
"""Offset of each named header field."""
_FIXED = len(HEADER_FIELDS)
HEADER_SIZE = _FIXED + HEADER_DIMS
"""Length of the per-step int64 header each rank sends.

`[*HEADER_FIELDS, dims...]`: 19 values, 152 bytes. ``solver`` identifies the assignment solver
(compared across a group), ``race_*`` carry this rank's times of the previous ``solver="auto"``
race batch (see [SolverRace][lightning_immiscible.solver_race.SolverRace]), ``condition`` is 0
without labels, else 1 + the label dtype's code.
"""
RACE_FIELDS = ("race_pool", "race_dim", "race_us0", "race_us1")
"""The header fields a [HeaderPeer][lightning_immiscible.distributed.HeaderPeer] fills for the race."""


class HeaderPeer(Protocol):
    """Something that sends fields in the per-step header and reads the group's rows of them.

    The rows are the same on every rank of a group, so state advanced only from them stays in step
    across the group without a collective of its own (the ``solver="auto"`` race works this way).
    """

    def header_fields(self) -> dict[str, int]:
        """Values of named `HEADER_FIELDS` this rank sends in this step's header."""
        ...

    def receive_headers(self, rows: dict[str, list[int]]) -> None:
        """The group's values of every header field, one per rank in group order (own for one-rank groups)."""
        ...

    def solver_for(self, pool: int, dim: int, metric: str) -> str | SolverSpec:
        """``solver="auto"``'s solver for the group's agreed pool (asked after ``receive_headers``)."""
        ...


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


def build_world_group(timeout_s: float | None = None) -> RankGroup:
    """The world as one group, for the callback's broadcasts (a collective call when timed).

    Every rank must call it, at the same point; with ``timeout_s`` its collectives are bounded by it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return RankGroup(0, (0,), None)
    ranks = tuple(range(dist.get_world_size()))
    if timeout_s is None:
        return RankGroup(0, ranks, dist.group.WORLD)
    with _collective(RankGroup(0, ranks), "new_group"):
        return RankGroup(0, ranks, dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s)))


def broadcast_from_first(group: RankGroup, value: int, what: str, device: torch.device | None = None) -> int:
    """The group's first rank's ``value`` on every rank of ``group`` (no collective in a group of one).

    Args:
        group: From [build_world_group][lightning_immiscible.distributed.build_world_group].
        value: This rank's value (only the first rank's matters).
        what: Named in the error when the broadcast fails or times out.
        device: The module's device (used with NCCL).
    """
    if group.process_group is None:
        return int(value)
    comm = _comm_device(group.process_group, device if device is not None else torch.device("cpu"))
    data = torch.tensor([int(value)], dtype=torch.int64, device=comm)
    with _collective(group, f"{what} broadcast"):
        dist.broadcast(data, src=group.ranks[0], group=group.process_group)
    return int(data.cpu()[0])


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


def solver_identity(spec: CouplingSpec) -> str:
    """What decides this rank's assignment, compared across the group: ``""`` without one (knn, none).

    A registered name, the name of a passed [SolverSpec][lightning_immiscible.solvers.SolverSpec]
    (the ``solver="auto"`` race's), or for ``"auto"`` the installed exact solvers it chooses from.
    """
    if spec.method in ("knn", "none"):
        return ""
    if isinstance(spec.solver, SolverSpec):
        return spec.solver.name
    if spec.solver == "auto":
        return "auto over " + ", ".join(sorted(s.name for s in SOLVERS.values() if s.exact))
    return str(spec.solver)


def _solver_code(identity: str) -> int:
    return zlib.crc32(identity.encode()) if identity else 0


def _header(
    x: Tensor | None, error: BaseException | None, epoch: int, draw: int, wide: bool, extra: dict[str, int]
) -> Tensor:
    """The `HEADER_FIELDS` and item dims, int64; status 0 = ok, else 1 + reason."""
    head = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    for name, value in {"epoch": epoch, "draw": draw, **extra}.items():
        head[FIELD[name]] = int(value)
    if error is not None or x is None:
        reason = getattr(error, "reason", "exception")
        head[FIELD["status"]] = 1 + (
            INPUT_ERROR_REASONS.index(reason) if reason in INPUT_ERROR_REASONS else 0
        )
        return head
    dims = tuple(x.shape[1:])
    head[FIELD["b"]], head[FIELD["wide"]] = x.shape[0], int(wide)
    head[FIELD["ndim"]], head[FIELD["numel"]] = len(dims), int(np.prod(dims, dtype=np.int64))
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
    status = FIELD["status"]
    bad = [i for i in range(heads.shape[0]) if heads[i, status] != 0]
    if bad:
        if error is not None:
            raise error
        first = bad[0]
        reason = INPUT_ERROR_REASONS[int(heads[first, status]) - 1]
        what = (
            "raised an exception while preparing its batch" if reason == "exception" else "got invalid input"
        )
        raise CouplingInputError(
            f"Immiscible coupling aborted on all ranks of group {group.index}: rank "
            f"{ranks[first]} {what} ({reason}); that rank's error says why.",
            reason,
        )
    steps = heads[:, [FIELD["epoch"], FIELD["draw"]]]
    if not bool((steps == steps[0]).all()):
        raise CouplingInputError(
            f"Ranks reached the coupling at different batches ((epoch, draw) per rank {ranks}: "
            f"{steps.tolist()}): they run different numbers of training batches per epoch, so their "
            "batches would be coupled across epochs. Give every rank the same number of batches "
            "(Lightning's DistributedSampler does; with drop_last or equal-size shards).",
            "out_of_step",
        )
    items = heads[:, FIELD["ndim"] :]
    if group.process_group is not None and not bool((items == items[0]).all()):
        raise CouplingInputError(
            f"Ranks of coupling group {group.index} have different item shapes "
            f"(ndim, numel, dims per rank: {items.tolist()}); all ranks must couple tensors "
            "of the same shape (B_r, *dims).",
            "shape",
        )


def _agree_on_solver(group: RankGroup, heads: Tensor, identity: str) -> None:
    """Raises on every rank of a group whose ranks would solve its assignment with different solvers.

    Exact solvers break ties differently, so the ranks of one group must run the same one.
    """
    codes = [int(c) for c in heads[:, FIELD["solver"]]]
    if group.process_group is None or len(set(codes)) == 1:
        return
    known = {_solver_code(n): repr(n) for n in SOLVERS} | {_solver_code(identity): repr(identity)}
    named = ", ".join(
        f"rank {r}: {known.get(c, f'a solver not registered on rank {_rank()} (code {c})')}"
        for r, c in zip(group.ranks, codes, strict=True)
    )
    raise CouplingInputError(
        f"Ranks of coupling group {group.index} would solve the assignment with different solvers "
        f"({named}); exact solvers break ties differently, so the group would pair its pool in "
        "different ways. Install the same solver packages on every node, or pass a solver by name "
        "(e.g. ImmiscibleCoupling(solver='scipy')).",
        "solver",
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
) -> tuple[BaseException | None, bool]:
    """This rank's input check and whether its costs need float64, from one pass over `x`.

    Returns:
        `(error, wide)`: the error to share with the group (or `None`), and whether the costs need
        float64 (float64 data, or fp32 costs that could overflow: decided from `x`'s range and a
        bound on the noise, 10 standard deviations, before the pool is drawn, so that the group
        agrees on one dtype for the gathered rows in the header exchange).
    """
    if error is not None or x is None:
        return error or CouplingInputError("No data tensor to couple.", "no_tensor"), False
    try:
        check_tensors(x, x, "lsa")  # dtype, ndim, device: no pass over the values
        if x.shape[0] == 0:
            raise CouplingInputError(
                f"This rank's batch has 0 items (x0 shape {tuple(x.shape)}); the coupling needs at "
                "least one item per rank. Check the sampler / dataloader that yields empty batches.",
                "empty",
            )
        ranges = checked_ranges(x, x, spec.check_finite)[:1]  # one min/max pass: NaN/Inf and range
    except CouplingInputError as exc:
        return exc, False
    wide = x.dtype == torch.float64
    return None, range_cost_dtype([*ranges, (10.0, 10.0)], x[0].numel(), spec.metric, wide) == torch.float64


def couple_in_group(
    x: Tensor | None,
    group: RankGroup,
    seed: int,
    draw_index: int,
    spec: CouplingSpec,
    error: BaseException | None = None,
    epoch: int = 0,
    condition: Tensor | None = None,
    peer: HeaderPeer | None = None,
) -> CouplingResult:
    """Couples this rank's `x` with noise from its group's shared pool (the steps in this module's docs).

    Every rank of `group` must call it for the same `draw_index`. Bad input on any rank (passed
    as `error` or found here: NaN/Inf, integer dtype, an empty batch, item shapes that differ
    between ranks), ranks at different `(epoch, draw_index)` and ranks of a group that would
    solve with different solvers ([solver_identity][lightning_immiscible.distributed.solver_identity])
    raise on every rank of the group
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
        condition: `(b_r,)` integer labels of this rank's items, or `None`. `lsa`/`flip` then
            solve within each label over the whole group (`spec.within_condition`; see
            [conditional][lightning_immiscible.conditional]): the labels travel as one extra column
            of the gathered cost rows, and a flag in the header makes ranks that disagree (a
            condition on some ranks only, different label dtypes) or bad labels on any rank fail
            every rank of the group in the same step. The result's `prior_skew` is set.
        peer: Sends extra header fields and reads the group's rows of them (the callback's
            ``solver="auto"`` race), after the ranks agreed that the step can go on; with
            ``spec.solver="auto"`` it then names the solver for the group's agreed pool.

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
    error, wide = _validate_local(x, error, spec)
    error = error or _condition_error(x, condition)
    device = x.device if x is not None else torch.device("cpu")
    wide = error is None and (wide or needs_wide_rows(condition))
    identity = solver_identity(spec)
    extra = {
        "solver": _solver_code(identity),
        "condition": 0 if error else condition_code(condition),
        **(peer.header_fields() if peer is not None else {}),
    }
    own = _header(x, error, epoch, draw_index, wide, extra)
    heads = _exchange_headers(group, own, device)
    _agree_or_raise(group, heads, error)
    _agree_on_condition(group, heads[:, FIELD["condition"]])
    _agree_on_solver(group, heads, identity)
    assert x is not None
    if group.process_group is None:  # one-rank group: the world's headers were only a check
        heads = own[None]
    if peer is not None:
        peer.receive_headers({name: [int(v) for v in heads[:, i]] for name, i in FIELD.items()})
    if spec.method == "knn":
        return _with_local_skew(_knn_local(x, seed, draw_index, spec), x, condition)
    sizes = [int(s) for s in heads[:, FIELD["b"]]]
    if peer is not None and spec.solver == "auto" and spec.method in ("lsa", "flip"):
        # the pool the group agreed on in the header: the same solver on every rank
        spec = dataclasses.replace(spec, solver=peer.solver_for(sum(sizes), x[0].numel(), spec.metric))
    dtype = torch.float64 if bool(heads[:, FIELD["wide"]].any()) else torch.float32
    offset, total = sum(sizes[: group.ranks.index(_rank())]), sum(sizes)
    pool = draw_pool((total, *x.shape[1:]), seed, group.index, draw_index, device)
    found = Assignment(torch.arange(offset, offset + x.shape[0], device=device), 0.0, 0.0)
    skew = None
    gather = functools.partial(_gather_rows, group, sizes=sizes)
    if spec.method != "none" and total > 1 and condition is not None:
        found, skew = _assign_with_labels(x, pool, condition, spec, gather, offset, dtype)
    elif spec.method != "none" and total > 1:
        found = assign(x, pool, spec, gather_rows=gather, offset=offset, dtype=dtype)
    noise = pool.index_select(0, found.index).to(x.dtype)
    before, after = _group_mean(group, list(pair_distances(found, x, pool, offset, spec)), device)
    result = found.result(noise, before, after, spec)
    return (
        dataclasses.replace(result, prior_skew=skew)
        if skew is not None
        else _with_local_skew(result, x, condition)
    )


def _condition_error(x: Tensor | None, condition: Tensor | None) -> CouplingInputError | None:
    problem = condition_problem(condition, x.shape[0]) if x is not None else None
    return CouplingInputError(*problem) if problem else None


def _agree_on_condition(group: RankGroup, codes: Tensor) -> None:
    """Fails every rank alike when ranks disagree on the condition (after the header exchange)."""
    problem = condition_codes_problem(codes.tolist(), _header_ranks(group, codes.shape[0]))
    if problem:
        raise CouplingInputError(problem, "invalid")


def _assign_with_labels(
    x: Tensor,
    pool: Tensor,
    condition: Tensor,
    spec: CouplingSpec,
    gather: Any,
    offset: int,
    dtype: torch.dtype,
) -> tuple[Assignment, float | None]:
    """Group coupling with labels (within or across conditions) and the group-wide prior skew."""
    col, labels, cost_ms, solve_ms = assign_gathered(
        x, pool, condition, gather, metric=spec.metric, precision=spec.precision, solver=spec.solver,
        flip=spec.method == "flip", within=spec.within_condition, dtype=dtype,
    )  # fmt: skip
    col_t = torch.from_numpy(col).to(x.device)
    skew = prior_skew(x, condition, *class_noise_means(pool[col_t], labels))
    return Assignment(col_t[offset : offset + x.shape[0]], cost_ms, solve_ms), skew


def _with_local_skew(result: CouplingResult, x: Tensor, condition: Tensor | None) -> CouplingResult:
    """Adds the prior skew from this rank's items alone (exact for `none`, per-item `knn`, one rank)."""
    if condition is None:
        return result
    return dataclasses.replace(
        result, prior_skew=prior_skew(x, condition, *class_noise_means(result.noise, condition))
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _knn_local(x: Tensor, seed: int, draw_index: int, spec: CouplingSpec) -> CouplingResult:
    """Knn needs no cross-item matching: each rank draws its own candidates (after the header check)."""
    # a per-rank stream, whatever the scope
    cand = draw_pool((x.shape[0], spec.k, *x.shape[1:]), seed, _rank(), draw_index, x.device, stream=1)
    return CouplingSpec("knn", spec.metric, check_finite=False).couple(x, cand.to(x.dtype))
