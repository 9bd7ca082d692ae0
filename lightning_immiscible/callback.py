"""``ImmiscibleCoupling``: the Lightning callback that couples each training batch with its noise."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_immiscible.coupling import (
    CouplingResult,
    CouplingSpec,
    Method,
    Metric,
    Precision,
)
from lightning_immiscible.distributed import (
    RankGroup,
    broadcast_from_first,
    build_rank_group,
    build_world_group,
    couple_in_group,
    draw_pool,
    partition_ranks,
)
from lightning_immiscible.mixin import CoupledBatch, ImmiscibleMixin, as_immiscible_module
from lightning_immiscible.monitoring import (
    WARMUP_BATCHES,
    coupling_metrics,
    saved_coupling_state,
    warn_changed_setting,
    warn_overhead,
    warn_pool_size,
    warn_worker_ignores_condition,
)
from lightning_immiscible.sizing import choose_group_size
from lightning_immiscible.solver_race import AutoSolver
from lightning_immiscible.worker_batches import WorkerBatches, full_precision, worker_coupling
from lightning_immiscible.workers import WorkerCoupling

#: Which ranks pool their batches for one assignment (an int: groups of that many ranks).
Scope = Literal["global", "local", "node", "auto"]

#: Pools at least this large get an up-front warning: LSA is about cubic in the pool size.
LARGE_POOL = 4096


class ImmiscibleCoupling(Callback):
    r"""Pairs each training batch with its noise by Immiscible Diffusion's assignment.

    Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment",
    NeurIPS 2024. In `on_train_batch_start` the callback takes `x0 = pl_module.immiscible_data(batch)`
    (once per batch), draws Gaussian noise, re-pairs it with `x0` (across the ranks of its coupling
    group) and hands a [CoupledBatch][lightning_immiscible.mixin.CoupledBatch] to the module's
    `receive_coupled_batch`; the module's `noise_like(x0)` and `coupled_data(batch)` read it, and
    the callback releases it in `on_train_batch_end` (and `on_exception`). Batches that a
    DataLoader worker already coupled ([CouplingCollate][lightning_immiscible.workers.CouplingCollate])
    are used as they are. It logs `immiscible/cost_before`, `immiscible/cost_after`,
    `immiscible/reduction_pct`, `immiscible/assign_ms` and `immiscible/noise_norm2` (this
    rank's coupled noise, mean squared value per dimension: about 1 for Gaussian noise, lower when
    `knn` tilts it toward the data).

    The noise stream is a pure function of ``(seed, group, draw)``, where ``draw`` counts coupled
    micro-batches; both are checkpointed, so a resumed run draws the same noise as an uninterrupted
    one. Under DDP every rank of a group draws the same pool locally: only ``B x B`` cost rows and a
    small header cross the network, never noise or data.

    Args:
        method: ``"lsa"`` (the paper's exact assignment), ``"knn"`` (nearest of ``k`` candidates
            per item; no cost rows exchanged; tilts the noise distribution), ``"flip"`` (the paper's
            non-OT ablation) or ``"none"`` (baseline: same code path and logs, no re-pairing).
        metric: ``"l2"`` (the paper's), ``"sqeuclidean"`` or ``"l1"``.
        scope: Which ranks pool their batches for one assignment: ``"global"`` (all), ``"local"``
            (each rank alone; only a small per-batch header crosses the network, so bad input on
            one rank still fails all ranks), ``"node"`` (the ranks of one node), an int
            (consecutive groups of that many ranks) or ``"auto"`` (couple locally for the first
            batches, measure the step time, then use the largest group whose measured assignment
            time is within ``max_step_fraction`` of the step; the decision is logged and
            checkpointed).
        precision: Cost-matrix matmul precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU),
            ``"fp32"``, ``"bf16"``, ``"fp16"``.
        solver: Assignment solver, or ``"auto"``: for items of at most 64 values the exact
            solver measured fastest there
            ([choose_exact_solver][lightning_immiscible.solvers.choose_exact_solver]); for larger
            items, where ``lapjv`` and ``lapjvr`` trade places with the data and the pool size, a
            race: on the first 5 coupled batches of a pool shape both solve the same cost (the
            rule's assignment is used), then the one with the lower total time on 3 of them is
            kept ([AutoSolver][lightning_immiscible.solver_race.AutoSolver]; decided from the
            times every rank sends in the per-step header, identically on every rank of a group
            with no collective of its own; bounded per pool shape and per fit; logged and
            checkpointed). Or a name from
            [available_solvers][lightning_immiscible.solvers.available_solvers]. The ranks of a
            group must use the same solver: the header compares them, and a group whose ranks
            differ (e.g. nodes with different solver packages) fails at its first batch with a
            message naming them.
        k: Candidates per item for ``method="knn"``.
        seed: Seed of the noise stream; ``None``: rank 0's `torch.initial_seed()` at fit start,
            shared with all ranks, so `seed_everything(s)` makes the coupled noise reproducible.
        log_every_n_steps: Log the coupling metrics every this many coupled batches (0: never).
        prog_bar: Also show ``reduction_pct`` and ``assign_ms`` in the progress bar. With flow
            matching, a larger ``reduction_pct`` went with a larger gain of few-step samples in our
            regimes sweep (Spearman -0.90 across 32 cells; ``docs/when-does-it-help.md``); it did not
            predict the effect on DDPM, nor ``knn``'s.
        max_step_fraction: Share of the training step the assignment may take: above it the
            callback warns once (measured over the first batches); ``scope="auto"`` sizes groups
            to stay within it.
        collective_timeout_s: Timeout, in seconds, of every collective this callback issues: the
            creation of its process groups (setup, and when the coupling group changes), the seed
            broadcast at fit start (only with ``seed=None``), the per-batch header all-gather, the
            cost-row all-gather, the statistics all-reduce, and ``scope="auto"``'s group-size
            broadcast. When set, they run in dedicated process groups with this timeout, and a
            rank that does not reach one fails the others with a message naming the group.
            `None`: the process group's timeout. It cannot bound Lightning's or DDP's own
            collectives (the gradient all-reduce, Lightning's per-batch broadcast): a rank
            stalled or killed outside the coupling is noticed there, within the strategy's timeout
            (`DDPStrategy(timeout=...)`, 30 minutes by default). See the multi-node guide.
        check_finite: Check ``x0`` for NaN/Inf before coupling (one device sync per batch).
        within_condition: When the module's ``immiscible_condition(batch)`` returns labels, solve
            the assignment within each label (``lsa``/``flip``; see
            [conditional][lightning_immiscible.conditional]). ``False`` couples across labels
            (plain minibatch OT); the labels then only feed ``immiscible/prior_skew``, which is
            logged whenever labels are given (about N(0, 1) per batch when the noise given each
            class is Gaussian, clearly positive under cross-class coupling).

    Attributes:
        spec: The [CouplingSpec][lightning_immiscible.coupling.CouplingSpec] built from `method`,
            `metric`, `precision`, `solver`, `k` and `check_finite` (validated in the constructor).
        draws: Coupled micro-batches so far: the noise stream's position (checkpointed).
        last_result: The [CouplingResult][lightning_immiscible.coupling.CouplingResult] of the
            latest batch (`None` before the first).
        auto_group_size: The group size `scope="auto"` chose (`None` until it decided).
        auto_solver: `solver="auto"`'s decisions per (group size, D) and its race in progress
            ([AutoSolver][lightning_immiscible.solver_race.AutoSolver]).

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
        log_every_n_steps: int = 1,
        prog_bar: bool = False,
        max_step_fraction: float = 0.25,
        collective_timeout_s: float | None = None,
        check_finite: bool = True,
        within_condition: bool = True,
    ) -> None:
        self.spec = CouplingSpec(method, metric, precision, solver, k, check_finite, within_condition)
        if scope != "auto":
            partition_ranks(scope, 1, 1)  # validates the scope's spelling now, not at fit time
        self.scope = scope
        self.seed = seed
        self.log_every_n_steps = log_every_n_steps
        self.prog_bar = prog_bar
        self.max_step_fraction = max_step_fraction
        self.collective_timeout_s = collective_timeout_s
        self.draws = 0
        self.auto_group_size: int | None = None
        self.last_result: CouplingResult | None = None
        self._group = RankGroup(0, (0,), None)
        self._group_scope: str | int | None = None
        self._world = RankGroup(0, (0,), None)
        self._world_size = 1
        self._batch_start = 0.0
        self._overhead: list[tuple[float, float]] = []
        self._warned: set[str] = set()
        self.auto_solver = AutoSolver()
        self._restored_seed = False
        self.workers = WorkerBatches()

    @property
    def config(self) -> CouplingSpec:
        """The former name of `spec` (the same [CouplingSpec][lightning_immiscible.coupling.CouplingSpec])."""
        return self.spec

    @property
    def state_key(self) -> str:
        """One coupling stream per method and scope in a checkpoint."""
        return self._generate_state_key(method=self.spec.method, scope=self.scope)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        as_immiscible_module(pl_module)
        if trainer.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"ImmiscibleCoupling: the Trainer runs {trainer.world_size} processes but "
                "torch.distributed has no initialised process group, so the ranks could not tell "
                "their noise apart (every rank would draw the same pool). Use a strategy that "
                "initialises one (e.g. strategy='ddp', 'ddp_spawn', 'fsdp'), or run one process."
            )
        self._world_size = trainer.world_size
        self._world = build_world_group(self.collective_timeout_s)  # the seed and scope="auto" broadcasts

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint's state was restored (setup runs before it): the log shows the seed
        # the run uses, never a freshly drawn one that the checkpoint then replaces.
        restored = self._restored_seed
        if self.seed is None:
            # Rank 0's torch seed: `seed_everything(s)` (LightningCLI's `seed_everything: s`) makes
            # the coupling reproducible too, and every rank uses rank 0's value either way.
            self.seed = broadcast_from_first(
                self._world, torch.initial_seed() % 2**62, "seed", pl_module.device
            )
        rank_zero_info(
            f"ImmiscibleCoupling: method={self.spec.method}, scope={self.scope!r}, "
            f"world size {trainer.world_size}, seed={self.seed}"
            + (f" (restored from the checkpoint at draw {self.draws})" if restored else "")
        )

    @property
    def group(self) -> RankGroup:
        """This rank's coupling group (a group of one until the first coupled batch)."""
        return self._group

    def effective_scope(self) -> str | int:
        """The scope used now: ``knn`` is always local; ``auto`` is local until its probe decides."""
        if self.spec.method == "knn":
            return "local"
        if self.scope == "auto":
            return self.auto_group_size or "local"
        return self.scope

    def _ensure_group(self, trainer: pl.Trainer) -> None:
        """(Re)builds the rank group when the effective scope changed (same batch on all ranks)."""
        scope = self.effective_scope()
        if scope != self._group_scope:
            per_node = max(trainer.num_devices, 1)
            self._group = build_rank_group(scope, per_node, self.collective_timeout_s)
            self._group_scope = scope

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        module = as_immiscible_module(pl_module)
        self._ensure_group(trainer)
        self._batch_start = time.perf_counter()
        draw, self.draws = self.draws, self.draws + 1
        x0, error = _data(module, batch)
        condition, error = _condition(module, batch, error)
        worker = worker_coupling(module, batch)
        if worker is not None and x0 is not None:
            warn_worker_ignores_condition(condition, worker.condition, self._warned)
            result = self._from_worker(x0, worker, trainer, batch_idx, condition)
        else:
            result = self._couple(x0, error, draw, trainer.current_epoch, condition)
        assert x0 is not None  # couple_in_group raised otherwise
        module.receive_coupled_batch(CoupledBatch(batch=batch, x0=x0, result=result, draw=draw))
        self.last_result = result
        self._last_batch_shape, self._last_device = tuple(x0.shape), x0.device
        self._warn_small_batch(x0, result)
        if self.should_log(draw):
            self._log(pl_module, result, x0.shape[0])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Worker-side coupling: batch positions restart per epoch (reaches non-persistent workers,
        # which start after this hook from epoch 1 on; the callback checks every batch anyway).
        self.workers.start_epoch(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        as_immiscible_module(pl_module).release_coupled_batch()
        if self.last_result is not None and len(self._overhead) < WARMUP_BATCHES + 2:
            step_ms = (time.perf_counter() - self._batch_start) * 1e3
            self._overhead.append((self.last_result.assign_ms, step_ms))
            warn_overhead(self._overhead, self.max_step_fraction, self._warned)
        if self.scope == "auto" and self.auto_group_size is None and len(self._overhead) > WARMUP_BATCHES:
            self._decide_group_size(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # When the module's on_train_batch_start returns -1, Lightning skips the rest of the epoch
        # without on_train_batch_end: release here, before validation and sampling.
        as_immiscible_module(pl_module).release_coupled_batch()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, ImmiscibleMixin):
            pl_module.release_coupled_batch()

    def _decide_group_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``scope="auto"``: rank 0 measures candidate pools, every rank adopts its choice."""
        size = 1
        if trainer.is_global_zero:
            step_ms = statistics.median(max(s - a, 0.0) for a, s in self._overhead[1:])
            decision = choose_group_size(
                trainer.world_size,
                self._last_batch_shape[0],
                self._last_batch_shape[1:],
                step_ms,
                self.max_step_fraction,
                self.spec,
                device=self._last_device,
            )
            size = decision.size
            rank_zero_info(f"ImmiscibleCoupling: {decision.describe()}")
        self.auto_group_size = broadcast_from_first(
            self._world, size, "scope='auto' group size", pl_module.device
        )

    def should_log(self, draw: int) -> bool:
        """Whether to log the metrics of coupled batch number ``draw`` (override for other policies)."""
        return self.log_every_n_steps > 0 and draw % self.log_every_n_steps == 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "auto_group_size": self.auto_group_size,
            "world_size": self._world_size,
            "auto_solver": self.auto_solver.state_dict(),
            "worker_seeds": self.workers.seeds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self._restored_seed = True
        self.draws = int(state_dict["draws"])
        self.workers.seeds = list(state_dict.get("worker_seeds", []))
        saved_world = state_dict.get("world_size", self._world_size)
        if saved_world != self._world_size:
            rank_zero_info(
                f"ImmiscibleCoupling: resuming a world of {saved_world} rank(s) on {self._world_size}; "
                f"the noise stream continues at draw {self.draws}, with pools of the new group sizes."
            )
        else:
            self.auto_group_size = state_dict.get("auto_group_size")
            self.auto_solver.load_state_dict(state_dict.get("auto_solver", {}))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning loads state only under an unchanged state_key (method and scope): with another
        # setting, continue the saved noise stream ourselves and say so, rather than restarting it.
        found = saved_coupling_state(checkpoint.get("callbacks") or {}, self.state_key)
        if found is None:
            return
        key, old = found
        self.seed, self.draws, self._restored_seed = old["seed"], int(old["draws"]), True
        self.workers.seeds = list(old.get("worker_seeds", []))
        warn_changed_setting(key, self.spec.method, self.scope, self.seed, self.draws)

    def _from_worker(
        self,
        x0: Tensor,
        worker: WorkerCoupling,
        trainer: pl.Trainer,
        batch_idx: int,
        condition: Tensor | None,
    ) -> CouplingResult:
        """The noise a DataLoader worker coupled (see the `worker_batches` module)."""
        local = self.spec.method == "knn" or self.effective_scope() == "local" or self._world_size == 1
        note = (
            "ImmiscibleCoupling: batches carry noise coupled in DataLoader workers (CouplingCollate); "
            "using it as is: the collate's method applies and its coupling is per rank, whatever "
            f"this callback's scope ({self.scope!r})."
        )
        return self.workers.result(
            x0,
            worker,
            trainer,
            batch_idx,
            metric=self.spec.metric,
            note=note,
            warn=not local,
            fallback=lambda x: self._couple_alone(x, trainer.global_rank, condition),
        )

    def _couple_alone(self, x0: Tensor, rank: int, condition: Tensor | None) -> CouplingResult:
        """Couples on this rank, no collective: the callback's method, its stream at this draw (stream 3)."""
        draw = self.draws - 1  # this batch's draw (on_train_batch_start advanced the counter)
        k = (self.spec.k,) if self.spec.method == "knn" else ()
        noise = draw_pool((x0.shape[0], *k, *x0.shape[1:]), int(self.seed or 0), rank, draw, x0.device, 3)
        return self.spec.couple(x0, noise.to(x0.dtype), condition=condition)

    def _log(self, pl_module: pl.LightningModule, result: CouplingResult, batch_size: int) -> None:
        values = coupling_metrics(result, self._group.size)
        if result.method == "worker":
            values["worker_assign_ms"] = self.workers.assign_ms
        if result.prior_skew is not None:  # a condition was given: the skew of the class priors
            values["prior_skew"] = result.prior_skew
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

    def _couple(
        self, x0: Tensor | None, error: BaseException | None, draw: int, epoch: int, condition: Tensor | None
    ) -> CouplingResult:
        """Couples in the group; ``solver="auto"``'s race advances from the header rows (no collective)."""
        seed, race = int(self.seed or 0), self.auto_solver
        with full_precision(x0):
            result = couple_in_group(x0, self._group, seed, draw, self.spec, error, epoch, condition, race)
        # A race batch ran every candidate: assign_ms (logged, and the overhead check) counts the used one.
        extra = self.auto_solver.extra_ms()
        self.auto_solver.record()
        for note in self.auto_solver.pop_notes():
            rank_zero_info(note)
        return dataclasses.replace(result, solve_ms=max(result.solve_ms - extra, 0.0)) if extra else result

    def _warn_small_batch(self, x0: Tensor, result: CouplingResult) -> None:
        pool = x0.shape[0] * len(self._group.ranks)
        warn_pool_size(pool, self.spec.method, result.assign_ms, LARGE_POOL, self._warned)


def _data(module: ImmiscibleMixin, batch: Any) -> tuple[Tensor | None, BaseException | None]:
    """Gets `x0`; an error is returned, not raised, so the ranks of a group can fail together."""
    try:
        return module.immiscible_data(batch), None
    except Exception as exc:
        return None, exc


def _condition(
    module: ImmiscibleMixin, batch: Any, error: BaseException | None
) -> tuple[Tensor | None, BaseException | None]:
    """Gets the labels (`immiscible_condition`); an error is returned like `_data`'s."""
    try:
        return module.immiscible_condition(batch), error
    except Exception as exc:
        return None, error or exc
