"""The per-step header: what every rank tells the others before it couples a batch.

Every rank of the world sends one int64 header per coupled micro-batch, on every path (the
callback couples the batch, or a DataLoader worker already did) and every outcome (its input is
fine, or preparing it failed), in one all-gather over the world. So every rank issues the same
collectives in the same order whatever happened on the others, and a failure on any rank ends
every rank in the same step, with that rank's own message.

Layout (`HEADER_SIZE` int64 values): the named `FIELDS`, then `DIMS` item dims, then the failing
rank's message as `MESSAGE_BYTES` UTF-8 bytes.

- `b`: this rank's items; `status`: 0 = ok, else `1 + REASONS.index(reason)`;
- `epoch`, `draw`: where the rank is in the noise stream (ranks must agree);
- `wide`: the rank's costs need float64; `solver`: a code of the solver setting (ranks of a group
  must agree, see [solver_code][lightning_immiscible.protocol.solver_code]);
- `path`: `PATHS.index(path)`; `condition`, `condition_dim`: the kind of condition and, for an
  embedding, its width `E` (see [condition_code][lightning_immiscible.protocol.condition_code]);
- `race_pool`, `race_dim`, `race_us0`, `race_us1`: the `solver="auto"` race's report of the previous
  race batch ([SolverRace][lightning_immiscible.solver_race.SolverRace]);
- `ndim`, `numel`, then the first `DIMS` item dims.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.conditional import LABEL_DTYPES
from lightning_immiscible.coupling import CouplingSpec
from lightning_immiscible.embedding import is_embedding
from lightning_immiscible.groups import RankGroup, collective, place, process_rank
from lightning_immiscible.solvers import SOLVERS, SolverSpec

#: Why a rank could not couple: the header's `status` is `1 + REASONS.index(reason)`.
REASONS: tuple[str, ...] = (
    "invalid", "non_finite", "dtype", "shape", "no_tensor", "device", "empty", "exception",
    "out_of_step", "solver", "path",
)  # fmt: skip

#: Who couples a batch: the callback (over its group) or a DataLoader worker (already done).
StepPath = Literal["group", "worker"]
PATHS: tuple[StepPath, ...] = get_args(StepPath)

FIELDS: tuple[str, ...] = (
    "b", "status", "epoch", "draw", "wide", "solver", "path", "condition", "condition_dim",
    "race_pool", "race_dim", "race_us0", "race_us1", "ndim", "numel",
)  # fmt: skip
#: The race's fields (filled by the `solver="auto"` race).
RACE_FIELDS: tuple[str, ...] = ("race_pool", "race_dim", "race_us0", "race_us1")
#: Item dims sent; shapes with more dims are compared by `ndim` and `numel` beyond these.
DIMS = 6
#: Bytes of a failing rank's message carried in the header (longer messages are cut).
MESSAGE_BYTES = 256
_AT = {name: i for i, name in enumerate(FIELDS)}
_DIMS_AT = len(FIELDS)
_MESSAGE_AT = _DIMS_AT + DIMS
HEADER_SIZE = _MESSAGE_AT + MESSAGE_BYTES // 8
"""int64 values per header (the bytes one rank sends per step: `8 * HEADER_SIZE`)."""


def solver_identity(spec: CouplingSpec) -> str:
    """What decides a rank's assignment, compared across its group: `""` without one (`knn`, `none`).

    A registered name, the name of a passed [SolverSpec][lightning_immiscible.solvers.SolverSpec],
    or for `"auto"` the installed exact solvers it chooses from.
    """
    if spec.method in ("knn", "none"):
        return ""
    if isinstance(spec.solver, SolverSpec):
        return spec.solver.name
    if spec.solver == "auto":
        return "auto over " + ", ".join(sorted(s.name for s in SOLVERS.values() if s.exact))
    return str(spec.solver)


def solver_code(identity: str) -> int:
    """The header's `solver` field for a solver identity (0: no solver, e.g. `knn` and `none`)."""
    return zlib.crc32(identity.encode()) if identity else 0


#: The header's `condition` code of a `(B, E)` float embedding (any float dtype: its values travel
#: exactly in the gathered rows, float64 ones in float64 rows).
EMBEDDING_CODE = 1 + len(LABEL_DTYPES)


def condition_code(condition: Tensor | None) -> int:
    """The header's `condition` field: 0 without a condition, else the kind of condition.

    `1 + LABEL_DTYPES.index(dtype)` for labels, `EMBEDDING_CODE` for an embedding.
    """
    if condition is None:
        return 0
    return EMBEDDING_CODE if is_embedding(condition) else 1 + LABEL_DTYPES.index(condition.dtype)


def condition_dim(condition: Tensor | None) -> int:
    """The header's `condition_dim` field: an embedding's width `E`, else 0."""
    return int(condition.shape[1]) if is_embedding(condition) else 0  # type: ignore[union-attr]


def error_reason(error: BaseException) -> str:
    """The `REASONS` entry of an error (`"exception"` for anything but a known input error)."""
    reason = getattr(error, "reason", "exception")
    return reason if reason in REASONS else "exception"


def encode(
    x: Tensor | None, error: BaseException | None, fields: dict[str, int], path: StepPath = "group"
) -> Tensor:
    """This rank's header: `(HEADER_SIZE,)` int64 on the CPU.

    Args:
        x: `(b, *dims)` this rank's data (`None` when preparing it failed).
        error: What failed on this rank, or `None`.
        fields: Values of named `FIELDS` (`epoch`, `draw`, `wide`, `solver`, `condition`,
            `condition_dim`, race).
        path: Who couples this batch.
    """
    head = [0] * HEADER_SIZE  # built in Python, one tensor at the end: this runs every step
    for name, value in {**fields, "path": PATHS.index(path)}.items():
        head[_AT[name]] = int(value)
    if error is not None or x is None:
        error = error or CouplingInputError("No data tensor to couple.", "no_tensor")
        head[_AT["status"]] = 1 + REASONS.index(error_reason(error))
        head[_MESSAGE_AT:] = _message_words(f"{type(error).__name__}: {error}").tolist()
        return torch.tensor(head, dtype=torch.int64)
    dims = tuple(x.shape[1:])
    head[_AT["b"]], head[_AT["ndim"]], head[_AT["numel"]] = x.shape[0], len(dims), math.prod(dims)
    head[_DIMS_AT : _DIMS_AT + min(len(dims), DIMS)] = dims[:DIMS]
    return torch.tensor(head, dtype=torch.int64)


def _message_words(text: str) -> np.ndarray:
    raw = text.encode("utf-8")[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0")
    return np.frombuffer(raw, dtype=np.int64).copy()


@dataclass(frozen=True)
class Headers:
    """The gathered headers: one row per rank of the world (one row in a single process).

    Attributes:
        rows: `(W, HEADER_SIZE)` int64 on the CPU.
        ranks: The global rank of each row.
    """

    rows: Tensor
    ranks: tuple[int, ...]

    def column(self, name: str) -> list[int]:
        """Every row's value of field `name`."""
        return self.rows[:, _AT[name]].tolist()

    def item_shape(self, i: int) -> tuple[int, ...]:
        """Row `i`'s `(ndim, numel, *dims)`: equal on ranks whose items have the same shape."""
        return tuple(self.rows[i, _AT["ndim"] : _MESSAGE_AT].tolist())

    def message(self, i: int) -> str:
        """Row `i`'s error message (empty when it is fine)."""
        raw = self.rows[i, _MESSAGE_AT:].numpy().tobytes().rstrip(b"\0")
        return raw.decode("utf-8", errors="replace")

    def of(self, group: RankGroup) -> Headers:
        """The rows of `group`'s ranks (all rows in a single process)."""
        if len(self.ranks) == 1:
            return self
        keep = [self.ranks.index(r) for r in group.ranks]
        return Headers(self.rows[keep], tuple(group.ranks))

    def fields(self) -> dict[str, list[int]]:
        """Every named field's column."""
        return {name: self.column(name) for name in FIELDS}


def exchange(group: RankGroup, head: Tensor) -> Headers:
    """All-gathers every rank's header over the world (`group.header_group`), on the exchange device."""
    if group.header_group is None:
        return Headers(head[None], (0,))
    sent = place(head, group)
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size(group.header_group))]
    with collective(group, "header all_gather"):
        dist.all_gather(out, sent, group=group.header_group)
    return Headers(torch.stack(out).cpu(), tuple(range(len(out))))


def agree(
    group: RankGroup, heads: Headers, error: BaseException | None, rank: int, identity: str = ""
) -> None:
    """Raises the same failure on every rank when any rank failed, is out of step or disagrees.

    Args:
        group: This rank's coupling group.
        heads: The world's headers.
        error: This rank's own failure (chained to the error raised here), or `None`.
        rank: This rank's global rank.
        identity: This rank's [solver_identity][lightning_immiscible.protocol.solver_identity].

    Raises:
        CouplingInputError: Naming the failing rank(s) and carrying their own messages (in a
            single process, this process's own error is raised as it is).
    """
    status = heads.column("status")
    failed = [i for i, s in enumerate(status) if s]
    if failed and error is not None and len(heads.ranks) == 1:
        raise error  # a single process: its own error, as it was raised
    if failed:
        raise _failure(heads, failed, rank) from error
    _agree_on_step(heads)
    _agree_on_condition(heads)
    mine = heads.of(group)
    if group.size > 1 and PATHS[mine.column("path")[0]] == "group":
        _agree_on_shapes(group, mine)
        _agree_on_solver(group, mine, identity)


def _failure(heads: Headers, failed: list[int], rank: int) -> CouplingInputError:
    named = "; ".join(f"rank {heads.ranks[i]}: {heads.message(i)}" for i in failed)
    reason = REASONS[heads.column("status")[failed[0]] - 1]
    who = "this rank" if rank in [heads.ranks[i] for i in failed] else "another rank"
    return CouplingInputError(
        f"ImmiscibleCoupling stopped on every rank at draw {heads.column('draw')[failed[0]]} because "
        f"{who} could not prepare its batch for the coupling ({reason}). {named}",
        reason,
    )


def _agree_on_step(heads: Headers) -> None:
    paths = heads.column("path")
    if len(set(paths)) > 1:
        by = {r: PATHS[p] for r, p in zip(heads.ranks, paths, strict=True)}
        raise CouplingInputError(
            f"Ranks coupled this batch on different paths (rank: path {by}; 'worker' = a DataLoader "
            "worker's CouplingCollate coupled it): give every rank the same train dataloader setup.",
            "path",
        )
    steps = list(zip(heads.column("epoch"), heads.column("draw"), strict=True))
    if len(set(steps)) > 1:
        raise CouplingInputError(
            f"Ranks reached the coupling at different batches ((epoch, draw) per rank "
            f"{list(heads.ranks)}: {[list(s) for s in steps]}): they run different numbers of training "
            "batches per epoch, so their batches would be coupled across epochs. Give every rank the "
            "same number of batches (Lightning's DistributedSampler does; with drop_last or equal-size "
            "shards).",
            "out_of_step",
        )


def _agree_on_condition(heads: Headers) -> None:
    kinds = list(zip(heads.column("condition"), heads.column("condition_dim"), strict=True))
    if len(set(kinds)) <= 1:
        return
    named = {r: _condition_name(c, e) for r, (c, e) in zip(heads.ranks, kinds, strict=True)}
    raise CouplingInputError(
        f"Ranks disagree on the coupling condition (rank: condition {named}): give the same kind of "
        "condition on every rank: `(B_r,)` labels of one integer dtype, `(B_r, E)` float "
        "embeddings of one width E, or None on all of them.",
        "invalid",
    )


def _condition_name(code: int, dim: int) -> str:
    if code == 0:
        return "none"
    return f"embedding (B, {dim})" if code == EMBEDDING_CODE else str(LABEL_DTYPES[code - 1])


def _agree_on_shapes(group: RankGroup, mine: Headers) -> None:
    shapes = [mine.item_shape(i) for i in range(len(mine.ranks))]
    if len(set(shapes)) > 1:
        raise CouplingInputError(
            f"Ranks of coupling group {group.index} have different item shapes (ndim, numel, dims per "
            f"rank {list(mine.ranks)}: {[list(s) for s in shapes]}); all ranks must couple tensors of "
            "the same shape (B_r, *dims).",
            "shape",
        )


def _agree_on_solver(group: RankGroup, mine: Headers, identity: str) -> None:
    """Exact solvers break ties differently, so the ranks of one group must run the same one."""
    codes = mine.column("solver")
    if len(set(codes)) <= 1:
        return
    known = {solver_code(n): repr(n) for n in SOLVERS} | {solver_code(identity): repr(identity)}
    named = ", ".join(
        f"rank {r}: {known.get(c, f'a solver not registered on rank {process_rank()} (code {c})')}"
        for r, c in zip(mine.ranks, codes, strict=True)
    )
    raise CouplingInputError(
        f"Ranks of coupling group {group.index} would solve the assignment with different solvers "
        f"({named}); exact solvers break ties differently, so the group would pair its pool in "
        "different ways. Install the same solver packages on every node, or pass a solver by name "
        "(e.g. ImmiscibleCoupling(solver='scipy')).",
        "solver",
    )
