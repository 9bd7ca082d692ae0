"""The group coupling: one assignment over the batches of several ranks, no noise on the network.

Per coupled micro-batch, for a coupling group of W ranks with local batches `b_r` (sum `B`):

1. every rank of the world sends its per-step header ([protocol][lightning_immiscible.protocol.exchange]):
   a failure, a disagreement or ranks out of step stop every rank in this step, with the failing
   rank's own message;
2. every rank of the group draws the *same* pool of `B` noise vectors from the stream
   `(seed, group, draw)` ([streams][lightning_immiscible.streams.draw_pool]): no noise crosses the network;
3. rank `r` computes its `b_r x B` cost rows; the rows are all-gathered (padded to the largest
   `b_r` and trimmed: uneven batches work) into the `B x B` matrix;
4. every rank solves the same assignment and takes the pool rows assigned to its own items.

Without a process group no collective is called. With one-rank groups (`scope="local"`, `knn`)
only the header crosses the network. A batch a DataLoader worker coupled still sends its header
([agree_on_step][lightning_immiscible.distributed.agree_on_step] with `path="worker"`), so every
path issues the same collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_immiscible.checks import CouplingInputError, check_cost_range, check_tensors, checked_ranges
from lightning_immiscible.conditional import (
    assign_gathered,
    class_noise_means,
    condition_problem,
    needs_wide_rows,
    prior_skew,
)
from lightning_immiscible.costs import range_cost_dtype
from lightning_immiscible.coupling import Assignment, CouplingResult, CouplingSpec, assign, pair_distances
from lightning_immiscible.embedding import condition_leak, is_embedding
from lightning_immiscible.groups import RankGroup, collective, place, process_rank
from lightning_immiscible.protocol import (
    StepPath,
    agree,
    condition_code,
    condition_dim,
    encode,
    exchange,
    solver_code,
    solver_identity,
)
from lightning_immiscible.solvers import SolverSpec
from lightning_immiscible.streams import Stream, draw_noise, draw_pool


class GroupRace(Protocol):
    """`solver="auto"`'s race as the group coupling drives it (see `solver_race.AutoSolver`)."""

    def header_fields(self) -> dict[str, int]:
        """The race fields this rank sends in this step's header."""
        ...

    def receive_headers(self, rows: dict[str, list[int]]) -> None:
        """The group's rows of every header field (identical on every rank of the group)."""
        ...

    def solver_for(self, pool: int, dim: int, metric: str) -> str | SolverSpec:
        """The solver for a pool of `pool` items (the group's agreed total) of `dim` values."""
        ...

    def record(self) -> None:
        """Ends the batch just solved (a race batch's times go in the next header)."""
        ...

    def extra_ms(self) -> float:
        """Solver time of the race's other candidates on the batch just solved, ms."""
        ...


@dataclass(frozen=True)
class AgreedStep:
    """What the ranks of a group agreed on in the header exchange.

    Attributes:
        sizes: Each group rank's local batch size, in rank order.
        offset: This rank's first row in the group's pool.
        dtype: The cost dtype of the gathered rows (float64 when any rank needs it).
    """

    sizes: list[int]
    offset: int
    dtype: torch.dtype

    @property
    def total(self) -> int:
        """The group's pool size."""
        return sum(self.sizes)


def agree_on_step(
    x: Tensor | None,
    group: RankGroup,
    draw_index: int,
    spec: CouplingSpec,
    *,
    error: BaseException | None = None,
    epoch: int = 0,
    condition: Tensor | None = None,
    race: GroupRace | None = None,
    path: StepPath = "group",
) -> AgreedStep:
    """Step 1: validates this rank's input, exchanges the header and agrees, or fails every rank.

    Args:
        x: `(b_r, *dims)` this rank's data (`None` when `error` is given).
        group: This rank's [RankGroup][lightning_immiscible.groups.RankGroup].
        draw_index: Counter of coupled micro-batches, equal on all ranks.
        spec: The coupling's settings.
        error: What failed on this rank while preparing `x` (sent to every rank, chained here).
        epoch: The training epoch (ranks at different `(epoch, draw_index)` fail together).
        condition: `(b_r,)` integer labels, a `(b_r, E)` float embedding, or `None`.
        race: `solver="auto"`'s race: sends its report, reads the group's rows.
        path: `"worker"` for a batch a DataLoader worker coupled (only the header is exchanged).

    Raises:
        CouplingInputError: On every rank of the world when any rank failed, is out of step or
            disagrees; naming the failing rank with its own message.
    """
    wide = False
    if path == "group":
        error, wide = _validate_local(x, error, spec.metric)
    error = error or _condition_error(x, condition, spec.condition_metric)
    # Labels >= 2**24 and float64 embeddings need float64 rows to travel exactly.
    wide = error is None and (wide or needs_wide_rows(condition))
    identity = solver_identity(spec)
    fields = {
        "epoch": epoch, "draw": draw_index, "wide": int(wide),
        "solver": solver_code(identity), "condition": 0 if error else condition_code(condition),
        "condition_dim": 0 if error else condition_dim(condition),
        **(race.header_fields() if race is not None and path == "group" else {}),
    }  # fmt: skip
    heads = exchange(group, encode(x, error, fields, path))
    agree(group, heads, error, process_rank(), identity)
    mine = heads.of(group)
    if race is not None and path == "group":
        race.receive_headers(mine.fields())
    sizes = mine.column("b")
    offset = sum(sizes[: group.ranks.index(process_rank())]) if group.size > 1 else 0
    return AgreedStep(sizes, offset, torch.float64 if any(mine.column("wide")) else torch.float32)


def couple_in_group(
    x: Tensor | None,
    group: RankGroup,
    seed: int,
    draw_index: int,
    spec: CouplingSpec,
    error: BaseException | None = None,
    epoch: int = 0,
    condition: Tensor | None = None,
    race: GroupRace | None = None,
) -> CouplingResult:
    """Couples this rank's `x` with noise from its group's shared pool (the steps in this module's docs).

    Every rank of the world must call it for the same `draw_index`. Bad input on any rank (passed
    as `error` or found here: NaN/Inf, integer dtype, an empty batch, item shapes that differ
    between ranks), ranks at different `(epoch, draw_index)` and ranks of a group that would
    solve with different solvers raise on every rank after one header exchange.

    Args:
        x: `(b_r, *dims)` this rank's data (`None` when `error` is given).
        group: This rank's [RankGroup][lightning_immiscible.groups.RankGroup].
        seed: Run seed, equal on all ranks.
        draw_index: Counter of coupled micro-batches, equal on all ranks.
        spec: Method, metric, precision, solver, knn `k`
            ([CouplingSpec][lightning_immiscible.coupling.CouplingSpec]).
        error: An exception this rank hit while preparing `x` (sent to every rank, chained here).
        epoch: The training epoch, compared across ranks with `draw_index`.
        condition: `(b_r,)` integer labels of this rank's items, or `None`. `lsa`/`flip` then
            solve within each label over the whole group (`spec.within_condition`; see
            [conditional][lightning_immiscible.conditional]); the labels travel as one extra
            column of the gathered cost rows. The result's `prior_skew` is set. Or a `(b_r, E)`
            float embedding: `lsa`/`flip` solve `M + w C` over the whole group, every rank finding
            the same `w` from the same gathered matrix
            ([embedding][lightning_immiscible.embedding]); the conditions travel as `E` extra
            columns of the gathered rows. The result's `condition_leak` is set, from this rank's
            items (their data, conditions and coupled noise), like `prior_skew`'s data directions.
        race: `solver="auto"`'s race ([AutoSolver][lightning_immiscible.solver_race.AutoSolver]):
            decides the solver from the pool size the group agreed on.

    Returns:
        The local [CouplingResult][lightning_immiscible.coupling.CouplingResult]: `noise`
        `(b_r, *dims)`; `index` `(b_r,)` into the group pool (for `knn`: the chosen candidate);
        costs are group-wide means.

    Examples:
        ```python
        import torch
        from lightning_immiscible import CouplingSpec
        from lightning_immiscible.distributed import couple_in_group
        from lightning_immiscible.groups import build_rank_group

        group = build_rank_group("global")  # every rank, same order; one process: a group of one
        x0 = torch.rand(8, 16) * 2 - 1
        res = couple_in_group(x0, group, seed=0, draw_index=0, spec=CouplingSpec("lsa"))
        ```
    """
    step = agree_on_step(x, group, draw_index, spec, error=error, epoch=epoch, condition=condition, race=race)
    assert x is not None  # agree_on_step raised otherwise
    if spec.method == "knn":
        return _with_local_skew(_knn_local(x, seed, draw_index, spec), x, condition)
    pool = draw_pool((step.total, *x.shape[1:]), seed, group.index, draw_index, x.device)
    solving = spec.method != "none" and step.total > 1
    if solving and race is not None and spec.solver == "auto":
        spec = dataclasses.replace(spec, solver=race.solver_for(step.total, x[0].numel(), spec.metric))
    found = Assignment(torch.arange(step.offset, step.offset + x.shape[0], device=x.device), 0.0, 0.0)
    skew = None
    gather = functools.partial(_gather_rows, group, sizes=step.sizes)
    if solving and is_embedding(condition):
        embedding = condition if spec.within_condition else None  # False: plain OT across conditions
        found = assign(
            x, pool, spec, gather_rows=gather, offset=step.offset, dtype=step.dtype, embedding=embedding
        )
    elif solving and condition is not None:
        found, skew = _assign_with_labels(x, pool, condition, spec, gather, step)
    elif solving:
        found = assign(x, pool, spec, gather_rows=gather, offset=step.offset, dtype=step.dtype)
    if race is not None and solving:
        found = dataclasses.replace(found, solve_ms=max(found.solve_ms - race.extra_ms(), 0.0))
        race.record()
    noise = pool.index_select(0, found.index).to(x.dtype)
    before, after = _group_mean(group, list(pair_distances(found, x, pool, step.offset, spec)))
    result = found.result(noise, before, after, spec)
    if skew is not None:
        return dataclasses.replace(result, prior_skew=skew)
    return _with_local_skew(result, x, condition)


def _validate_local(
    x: Tensor | None, error: BaseException | None, metric: str
) -> tuple[BaseException | None, bool]:
    """This rank's input check and whether its costs need float64, from one pass over `x`.

    Returns:
        `(error, wide)`: the error to send to the group (or `None`), and whether the costs need
        float64 (float64 data, or fp32 costs that could overflow: decided from `x`'s range and a
        bound on the noise, 10 standard deviations, before the pool is drawn, so that the group
        agrees on one dtype for the gathered rows in the header exchange). Data so large that even
        float64 costs would overflow is an error here, on its rank, named for every rank.
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
        ranges = checked_ranges(x.detach(), x.detach())[:1]  # one min/max pass: NaN/Inf and range
        check_cost_range([*ranges, (10.0, 10.0)], x[0].numel(), metric)  # float64 overflow, named
    except CouplingInputError as exc:
        return exc, False
    wide = x.dtype == torch.float64
    return None, range_cost_dtype([*ranges, (10.0, 10.0)], x[0].numel(), metric, wide) == torch.float64


def _condition_error(x: Tensor | None, condition: Tensor | None, metric: str) -> CouplingInputError | None:
    problem = condition_problem(condition, x.shape[0], metric) if x is not None else None
    return CouplingInputError(*problem) if problem else None


def _gather_rows(group: RankGroup, rows: Tensor, sizes: list[int]) -> Tensor:
    """All-gathers uneven `(b_r, B)` cost rows into the `(B, B)` matrix (pad, gather, trim)."""
    if group.process_group is None:
        return rows
    padded = place(rows.new_zeros((max(sizes), rows.shape[1])), group)
    padded[: rows.shape[0]] = place(rows, group)
    out = [torch.empty_like(padded) for _ in sizes]
    with collective(group, "cost-row all_gather"):
        dist.all_gather(out, padded, group=group.process_group)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]).cpu()


def _group_mean(group: RankGroup, values: list[Tensor]) -> list[float]:
    """Group-wide means of per-item tensors (one tiny all-reduce of the sums and the count)."""
    sums = torch.tensor([float(v.sum()) for v in values] + [float(values[0].numel())], dtype=torch.float64)
    if group.process_group is not None:
        sums = place(sums, group)
        with collective(group, "statistics all_reduce"):
            dist.all_reduce(sums, group=group.process_group)
        sums = sums.cpu()
    count = float(sums[-1])
    return [float(s) / count if count else 0.0 for s in sums[:-1]]


def _assign_with_labels(
    x: Tensor,
    pool: Tensor,
    condition: Tensor,
    spec: CouplingSpec,
    gather: functools.partial,
    step: AgreedStep,
) -> tuple[Assignment, float | None]:
    """Group coupling with labels (within or across conditions) and the group-wide prior skew."""
    col, labels, cost_ms, solve_ms = assign_gathered(
        x, pool, condition, gather, metric=spec.metric, precision=spec.precision, solver=spec.solver,
        flip=spec.method == "flip", within=spec.within_condition, dtype=step.dtype,
    )  # fmt: skip
    col_t = torch.from_numpy(col).to(x.device)
    skew = prior_skew(x, condition, *class_noise_means(pool[col_t], labels))
    return Assignment(col_t[step.offset : step.offset + x.shape[0]], cost_ms, solve_ms), skew


def _with_local_skew(result: CouplingResult, x: Tensor, condition: Tensor | None) -> CouplingResult:
    """Adds the prior skew (labels) or the condition leak (an embedding) from this rank's items alone.

    The prior skew so computed is exact for `none`, per-item `knn` and a group of one rank.
    """
    if condition is None:
        return result
    if is_embedding(condition):
        return dataclasses.replace(result, condition_leak=condition_leak(x, condition, result.noise))
    return dataclasses.replace(
        result, prior_skew=prior_skew(x, condition, *class_noise_means(result.noise, condition))
    )


def _knn_local(x: Tensor, seed: int, draw_index: int, spec: CouplingSpec) -> CouplingResult:
    """Knn needs no cross-item matching: each rank draws its own candidates (after the header check)."""
    shape = (x.shape[0], spec.k, *x.shape[1:])
    cand = draw_noise(shape, seed, Stream.KNN, process_rank(), draw_index, device=x.device)
    return CouplingSpec("knn", spec.metric).couple(x, cand.to(x.dtype))
