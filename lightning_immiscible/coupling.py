"""Immiscible Diffusion's data-noise coupling as pure functions (torch + NumPy/SciPy, no Lightning).

Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment", NeurIPS
2024, Algorithm 1: before noising a minibatch `x0` (B items), re-pair the B i.i.d. Gaussian noise
vectors with the data so that the total data-noise distance is minimal (a linear assignment).
The noise multiset is unchanged, so the batch of noise is still Gaussian.

Every coupling path (this module's [couple][lightning_immiscible.coupling.couple], the group
coupling of [couple_in_group][lightning_immiscible.distributed.couple_in_group], the
`scope="auto"` sizing probe and the DataLoader-worker
[CouplingCollate][lightning_immiscible.workers.CouplingCollate]) is configured by one
[CouplingSpec][lightning_immiscible.coupling.CouplingSpec] and runs the same
cost -> solve -> timing step, [assign][lightning_immiscible.coupling.assign].

Examples:
    ```python
    import torch
    from lightning_immiscible import couple

    x0 = torch.rand(64, 3, 32, 32) * 2 - 1
    res = couple(x0, torch.randn_like(x0), method="lsa", metric="l2")
    x_t = 0.8 * x0 + 0.6 * res.noise  # res.noise[i] is paired with x0[i]
    ```
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_immiscible.checks import CouplingInputError, check_tensors, checked_ranges, cost_inputs
from lightning_immiscible.conditional import assign_within, class_noise_means, condition_problem, prior_skew
from lightning_immiscible.costs import (
    METRICS,
    PRECISIONS,
    CostRows,
    Metric,
    Precision,
    assigned_distances,
    check_choice,
    cost_rows,
    paired_distance,
    range_cost_dtype,
)
from lightning_immiscible.embedding import (
    CONDITION_METRICS,
    ConditionMetric,
    check_share,
    condition_leak,
    is_embedding,
    solve_with_embedding,
)
from lightning_immiscible.process_race import AUTO_RACE, ProcessRace
from lightning_immiscible.solvers import SolverSpec, resolve_solver, solve

Method = Literal["lsa", "knn", "flip", "none"]

METHODS: tuple[Method, ...] = get_args(Method)


@dataclass(frozen=True)
class CouplingSpec:
    """How to couple: one validated, immutable description used by every coupling path.

    [couple][lightning_immiscible.coupling.couple] builds one from its keyword arguments;
    [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling],
    [CouplingCollate][lightning_immiscible.workers.CouplingCollate],
    [couple_in_group][lightning_immiscible.distributed.couple_in_group] and the `scope="auto"`
    sizing probe hold one and pass it down whole. Each setting is checked once, when the spec is
    made, so a typo fails before any data is touched.

    Attributes:
        method: `"lsa"` (the paper: exact assignment minimising the total distance), `"knn"`
            (nearest of `k` candidates per item), `"flip"` (the paper's non-OT ablation: assign
            against `-noise`, diffuse with `noise`) or `"none"` (identity, the baseline).
        metric: `"l2"` (the paper's), `"sqeuclidean"` or `"l1"`.
        precision: Cost-matrix matmul precision: `"auto"` (fp16 on CUDA, fp32 elsewhere),
            `"fp32"`, `"bf16"`, `"fp16"`.
        solver: `"auto"` (the installed exact solver measured fastest for the item dimension,
            [choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver], refined for
            items of more than 64 values by a race per cost shape,
            [RaceBook][lightning_immiscible.solver_race.RaceBook]) or a name from
            [available_solvers][lightning_immiscible.solvers.available_solvers]. A plain `str`, not a
            `Literal`: the solver registry is open
            ([register_solver][lightning_immiscible.solvers.register_solver] adds names at run time),
            so the name is checked against the registry when the spec is made. An unregistered
            [SolverSpec][lightning_immiscible.solvers.SolverSpec] is used as it is (the callback's
            `solver="auto"` race passes one).
        k: Candidates per item that the library draws for `"knn"` (group and worker coupling).
            [couple][lightning_immiscible.coupling.couple] reads `k` from the shape of the noise
            it is given instead.
        within_condition: When a condition is given, couple with it: labels within each
            condition ([conditional][lightning_immiscible.conditional]), an embedding with the
            condition term ([embedding][lightning_immiscible.embedding]). `False` couples across
            conditions as without one; the condition then only feeds the diagnostic (`prior_skew`,
            `condition_leak`). Keyword-only.
        candidate_share: For an embedding condition: the target share `r` of candidate pairs that
            sets the condition weight `w` per pool
            ([search_weight][lightning_immiscible.embedding.search_weight]), `0 < r < 1`; C²OT's
            0.2 by default. Lower keeps each noise nearer its own condition. Keyword-only.
        condition_metric: The distance between two embedding conditions: `"sqeuclidean"` (vectors
            whose length means something: standardised attributes) or `"cosine"` (`1 - cos`, for
            embeddings compared by direction: CLIP text embeddings). Keyword-only.

    Inputs are always checked: NaN/Inf, and values so large that their costs would overflow
    float64, raise a `CouplingInputError` (the check rides on the pass that the costs need anyway,
    one device sync). Costs are computed from detached inputs: `x0` may require grad (an encoder's
    output), it is never modified, and the result's `noise` carries no graph.

    Raises:
        CouplingInputError: On an unknown method, metric, precision, solver or condition metric,
            `k < 1`, or a `candidate_share` outside (0, 1) (a `ValueError`).

    Examples:
        ```python
        import torch
        from lightning_immiscible import CouplingSpec

        spec = CouplingSpec(method="lsa", metric="sqeuclidean")
        x0 = torch.rand(16, 8) * 2 - 1
        res = spec.couple(x0, torch.randn_like(x0))
        ```
    """

    method: Method = "lsa"
    metric: Metric = "l2"
    precision: Precision = "auto"
    solver: str | SolverSpec = "auto"
    k: int = 4
    within_condition: bool = field(default=True, kw_only=True)
    candidate_share: float = field(default=0.2, kw_only=True)
    condition_metric: ConditionMetric = field(default="sqeuclidean", kw_only=True)

    def __post_init__(self) -> None:
        try:
            check_choice("method", self.method, METHODS)
            check_choice("metric", self.metric, METRICS)
            check_choice("precision", self.precision, PRECISIONS)
            check_choice("condition_metric", self.condition_metric, CONDITION_METRICS)
            check_share(self.candidate_share)
            resolve_solver(self.solver)
        except ValueError as exc:
            raise CouplingInputError(str(exc)) from exc
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise CouplingInputError(f"k must be >= 1 (candidates per item for knn), got {self.k!r}.")

    def couple(
        self, x0: Tensor, noise: Tensor, condition: Tensor | None = None, race: ProcessRace | None = None
    ) -> CouplingResult:
        """Re-pairs `noise` with `x0` as this spec says; see [couple][lightning_immiscible.coupling.couple].

        Args:
            x0: `(B, *dims)` floating-point data.
            noise: `(B, *dims)` Gaussian noise; for `"knn"` `(B, k, *dims)` candidates per item.
            condition: `(B,)` integer labels, a `(B, E)` float embedding, or `None`; see
                [couple_with_condition][lightning_immiscible.coupling.couple_with_condition].
            race: The race that `solver="auto"` consults and advances (an unconditional assignment
                of items of more than 64 values); `None`: the process's ``AUTO_RACE``.

        Returns:
            The [CouplingResult][lightning_immiscible.coupling.CouplingResult].
        """
        if condition is not None:
            return couple_with_condition(self, x0, noise, condition)
        x0, noise = _checked_detached(x0, noise, self.method)  # the values: one scan below
        b = x0.shape[0]
        if self.method == "knn" or self.method == "none" or b <= 1:
            ranges = checked_ranges(x0, noise)
            if self.method == "knn":
                return _couple_knn(x0, noise, self.metric)
            wide = torch.float64 in (x0.dtype, noise.dtype)
            dtype = range_cost_dtype(ranges, math.prod(x0.shape[1:]), self.metric, wide)
            before = _mean(paired_distance(x0, noise, self.metric, dtype)) if b else 0.0
            index = torch.arange(b, device=x0.device)
            return CouplingResult(noise, index, before, before, method=self.method, metric=self.metric)
        dtype, norms = cost_inputs(x0, noise, self.metric)
        dim = x0[0].numel()
        solver = (race or AUTO_RACE).solver(b, dim, self.metric) if self.solver == "auto" else None
        found = assign(x0, noise, self, dtype=dtype, norms=norms, solver=solver)
        paired = noise.index_select(0, found.index)
        before, after = pair_distances(found, x0, noise, 0, self)
        return found.result(paired, _mean(before), _mean(after), self)


@dataclass(frozen=True)
class CouplingResult:
    """The outcome of [couple][lightning_immiscible.coupling.couple].

    Attributes:
        noise: `(B, *dims)`, like `x0`: `noise[i]` is the noise paired with `x0[i]`.
        index: `(B,)` int64. For `lsa`/`flip`/`none`: `noise == input_noise[index]`.
            For `knn`: `index[i]` is the candidate chosen for item `i`.
        cost_before: Mean distance (in `metric`) of the pairs before re-pairing: `x0[i]` with
            `input_noise[i]` (`knn`: with candidate 0).
        cost_after: Mean distance of the returned pairs `x0[i]`, `noise[i]`.
        cost_ms: Wall time of the cost matrix (including gathering rows across ranks and the
            device-to-host copy), ms.
        solve_ms: Wall time of the assignment solver, ms.
        method: The coupling method used (`"worker"` for noise coupled in a DataLoader worker).
        metric: The distance used for the costs.
        prior_skew: With labels: the
            [prior_skew][lightning_immiscible.conditional.prior_skew] z-score of this batch (about
            N(0, 1) when the noise given each class is Gaussian); `None` otherwise.
        condition_leak: With an embedding: the
            [condition_leak][lightning_immiscible.embedding.condition_leak] z-score of this batch
            (about N(0, 1) when the noise is independent of the condition); `None` otherwise or
            when undefined (a constant condition).
        condition_weight: The condition weight `w` the pool was coupled with (an embedding,
            `lsa`/`flip` with `within_condition`); `None` otherwise.
        candidate_share: The share of candidate pairs `r(w)` that weight reached (or `None`).
    """

    noise: Tensor
    index: Tensor
    cost_before: float
    cost_after: float
    cost_ms: float = 0.0
    solve_ms: float = 0.0
    method: str = "lsa"
    metric: str = "l2"
    prior_skew: float | None = None
    condition_leak: float | None = None
    condition_weight: float | None = None
    candidate_share: float | None = None

    @property
    def assign_ms(self) -> float:
        """Total time of the coupling (cost matrix + solver), ms."""
        return self.cost_ms + self.solve_ms

    @property
    def reduction_pct(self) -> float:
        """Relative reduction of the mean pair distance, in percent (positive = closer pairs)."""
        if self.cost_before == 0 or not math.isfinite(self.cost_before - self.cost_after):
            return 0.0  # finite inputs always give finite costs (see cost_dtype); never NaN
        return 100.0 * (self.cost_before - self.cost_after) / self.cost_before


@dataclass(frozen=True)
class Assignment:
    """One solved assignment: the columns of this process's rows and what they cost in time.

    Attributes:
        index: `(b,)` int64 on the data's device: the noise (pool) item assigned to each row.
        cost_ms: Cost rows, their gathering across ranks and the device-to-host copy, ms.
        solve_ms: The solver, ms.
        rows: This process's `(b, B)` cost rows (on the data's device), from which
            [pair_distances][lightning_immiscible.coupling.pair_distances] reads the pairs'
            distances; `None` when no cost was built (`method="none"`, one item).
        weight: The condition weight `w` (an embedding condition), else `None`.
        share: The candidate share `w` reached, else `None`.
    """

    index: Tensor
    cost_ms: float
    solve_ms: float
    rows: CostRows | None = None
    weight: float | None = None
    share: float | None = None

    def result(
        self, noise: Tensor, cost_before: float, cost_after: float, spec: CouplingSpec
    ) -> CouplingResult:
        """The [CouplingResult][lightning_immiscible.coupling.CouplingResult] of this assignment."""
        return CouplingResult(
            noise, self.index, cost_before, cost_after, self.cost_ms, self.solve_ms, spec.method, spec.metric,
            condition_weight=self.weight, candidate_share=self.share,
        )  # fmt: skip


def assign(
    x: Tensor,
    noise: Tensor,
    spec: CouplingSpec,
    *,
    gather_rows: Callable[[Tensor], Tensor] | None = None,
    offset: int = 0,
    dtype: torch.dtype | None = None,
    norms: tuple[Tensor, Tensor] | None = None,
    solver: str | SolverSpec | None = None,
    embedding: Tensor | None = None,
) -> Assignment:
    """Cost -> solve -> timing: the one assignment step of every coupling path.

    Computes this process's cost rows (`x` against `noise`, or `-noise` for `"flip"`), turns them
    into the full square matrix with `gather_rows` (all ranks of a group; the identity for a
    single process), solves it with `spec.solver` and returns the columns of this process's rows.

    Args:
        x: `(b, *dims)` this process's data.
        noise: `(B, *dims)` the noise (a group's shared pool), `B >= b`.
        spec: Metric, precision, solver and method.
        gather_rows: Maps the `(b, B)` local rows to the `(B, B)` matrix of all rows in rank order;
            `None` when `x` is the whole batch.
        offset: Row of `x[0]` in the full matrix.
        dtype: The cost's dtype (a group's agreed one); `None` chooses it from the inputs (see
            [cost_dtype][lightning_immiscible.costs.cost_dtype]).
        norms: Squared norms of `x` and `noise` in `dtype`, when the caller has them already.
        solver: The solver for this call instead of `spec.solver`.
        embedding: `(b, E)` float conditions of `x`'s rows: solve `M + w C` instead
            ([solve_with_embedding][lightning_immiscible.embedding.solve_with_embedding]). In a
            group they ride as `E` extra columns of the gathered rows (the caller's `dtype` must
            hold them exactly: float64 for float64 conditions).

    Returns:
        The [Assignment][lightning_immiscible.coupling.Assignment]; `index` has shape `(b,)`.
    """
    start = time.perf_counter()
    target = -noise if spec.method == "flip" else noise
    rows = cost_rows(x, target, spec.metric, spec.precision, dtype, norms)
    if embedding is not None:
        return _assign_embedding(x, rows, embedding, spec, gather_rows, offset, solver, start)
    full = (rows.cost if gather_rows is None else gather_rows(rows.cost)).cpu()
    mid = time.perf_counter()
    # The item dimension lets solver="auto" pick the solver measured fastest for such costs; a
    # float32 cost needs no rescaling into float32's range.
    col = solve(full.double().numpy(), solver or spec.solver, dim=math.prod(noise.shape[1:]),
                in_float32_range=full.dtype == torch.float32)  # fmt: skip
    end = time.perf_counter()
    index = torch.from_numpy(col[offset : offset + x.shape[0]]).to(x.device)
    return Assignment(index, (mid - start) * 1e3, (end - mid) * 1e3, rows)


def _assign_embedding(
    x: Tensor,
    rows: CostRows,
    embedding: Tensor,
    spec: CouplingSpec,
    gather_rows: Callable[[Tensor], Tensor] | None,
    offset: int,
    solver: str | SolverSpec | None,
    start: float,
) -> Assignment:
    """[assign][lightning_immiscible.coupling.assign]'s gather and solve with an embedding condition."""
    b = rows.cost.shape[1]
    if gather_rows is None:  # one process: the conditions as they are, in float64
        full, z = rows.cost.cpu().double().numpy(), embedding.detach().cpu().double().numpy()
    else:
        cond = embedding.detach().to(rows.cost.device, rows.cost.dtype)
        gathered = gather_rows(torch.cat([rows.cost, cond], 1)).cpu().double().numpy()
        full, z = gathered[:, :b], gathered[:, b:]
    mid = time.perf_counter()
    col, weight, share = solve_with_embedding(
        full, z, share=spec.candidate_share, metric=spec.condition_metric, solver=solver or spec.solver,
        dim=math.prod(x.shape[1:]),
    )  # fmt: skip
    index = torch.from_numpy(col[offset : offset + x.shape[0]]).to(x.device)
    return Assignment(index, (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3, rows, weight, share)


def pair_distances(
    found: Assignment, x: Tensor, noise: Tensor, offset: int, spec: CouplingSpec
) -> tuple[Tensor, Tensor]:
    """Per-row distances before and after the re-pairing, from the cost rows already built.

    Args:
        found: The [Assignment][lightning_immiscible.coupling.Assignment] of `x`'s rows.
        x: `(b, *dims)` this process's data.
        noise: `(B, *dims)` the noise (pool) `found` assigned from.
        offset: Row of `x[0]` in the full matrix: before re-pairing `x[i]` has `noise[offset + i]`.
        spec: The coupling's metric and method.

    Returns:
        `(before, after)`, each `(b,)`: the distance of `x[i]` to `noise[offset + i]` and to
        `noise[found.index[i]]`, in `spec.metric`
        ([assigned_distances][lightning_immiscible.costs.assigned_distances]).
    """
    identity = torch.arange(offset, offset + x.shape[0], device=x.device)
    pairs = [assigned_distances(found.rows, x, noise, cols, spec.metric, spec.method == "flip")
             for cols in (identity, found.index)]  # fmt: skip
    return pairs[0], pairs[1]


def check_inputs(x0: Tensor, noise: Tensor, method: str = "lsa") -> None:
    """Validates `x0` and `noise` for [couple][lightning_immiscible.coupling.couple].

    Checks the tensors (types, dtypes, shapes, devices) and scans both for NaN/Inf (one device
    sync).

    Args:
        x0: `(B, *dims)` floating-point data.
        noise: `(B, *dims)`; for `knn` `(B, k, *dims)`.
        method: One of `METHODS`.

    Raises:
        CouplingInputError: With a message that says what is wrong and how to fix it.
    """
    x0, noise = _checked_detached(x0, noise, method)
    checked_ranges(x0, noise)


def _checked_detached(x0: Tensor, noise: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """`x0` and `noise` detached, after the checks that read no values (method, types, shapes).

    Every cost is computed from the detached tensors: no autograd graph, and an `x0` that requires
    grad stays the caller's, unmodified.
    """
    if method not in METHODS:
        raise CouplingInputError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    check_tensors(x0, noise, method)
    return x0.detach(), noise.detach()


def _mean(t: Tensor) -> float:
    return float(t.mean()) if t.numel() else 0.0


def _couple_knn(x0: Tensor, noise: Tensor, metric: str) -> CouplingResult:
    """Per item, keeps the nearest of its k candidates (no cross-item matching)."""
    start = time.perf_counter()
    b, k = noise.shape[:2]
    flat_x = x0.reshape(b, 1, -1).float()
    diff = flat_x - noise.reshape(b, k, -1).float()  # (B, k, D): the size of the noise itself
    if metric == "l1":
        dist = diff.abs().sum(-1)
    else:
        dist = diff.square().sum(-1)
        dist = dist.sqrt() if metric == "l2" else dist
    index = dist.argmin(1)
    chosen = noise[torch.arange(b, device=noise.device), index]
    ms = (time.perf_counter() - start) * 1e3
    before, after = _mean(dist[:, 0]), _mean(dist.gather(1, index[:, None]))
    return CouplingResult(chosen, index, before, after, ms, 0.0, "knn", metric)


def couple(
    x0: Tensor,
    noise: Tensor,
    *,
    method: Method = "lsa",
    metric: Metric = "l2",
    precision: Precision = "auto",
    solver: str = "auto",
    condition: Tensor | None = None,
    candidate_share: float = 0.2,
    condition_metric: ConditionMetric = "sqeuclidean",
) -> CouplingResult:
    """Re-pairs `noise` with `x0` (Immiscible Diffusion, Li et al. 2024, Algorithm 1).

    A shorthand for `CouplingSpec(method, metric, precision, solver, candidate_share=...,
    condition_metric=...).couple(x0, noise, condition)`:
    hold a [CouplingSpec][lightning_immiscible.coupling.CouplingSpec] to reuse one setting.

    Args:
        x0: `(B, *dims)` floating-point data batch (images, latents, any shape).
        noise: `(B, *dims)` i.i.d. Gaussian noise; for `method="knn"` `(B, k, *dims)`
            candidates per item.
        method: `lsa` (the paper: exact assignment minimising the total distance), `knn`
            (nearest of k candidates per item), `flip` (the paper's non-OT ablation: assign
            against `-noise`, diffuse with `noise`), `none` (identity, the baseline).
        metric: `l2` (the paper's), `sqeuclidean` or `l1`.
        precision: Cost-matrix matmul precision: `auto` (fp16 on CUDA, fp32 on CPU), `fp32`,
            `bf16`, `fp16`. The costs themselves are float32, or float64 for float64 inputs
            (`auto` then keeps a float64 matmul) and for values so large that fp32 costs would
            overflow (see [cost_dtype][lightning_immiscible.costs.cost_dtype]).
        solver: Assignment solver name (`auto` = the installed exact solver measured fastest for
            the item dimension, see
            [choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]; for items of
            more than 64 values and B >= 256, the first calls of each shape race the two fastest
            candidates on the same cost, return the rule's answer, and later calls use the faster:
            [RaceBook][lightning_immiscible.solver_race.RaceBook], once per process), or one of
            [available_solvers][lightning_immiscible.solvers.available_solvers].
        condition: `(B,)` integer labels (class ids, cluster ids of prompts): couple within each
            condition, so that the noise each class trains on stays Gaussian; or a `(B, E)` float
            embedding (text embeddings, attribute vectors): minimise the data-noise cost plus a
            weighted condition cost (C²OT); or `None` (see
            [couple_with_condition][lightning_immiscible.coupling.couple_with_condition]).
        candidate_share: For an embedding: the target share of candidate pairs that sets the
            condition weight ([search_weight][lightning_immiscible.embedding.search_weight]).
        condition_metric: For an embedding: `"sqeuclidean"` or `"cosine"` between conditions.

    Returns:
        A [CouplingResult][lightning_immiscible.coupling.CouplingResult]; `result.noise` is on
        `x0`'s device with `noise`'s dtype, detached. `x0` may require grad: the costs are computed
        from it detached, and it is never modified.

    Raises:
        CouplingInputError: For NaN/Inf, values so large that their costs would overflow float64,
            non-float tensors, mismatched shapes or unknown settings (always checked; the check
            rides on the pass over the inputs that the costs need anyway, one device sync).

    Examples:
        ```python
        import torch
        from lightning_immiscible import couple

        x0 = torch.rand(32, 3, 8, 8) * 2 - 1
        res = couple(x0, torch.randn_like(x0), method="lsa")
        assert res.cost_after <= res.cost_before
        ```
    """
    spec = CouplingSpec(
        method, metric, precision, solver, candidate_share=candidate_share, condition_metric=condition_metric
    )
    return spec.couple(x0, noise, condition)


def check_condition(condition: object, batch_size: int, metric: str = "sqeuclidean") -> None:
    """Raises a [CouplingInputError][lightning_immiscible.coupling.CouplingInputError] for a bad condition.

    Args:
        condition: `(B,)` integer labels >= 0, a `(B, E)` finite float embedding, or `None`.
        batch_size: `B`.
        metric: The condition metric (`"cosine"` refuses an all-zero embedding row).
    """
    problem = condition_problem(condition, batch_size, metric)
    if problem is not None:
        raise CouplingInputError(*problem)


def couple_with_condition(spec: CouplingSpec, x0: Tensor, noise: Tensor, condition: Tensor) -> CouplingResult:
    """Couples within each condition (`lsa`, `flip`), and measures the prior skew (every method).

    `lsa` and `flip` split the noise into one block per label and solve each block alone (see
    [conditional][lightning_immiscible.conditional]); with `spec.within_condition=False` they couple
    across labels as without a condition. `knn` picks per item among that item's own candidates, so
    a condition changes nothing there (its tilt toward each item's data is per item, and the
    diagnostic shows it); `none` keeps the identity pairing. Every method returns the
    [prior_skew][lightning_immiscible.conditional.prior_skew] of the batch.

    A `(B, E)` float embedding instead couples `lsa`/`flip` on `M + w C`
    ([embedding][lightning_immiscible.embedding]; across conditions with
    `spec.within_condition=False`), leaves `knn` and `none` as they are, and returns the
    [condition_leak][lightning_immiscible.embedding.condition_leak] (and `w`, `r`) instead.

    Args:
        spec: The coupling.
        x0: `(B, *dims)` data.
        noise: `(B, *dims)` noise (`knn`: `(B, k, *dims)`).
        condition: `(B,)` integer labels >= 0, or a `(B, E)` float embedding.

    Returns:
        The [CouplingResult][lightning_immiscible.coupling.CouplingResult] with `prior_skew` set
        (labels), or `condition_leak` set (an embedding).
    """
    x0, noise = _checked_detached(x0, noise, spec.method)
    check_condition(condition, x0.shape[0], spec.condition_metric)
    if is_embedding(condition):
        return _couple_with_embedding(spec, x0, noise, condition)
    if spec.method in ("lsa", "flip") and spec.within_condition and x0.shape[0] > 1:
        dtype, _ = cost_inputs(x0, noise, spec.metric)  # NaN/Inf and overflow: one pass
        before = _mean(paired_distance(x0, noise, spec.metric, dtype))
        index, cost_ms, solve_ms = assign_within(
            x0, noise, condition, metric=spec.metric, precision=spec.precision, solver=spec.solver,
            flip=spec.method == "flip", dtype=dtype,
        )  # fmt: skip
        paired = noise[index]
        after = _mean(paired_distance(x0, paired, spec.metric, dtype))
        result = CouplingResult(paired, index, before, after, cost_ms, solve_ms, spec.method, spec.metric)
    else:
        result = spec.couple(x0, noise)
    skew = prior_skew(x0, condition, *class_noise_means(result.noise, condition)) if x0.shape[0] else None
    return dataclasses.replace(result, prior_skew=skew)


def _couple_with_embedding(
    spec: CouplingSpec, x0: Tensor, noise: Tensor, condition: Tensor
) -> CouplingResult:
    """[couple_with_condition][lightning_immiscible.coupling.couple_with_condition] for an embedding."""
    if spec.method in ("lsa", "flip") and spec.within_condition and x0.shape[0] > 1:
        dtype, norms = cost_inputs(x0, noise, spec.metric)  # NaN/Inf and overflow: one pass
        found = assign(x0, noise, spec, dtype=dtype, norms=norms, embedding=condition)
        paired = noise.index_select(0, found.index)
        before, after = pair_distances(found, x0, noise, 0, spec)
        result = found.result(paired, _mean(before), _mean(after), spec)
    else:
        result = spec.couple(x0, noise)
    leak = condition_leak(x0, condition, result.noise)
    return dataclasses.replace(result, condition_leak=leak)
