"""``ImmiscibleCoupling``: the Lightning callback that couples each training batch with its noise."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_immiscible.coupling import CouplingResult, CouplingSpec, Method, Metric, Precision
from lightning_immiscible.distributed import agree_on_step, couple_in_group
from lightning_immiscible.embedding import ConditionMetric
from lightning_immiscible.groups import (
    SINGLE,
    RankGroup,
    broadcast_from_first,
    build_rank_group,
    build_world_group,
    destroy_groups,
    distributed_ready,
    partition_ranks,
)
from lightning_immiscible.mixin import CoupledBatch, ImmiscibleMixin, Notices, hand_off
from lightning_immiscible.monitoring import (
    WARMUP_BATCHES,
    changed_settings,
    coupling_metrics,
    warn_changed_settings,
    warn_noise_not_taken,
    warn_overhead,
    warn_pool_size,
    warn_worker_ignores_condition,
)
from lightning_immiscible.sizing import choose_group_size
from lightning_immiscible.solver_race import AutoSolver
from lightning_immiscible.streams import Stream, draw_noise
from lightning_immiscible.worker_batches import WorkerBatches, full_precision, worker_coupling
from lightning_immiscible.workers import WorkerCoupling

#: Which ranks pool their batches for one assignment (an int: groups of that many ranks).
Scope = Literal["global", "local", "node", "auto"]

#: The CPU device (the default of per-fit state before a fit starts).
CPU = torch.device("cpu")

#: Pools at least this large get an up-front warning: LSA is about cubic in the pool size.
LARGE_POOL = 4096


@dataclass
class FitState:
    """What the callback learns during one fit; built fresh in `setup("fit")`.

    Attributes:
        seed: The noise stream's seed for this fit (the constructor's, the checkpoint's, or rank
            0's `torch.initial_seed()`); `None` until the fit starts.
        race: `solver="auto"`'s race ([AutoSolver][lightning_immiscible.solver_race.AutoSolver]).
        notices: The warnings given once in this fit.
        workers: DataLoader-worker batches
            ([WorkerBatches][lightning_immiscible.worker_batches.WorkerBatches]).
        restored: Whether the stream was restored from a checkpoint.
        draws: Coupled micro-batches so far: the noise stream's position.
        auto_group_size: The group size `scope="auto"` chose (`None` until it decided).
        world: The world group (seed and `scope="auto"` broadcasts; the header's group).
        group: This rank's coupling group.
        created: Every group built in this fit (destroyed in `teardown`).
        world_size: The Trainer's world size.
        device: The strategy's root device (exchanges run there under NCCL).
        overhead: `(assign_ms, step_ms)` of the first batches.
        last_result: The latest batch's [CouplingResult][lightning_immiscible.coupling.CouplingResult].
    """

    seed: int | None
    race: AutoSolver = field(default_factory=AutoSolver)
    notices: Notices = field(default_factory=Notices)
    workers: WorkerBatches = field(default_factory=WorkerBatches)
    restored: bool = False
    draws: int = 0
    auto_group_size: int | None = None
    world: RankGroup = SINGLE
    group: RankGroup = SINGLE
    group_scope: str | int | None = None
    created: list[RankGroup] = field(default_factory=list)
    world_size: int = 1
    device: torch.device = CPU
    overhead: list[tuple[float, float]] = field(default_factory=list)
    last_result: CouplingResult | None = None
    batch_start: float = 0.0
    last_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.workers.notices = self.notices


class ImmiscibleCoupling(Callback):
    r"""Pairs each training batch with its noise by Immiscible Diffusion's assignment.

    Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment",
    NeurIPS 2024. In `on_train_batch_start` the callback takes `x0 = pl_module.immiscible_data(batch)`
    (once per batch), draws Gaussian noise, re-pairs it with `x0` (across the ranks of its coupling
    group) and hands a [CoupledBatch][lightning_immiscible.mixin.CoupledBatch] to the module, whose
    `noise_like(x0)` and `coupled_data(batch)` read it; the callback releases it in
    `on_train_batch_end` (and `on_exception`) and warns once when the module never took the coupled
    noise. Batches that a DataLoader worker already coupled
    ([CouplingCollate][lightning_immiscible.workers.CouplingCollate]) are used as they are. Every
    coupled batch logs `immiscible/cost_before`, `immiscible/cost_after`, `immiscible/reduction_pct`,
    `immiscible/assign_ms`, `immiscible/group_size`, `immiscible/noise_taken` (1 when the module took
    the coupled noise) and `immiscible/noise_norm2` (the coupled noise's mean squared value per
    dimension: about 1 for Gaussian noise, lower when `knn` tilts it toward the data); the Trainer's
    `log_every_n_steps` decides how often they are written.

    The noise stream is a pure function of ``(seed, group, draw)``, where ``draw`` counts coupled
    micro-batches; both are checkpointed, so a resumed run draws the same noise as an uninterrupted
    one. Under DDP every rank of a group draws the same pool locally: only ``B x B`` cost rows and a
    small per-step header cross the network, never noise or data. Every rank sends that header on
    every path and outcome, so an error on any rank ends every rank in the same step, with that
    rank's own message.

    Everything the callback learns in a fit (the resolved seed, its process groups, the overhead
    probe, `scope="auto"`'s and `solver="auto"`'s decisions, its warnings) is built in
    `setup("fit")` and released in `teardown`: two fits with one instance behave like two fresh
    callbacks, and only a checkpoint carries the stream from one fit to the next.

    Args:
        method: ``"lsa"`` (the paper's exact assignment), ``"knn"`` (nearest of ``k`` candidates
            per item; no cost rows exchanged; tilts the noise distribution), ``"flip"`` (the paper's
            non-OT ablation) or ``"none"`` (baseline: same code path and logs, no re-pairing).
        metric: ``"l2"`` (the paper's), ``"sqeuclidean"`` or ``"l1"``.
        scope: Which ranks pool their batches for one assignment: ``"global"`` (all: the coupling
            of the whole global batch), ``"local"`` (each rank alone), ``"node"`` (the ranks of one
            node), an int (consecutive groups of that many ranks) or ``"auto"`` (couple locally for
            the first batches, measure the step time, then use the largest group whose measured
            assignment time is within ``max_step_fraction`` of the step; logged and checkpointed).
        precision: Cost-matrix matmul precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU),
            ``"fp32"``, ``"bf16"``, ``"fp16"``.
        solver: Assignment solver, or ``"auto"``: the exact solver of the fixed rule
            ([choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]), refined for
            items of more than 64 values and pools of 256 items and more by a short race on the
            first batches of each (pool, D, metric)
            ([AutoSolver][lightning_immiscible.solver_race.AutoSolver]), decided alike on every
            rank of a group from the times in the per-step header, for the pool size the ranks
            agreed on. Or a name from
            [available_solvers][lightning_immiscible.solvers.available_solvers]. The ranks of a
            group must have the same solver setting: a group whose ranks differ fails at its first
            batch with a message naming them.
        k: Candidates per item for ``method="knn"``.
        seed: Seed of the noise stream, an int in ``[0, 2**63)``; ``None``: rank 0's
            `torch.initial_seed()` when each fit starts, shared with all ranks, so
            `seed_everything(s)` makes the coupled noise reproducible. A checkpoint's seed wins
            on resume (the stream continues).
        prog_bar: Also show ``reduction_pct`` and ``assign_ms`` in the progress bar.
        max_step_fraction: Share of the training step (> 0) the assignment may take:
            above it the callback warns once (measured over the first batches); ``scope="auto"``
            sizes groups to stay within it.
        collective_timeout_s: Timeout, in seconds (> 0), of every collective this callback issues:
            the creation of its process groups, the seed broadcast (only with ``seed=None``), the
            per-step header all-gather, the cost-row all-gather, the statistics all-reduce and
            ``scope="auto"``'s group-size broadcast. They then run in dedicated process groups
            with this timeout, and a rank that does not reach one fails with a message saying so.
            `None`: the process group's timeout. It cannot bound Lightning's or DDP's own
            collectives: a rank stalled outside the coupling is noticed there, within the
            strategy's timeout (`DDPStrategy(timeout=...)`). See the multi-node guide.
        within_condition: When the module's ``immiscible_condition(batch)`` returns labels, solve
            the assignment within each label (``lsa``/``flip``; see
            [conditional][lightning_immiscible.conditional]). ``False`` couples across labels
            (plain minibatch OT); the labels then only feed ``immiscible/prior_skew``, which is
            logged whenever labels are given (about N(0, 1) per batch when the noise given each
            class is Gaussian, clearly positive under cross-class coupling). When it returns a
            `(B, E)` float embedding, ``lsa``/``flip`` minimise the data-noise cost plus a weighted
            condition cost ([embedding][lightning_immiscible.embedding]; ``False``: plain OT) and
            the callback logs ``immiscible/condition_leak`` (about N(0, 1) per batch when the
            noise is independent of the condition), ``immiscible/condition_weight`` and
            ``immiscible/candidate_share``.
        candidate_share: For an embedding condition, the target share of candidate pairs, in
            (0, 1), that sets the condition weight per pool
            ([search_weight][lightning_immiscible.embedding.search_weight]); C²OT's 0.2.
        condition_metric: For an embedding condition, the distance between two conditions:
            ``"sqeuclidean"`` (standardised attributes, vectors whose length means something) or
            ``"cosine"`` (``1 - cos``: text embeddings such as CLIP's, compared by direction).

    Raises:
        ValueError: On an argument out of its range, naming the argument.

    Examples:
        ```python
        import lightning as L
        from lightning_immiscible import ImmiscibleCoupling, ImmiscibleMixin

        class Diffusion(ImmiscibleMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                x0 = self.coupled_data(batch)        # immiscible_data(batch), computed once
                noise = self.noise_like(x0)          # was: torch.randn_like(x0)
                ...

        trainer = L.Trainer(callbacks=[ImmiscibleCoupling(method="lsa", scope="global")])
        ```

        In a LightningCLI YAML (the choices are `Literal` types: `--trainer.callbacks.help
        lightning_immiscible.ImmiscibleCoupling` lists them, and a typo fails at parse time):

        ```yaml
        trainer:
          callbacks:
            - class_path: lightning_immiscible.ImmiscibleCoupling
              init_args: {method: lsa, scope: global}
        ```
    """

    def __init__(
        self,
        method: Method = "lsa",
        metric: Metric = "l2",
        scope: Scope | int = "global",
        precision: Precision = "auto",
        solver: str = "auto",
        k: int = 4,
        seed: int | None = None,
        prog_bar: bool = False,
        max_step_fraction: float = 0.25,
        collective_timeout_s: float | None = None,
        within_condition: bool = True,
        candidate_share: float = 0.2,
        condition_metric: ConditionMetric = "sqeuclidean",
    ) -> None:
        for name, value in (("prog_bar", prog_bar), ("within_condition", within_condition)):
            if not isinstance(value, bool):
                raise ValueError(f"ImmiscibleCoupling({name}={value!r}): {name} must be True or False.")
        spec = dict(method=method, metric=metric, precision=precision, solver=solver, k=k)
        conditioned = dict(
            within_condition=within_condition,
            candidate_share=candidate_share,
            condition_metric=condition_metric,
        )
        self.spec = CouplingSpec(**spec, **conditioned)  # type: ignore[arg-type]
        self.scope = _checked_scope(scope)
        self.seed = _checked_seed(seed)
        self.prog_bar = prog_bar
        self.max_step_fraction = _checked_positive("max_step_fraction", max_step_fraction)
        self.collective_timeout_s = (
            None
            if collective_timeout_s is None
            else _checked_positive("collective_timeout_s", collective_timeout_s)
        )
        self._fit = FitState(seed=self.seed)

    @property
    def state_key(self) -> str:
        """The plain key of the callback's state in a checkpoint (its settings are inside it)."""
        return type(self).__qualname__

    @property
    def resolved_seed(self) -> int | None:
        """The seed of the current (or last) fit's noise stream (`None` before a fit starts)."""
        return self._fit.seed

    @property
    def draws(self) -> int:
        """Coupled micro-batches in the current (or last) fit: the noise stream's position."""
        return self._fit.draws

    @property
    def last_result(self) -> CouplingResult | None:
        """The latest batch's [CouplingResult][lightning_immiscible.coupling.CouplingResult].

        `None` before the first batch of a fit (the next fit starts without it).
        """
        return self._fit.last_result

    @property
    def auto_group_size(self) -> int | None:
        """The group size `scope="auto"` chose in this fit (`None` until it decided)."""
        return self._fit.auto_group_size

    @property
    def race(self) -> AutoSolver:
        """This fit's `solver="auto"` race and decisions."""
        return self._fit.race

    @property
    def workers(self) -> WorkerBatches:
        """This fit's DataLoader-worker side (the train loader's `CouplingCollate`s and their seeds)."""
        return self._fit.workers

    @property
    def group(self) -> RankGroup:
        """This rank's coupling group (a group of one until the first coupled batch)."""
        return self._fit.group

    def settings(self) -> dict[str, Any]:
        """The settings saved with the stream in a checkpoint and compared on load."""
        spec = self.spec
        return {
            "method": spec.method, "metric": spec.metric, "scope": self.scope, "precision": spec.precision,
            "solver": spec.solver, "k": spec.k, "within_condition": spec.within_condition,
            "candidate_share": spec.candidate_share, "condition_metric": spec.condition_metric,
        }  # fmt: skip

    def effective_scope(self) -> str | int:
        """The scope used now: ``knn`` is always local; ``auto`` is local until its probe decides."""
        if self.spec.method == "knn":
            return "local"
        if self.scope == "auto":
            return self._fit.auto_group_size or "local"
        return self.scope

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        hand = hand_off(pl_module)  # raises for a module without the mixin
        if trainer.world_size > 1 and not distributed_ready():
            raise RuntimeError(
                f"ImmiscibleCoupling: the Trainer runs {trainer.world_size} processes but "
                "torch.distributed has no initialised process group, so the ranks could not tell "
                "their noise apart (every rank would draw the same pool). Use a strategy that "
                "initialises one (e.g. strategy='ddp', 'ddp_spawn', 'fsdp'), or run one process."
            )
        self._release_groups()  # a previous fit that ended in an exception left them
        self._fit = fit = FitState(seed=self.seed)
        hand.release()
        hand.notices = fit.notices
        fit.world_size, fit.device = trainer.world_size, trainer.strategy.root_device
        fit.world = build_world_group(self.collective_timeout_s, fit.device)
        fit.created.append(fit.world)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        hand_off(pl_module).release()
        self._release_groups()

    def _release_groups(self) -> None:
        fit = self._fit
        destroy_groups(*fit.created)
        fit.created.clear()
        fit.world = fit.group = SINGLE
        fit.group_scope = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint's state was restored (setup runs before it): the log shows the seed
        # the run uses, never a freshly drawn one that the checkpoint then replaces.
        fit = self._fit
        if fit.seed is None:
            # Rank 0's torch seed: `seed_everything(s)` makes the coupling reproducible too.
            fit.seed = broadcast_from_first(fit.world, torch.initial_seed() % 2**62, "seed")
        rank_zero_info(
            f"ImmiscibleCoupling: method={self.spec.method}, scope={self.scope!r}, "
            f"world size {trainer.world_size}, seed={fit.seed}"
            + (f" (restored from the checkpoint at draw {fit.draws})" if fit.restored else "")
        )

    def _ensure_group(self, trainer: pl.Trainer) -> None:
        """(Re)builds the rank group when the effective scope changed (same batch on all ranks)."""
        fit, scope = self._fit, self.effective_scope()
        if scope != fit.group_scope:
            per_node = max(trainer.num_devices, 1)
            fit.group = build_rank_group(scope, per_node, self.collective_timeout_s, fit.device, fit.world)
            fit.created.append(fit.group)
            fit.group_scope = scope

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        fit, hand = self._fit, hand_off(pl_module)
        self._ensure_group(trainer)
        fit.batch_start = time.perf_counter()
        draw, fit.draws = fit.draws, fit.draws + 1
        x0, error = _data(pl_module, batch)
        condition, error = _condition(pl_module, batch, error)
        worker, error = _worker(pl_module, batch, error)
        if worker is not None:
            agree_on_step(
                x0, fit.group, draw, self.spec, error=error, epoch=trainer.current_epoch,
                condition=condition, path="worker",
            )  # fmt: skip
            assert x0 is not None  # agree_on_step raised otherwise
            warn_worker_ignores_condition(condition, worker.condition, fit.notices)
            result = self._from_worker(x0, worker, trainer, batch_idx, condition)
        else:
            result = self._couple(x0, error, draw, trainer.current_epoch, condition)
        assert x0 is not None  # couple_in_group raised otherwise
        hand.give(CoupledBatch(batch=batch, x0=x0, result=result, draw=draw))
        fit.last_result, fit.last_shape = result, tuple(x0.shape)
        warn_pool_size(
            x0.shape[0] * fit.group.size, self.spec.method, result.assign_ms, LARGE_POOL, fit.notices
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Worker-side coupling: batch positions restart per epoch (reaches non-persistent workers,
        # which start after this hook from epoch 1 on; the callback checks every batch anyway).
        self._fit.workers.start_epoch(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fit, hand = self._fit, hand_off(pl_module)
        coupled, taken = hand.coupled, hand.taken
        hand.release()
        if coupled is None:
            return
        if not taken:
            warn_noise_not_taken(fit.notices)
        self._log(pl_module, coupled.result, coupled.x0.shape[0], taken)
        if len(fit.overhead) < WARMUP_BATCHES + 2:
            fit.overhead.append((coupled.result.assign_ms, (time.perf_counter() - fit.batch_start) * 1e3))
            warn_overhead(fit.overhead, self.max_step_fraction, fit.notices)
        if self.scope == "auto" and fit.auto_group_size is None and len(fit.overhead) > WARMUP_BATCHES:
            self._decide_group_size(trainer, coupled.x0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # When the module's on_train_batch_start returns -1, Lightning skips the rest of the epoch
        # without on_train_batch_end: release here, before validation and sampling.
        hand_off(pl_module).release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, ImmiscibleMixin):
            hand_off(pl_module).release()
        self._fit.last_result = None

    def _decide_group_size(self, trainer: pl.Trainer, x0: Tensor) -> None:
        """``scope="auto"``: rank 0 measures candidate pools, every rank adopts its choice."""
        fit, size = self._fit, 1
        if trainer.is_global_zero:
            step_ms = statistics.median(max(s - a, 0.0) for a, s in fit.overhead[1:])
            decision = choose_group_size(
                trainer.world_size, x0.shape[0], x0.shape[1:], step_ms, self.max_step_fraction,
                self.spec, device=x0.device,
            )  # fmt: skip
            size = decision.size
            rank_zero_info(f"ImmiscibleCoupling: {decision.describe()}")
        fit.auto_group_size = broadcast_from_first(fit.world, size, "scope='auto' group size")

    @override
    def state_dict(self) -> dict[str, Any]:
        fit = self._fit
        return {
            "settings": self.settings(),
            "seed": fit.seed,
            "draws": fit.draws,
            "auto_group_size": fit.auto_group_size,
            "world_size": fit.world_size,
            "race": fit.race.state_dict(),
            "worker_seeds": fit.workers.seeds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fit = self._fit
        fit.seed, fit.draws, fit.restored = state_dict["seed"], int(state_dict["draws"]), True
        fit.workers.seeds = list(state_dict.get("worker_seeds", []))
        changed = changed_settings(state_dict.get("settings", {}), self.settings())
        if changed:
            warn_changed_settings(changed, fit.seed, fit.draws, fit.notices)
        elif state_dict.get("world_size", fit.world_size) != fit.world_size:
            rank_zero_info(
                f"ImmiscibleCoupling: resuming a world of {state_dict['world_size']} rank(s) on "
                f"{fit.world_size}; the noise stream continues at draw {fit.draws}, with pools of the "
                "new group sizes."
            )
        else:
            fit.auto_group_size = state_dict.get("auto_group_size")
            fit.race.load_state_dict(state_dict.get("race", {}))

    def _from_worker(
        self,
        x0: Tensor,
        worker: WorkerCoupling,
        trainer: pl.Trainer,
        batch_idx: int,
        condition: Tensor | None,
    ) -> CouplingResult:
        """The noise a DataLoader worker coupled (see the `worker_batches` module)."""
        fit = self._fit
        local = self.spec.method == "knn" or self.effective_scope() == "local" or fit.world_size == 1
        note = (
            "ImmiscibleCoupling: batches carry noise coupled in DataLoader workers (CouplingCollate); "
            "using it as is: the collate's method applies and its coupling is per rank, whatever "
            f"this callback's scope ({self.scope!r})."
        )
        return fit.workers.result(
            x0, worker, trainer, batch_idx, metric=self.spec.metric, note=note, warn=not local,
            fallback=lambda x: self._couple_alone(x, trainer.global_rank, condition),
        )  # fmt: skip

    def _couple_alone(self, x0: Tensor, rank: int, condition: Tensor | None) -> CouplingResult:
        """Couples on this rank, no collective: the callback's method, `Stream.FALLBACK` at this draw."""
        fit = self._fit
        k = (self.spec.k,) if self.spec.method == "knn" else ()
        shape = (x0.shape[0], *k, *x0.shape[1:])
        noise = draw_noise(shape, int(fit.seed or 0), Stream.FALLBACK, rank, fit.draws - 1, device=x0.device)
        return self.spec.couple(x0, noise.to(x0.dtype), condition=condition)

    def _log(
        self, pl_module: pl.LightningModule, result: CouplingResult, batch_size: int, taken: bool
    ) -> None:
        values = coupling_metrics(result, self._fit.group.size) | {"noise_taken": float(taken)}
        if result.method == "worker":
            values |= self._worker_times()
        if result.prior_skew is not None:  # labels were given: the skew of the class priors
            values["prior_skew"] = result.prior_skew
        for name in ("condition_leak", "condition_weight", "candidate_share"):  # an embedding
            value = getattr(result, name)
            if value is not None:
                values[name] = value
        for name, value in values.items():
            show = self.prog_bar and name in ("reduction_pct", "assign_ms")
            pl_module.log(
                f"immiscible/{name}",
                value,
                on_step=True,
                on_epoch=False,
                prog_bar=show,
                batch_size=batch_size,
            )

    def _worker_times(self) -> dict[str, float]:
        """A worker-coupled batch's time off the critical path: its assignment, or its map search."""
        workers = self._fit.workers
        if workers.map_search_ms is None or workers.map_items is None:
            return {"worker_assign_ms": workers.assign_ms}
        return {"map_search_ms": workers.map_search_ms, "map_items": float(workers.map_items)}

    def _couple(
        self, x0: Tensor | None, error: BaseException | None, draw: int, epoch: int, condition: Tensor | None
    ) -> CouplingResult:
        """Couples in the group; ``solver="auto"``'s race advances from the header rows (no collective)."""
        fit = self._fit
        with full_precision(x0):
            result = couple_in_group(
                x0, fit.group, int(fit.seed or 0), draw, self.spec, error, epoch, condition, fit.race
            )
        for note in fit.race.pop_notes():
            rank_zero_info(note)
        return result


def _checked_scope(scope: object) -> str | int:
    if scope != "auto":
        try:
            partition_ranks(scope, 1, 1)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"ImmiscibleCoupling(scope={scope!r}): {exc}") from exc
    return scope  # type: ignore[return-value]


def _checked_seed(seed: object) -> int | None:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        return seed  # type: ignore[return-value]
    raise ValueError(f"ImmiscibleCoupling(seed={seed!r}): seed must be None or an int in [0, 2**63).")


def _checked_positive(name: str, value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value
    if not ok or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"ImmiscibleCoupling({name}={value!r}): {name} must be a finite number > 0.")
    return float(value)  # type: ignore[arg-type]


def _data(module: Any, batch: Any) -> tuple[Tensor | None, BaseException | None]:
    """Gets `x0`; an error is returned, not raised, so that every rank fails together."""
    try:
        return module.immiscible_data(batch), None
    except Exception as exc:
        return None, exc


def _condition(
    module: Any, batch: Any, error: BaseException | None
) -> tuple[Tensor | None, BaseException | None]:
    """Gets the labels (`immiscible_condition`); an error is returned like `_data`'s."""
    try:
        return module.immiscible_condition(batch), error
    except Exception as exc:
        return None, error or exc


def _worker(
    module: Any, batch: Any, error: BaseException | None
) -> tuple[WorkerCoupling | None, BaseException | None]:
    """The worker-coupled noise of this batch, if any; an error is returned like `_data`'s."""
    try:
        return worker_coupling(module, batch), error
    except RuntimeError as exc:
        return None, error or exc
