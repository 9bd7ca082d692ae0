"""``ImmiscibleCoupling``: the Lightning callback that couples each training batch with its noise."""

from __future__ import annotations

import math
import secrets
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_immiscible.coupling import METHODS, METRICS, PRECISIONS, CouplingInputError, CouplingResult
from lightning_immiscible.distributed import (
    GroupCouplingConfig,
    RankGroup,
    build_rank_group,
    couple_in_group,
    partition_ranks,
)
from lightning_immiscible.mixin import ImmiscibleMixin
from lightning_immiscible.sizing import choose_group_size
from lightning_immiscible.solvers import choose_exact_solver, resolve_solver

#: Pools at least this large get an up-front warning: LSA is about cubic in the pool size.
LARGE_POOL = 4096
_WARMUP_BATCHES = 3  # batches measured before judging the assignment's share of the step time


class ImmiscibleCoupling(Callback):
    r"""Pairs each training batch with its noise by Immiscible Diffusion's assignment.

    Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment",
    NeurIPS 2024. In ``on_train_batch_start`` the callback takes ``x0 = pl_module.immiscible_data(batch)``,
    draws Gaussian noise, re-pairs it with ``x0`` (across the ranks of its coupling group) and hands
    it to the module, whose ``noise_like(x0)`` then returns it. It logs ``immiscible/cost_before``,
    ``immiscible/cost_after``, ``immiscible/reduction_pct`` and ``immiscible/assign_ms``.

    The noise stream is a pure function of ``(seed, group, draw)``, where ``draw`` counts coupled
    micro-batches; both are checkpointed, so a resumed run draws the same noise as an uninterrupted
    one. Under DDP every rank of a group draws the same pool locally: only ``B x B`` cost rows and a
    small header cross the network, never noise or data.

    Args:
        method: ``"lsa"`` (the paper's exact assignment), ``"knn"`` (nearest of ``k`` candidates
            per item; no communication; tilts the noise distribution), ``"flip"`` (the paper's
            non-OT ablation) or ``"none"`` (baseline: same code path and logs, no re-pairing).
        metric: ``"l2"`` (the paper's), ``"sqeuclidean"`` or ``"l1"``.
        scope: Which ranks pool their batches for one assignment: ``"global"`` (all), ``"local"``
            (each rank alone, no communication), ``"node"`` (the ranks of one node), an int
            (consecutive groups of that many ranks) or ``"auto"`` (couple locally for the first
            batches, measure the step time, then use the largest group whose measured assignment
            time is within ``max_step_fraction`` of the step; the decision is logged and
            checkpointed).
        precision: Cost-matrix matmul precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU),
            ``"fp32"``, ``"bf16"``, ``"fp16"``.
        solver: Assignment solver, ``"auto"`` = the installed exact one measured fastest for the
            item dimension (:func:`lightning_immiscible.solvers.choose_exact_solver`; the choice
            is logged once per pool shape), or a name from
            :func:`lightning_immiscible.available_solvers`.
        k: Candidates per item for ``method="knn"``.
        seed: Seed of the noise stream; ``None`` draws one on rank 0 and shares it with all ranks.
        log_every_n_steps: Log the coupling metrics every this many coupled batches (0: never).
        prog_bar: Also show ``reduction_pct`` and ``assign_ms`` in the progress bar.
        max_step_fraction: Share of the training step the assignment may take: above it the
            callback warns once (measured over the first batches); ``scope="auto"`` sizes groups
            to stay within it.
        collective_timeout_s: Timeout of the coupling group's collectives (``None``: the process
            group's default). Only applies to sub-groups (``scope`` other than ``"global"``).
        check_finite: Check ``x0`` for NaN/Inf before coupling (one device sync per batch).

    Example::

        import lightning as L
        from lightning_immiscible import ImmiscibleCoupling, ImmiscibleMixin

        class Diffusion(ImmiscibleMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                x0 = self.immiscible_data(batch)
                noise = self.noise_like(x0)          # was: torch.randn_like(x0)
                ...

        trainer = L.Trainer(callbacks=[ImmiscibleCoupling(method="lsa", scope="global")])
    """

    def __init__(
        self,
        method: str = "lsa",
        metric: str = "l2",
        scope: str | int = "global",
        precision: str = "auto",
        solver: str = "auto",
        k: int = 4,
        seed: int | None = None,
        log_every_n_steps: int = 1,
        prog_bar: bool = False,
        max_step_fraction: float = 0.25,
        collective_timeout_s: float | None = None,
        check_finite: bool = True,
    ) -> None:
        _check_choice("method", method, METHODS)
        _check_choice("metric", metric, METRICS)
        _check_choice("precision", precision, PRECISIONS)
        if scope != "auto":
            partition_ranks(scope, 1, 1)  # validates the scope's spelling now, not at fit time
        resolve_solver(solver)
        if k < 1:
            raise ValueError(f"k must be >= 1 (candidates per item for knn), got {k}.")
        self.config = GroupCouplingConfig(method, metric, precision, solver, k, check_finite)
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
        self._world_size = 1
        self._batch_start = 0.0
        self._overhead: list[tuple[float, float]] = []
        self._warned: set[str] = set()
        self._solver_noted: set[tuple[int, int]] = set()
        self._worker_ms = 0.0

    @property
    def state_key(self) -> str:
        """One coupling stream per method and scope in a checkpoint."""
        return self._generate_state_key(method=self.config.method, scope=self.scope)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, ImmiscibleMixin):
            raise TypeError(
                f"ImmiscibleCoupling needs a LightningModule that mixes in ImmiscibleMixin "
                f"(class {type(pl_module).__name__}(ImmiscibleMixin, L.LightningModule)) and calls "
                "self.noise_like(x0) instead of torch.randn_like(x0) in training_step."
            )
        self._world_size = trainer.world_size
        if self.seed is None:
            self.seed = int(trainer.strategy.broadcast(secrets.randbits(62), src=0))
        rank_zero_info(
            f"ImmiscibleCoupling: method={self.config.method}, scope={self.scope!r}, "
            f"world size {trainer.world_size}, seed={self.seed}"
        )

    def effective_scope(self) -> str | int:
        """The scope used now: ``knn`` is always local; ``auto`` is local until its probe decides."""
        if self.config.method == "knn":
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
        self._ensure_group(trainer)
        self._batch_start = time.perf_counter()
        draw, self.draws = self.draws, self.draws + 1
        batch = pl_module._immiscible_unwrap(batch)  # type: ignore[attr-defined]
        x0, error = self._data(pl_module, batch)
        worker = pl_module.__dict__.pop("_immiscible_worker", None)
        if worker is not None and x0 is not None:
            result = self._from_worker(x0, *worker)
        else:
            with _no_autocast(x0):
                result = couple_in_group(x0, self._group, int(self.seed or 0), draw, self.config, error)
        assert x0 is not None
        pl_module._immiscible_set(batch, x0, result.noise)  # type: ignore[attr-defined]
        self.last_result = result
        self._last_batch_shape, self._last_device = tuple(x0.shape), x0.device
        self._warn_small_batch(x0, result)
        self._note_auto_solver(x0, result)
        if self.should_log(draw):
            self._log(pl_module, result, x0.shape[0])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module._immiscible_clear()  # type: ignore[attr-defined]
        if self.last_result is not None and len(self._overhead) < _WARMUP_BATCHES + 2:
            step_ms = (time.perf_counter() - self._batch_start) * 1e3
            self._overhead.append((self.last_result.assign_ms, step_ms))
            self._check_overhead()
        if self.scope == "auto" and self.auto_group_size is None and len(self._overhead) > _WARMUP_BATCHES:
            self._decide_group_size(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, ImmiscibleMixin):
            pl_module._immiscible_clear()

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
                metric=self.config.metric,
                precision=self.config.precision,
                solver=self.config.solver,
                device=self._last_device,
            )
            size = decision.size
            rank_zero_info(f"ImmiscibleCoupling: {decision.describe()}")
        self.auto_group_size = int(trainer.strategy.broadcast(size, src=0))

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
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.draws = int(state_dict["draws"])
        saved_world = state_dict.get("world_size", self._world_size)
        if saved_world != self._world_size:
            rank_zero_info(
                f"ImmiscibleCoupling: resuming a world of {saved_world} rank(s) on {self._world_size}; "
                f"the noise stream continues at draw {self.draws}, with pools of the new group sizes."
            )
        else:
            self.auto_group_size = state_dict.get("auto_group_size")

    def _data(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor | None, BaseException | None]:
        """Gets ``x0``; an error is returned, not raised, so the group can fail together."""
        try:
            return pl_module.immiscible_data(batch), None  # type: ignore[attr-defined]
        except Exception as exc:
            return None, exc

    def _from_worker(self, x0: Tensor, noise: Tensor, stats: Tensor, index: Tensor) -> CouplingResult:
        """Noise a :class:`~lightning_immiscible.workers.CouplingCollate` coupled in a DataLoader worker.

        The training step pays nothing for it: ``assign_ms`` is 0 on the critical path and the
        worker's time is logged as ``immiscible/worker_assign_ms``.
        """
        if noise.shape != x0.shape:
            raise CouplingInputError(
                f"The batch carries worker-coupled noise of shape {tuple(noise.shape)} but "
                f"immiscible_data(batch) has shape {tuple(x0.shape)}: CouplingCollate couples the "
                "collated data tensor, so use it only when immiscible_data returns that tensor.",
                "shape",
            )
        if "worker" not in self._warned:
            self._warned.add("worker")
            local = self.config.method == "knn" or self.effective_scope() == "local" or self._world_size == 1
            (rank_zero_info if local else rank_zero_warn)(
                "ImmiscibleCoupling: batches carry noise coupled in DataLoader workers (CouplingCollate); "
                "using it as is: the collate's method applies and its coupling is per rank, whatever "
                f"this callback's scope ({self.scope!r})."
            )
        before, after, worker_ms = (float(v) for v in stats)
        self._worker_ms = worker_ms
        index = torch.arange(x0.shape[0], device=x0.device)
        return CouplingResult(
            noise.to(x0.dtype), index, before, after, 0.0, 0.0, "worker", self.config.metric
        )

    def _log(self, pl_module: pl.LightningModule, result: CouplingResult, batch_size: int) -> None:
        values = {
            "group_size": float(self._group.size),
            "cost_before": result.cost_before,
            "cost_after": result.cost_after,
            "reduction_pct": result.reduction_pct,
            "assign_ms": result.assign_ms,
        }
        if result.method == "worker":
            values["worker_assign_ms"] = self._worker_ms
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

    def _warn_small_batch(self, x0: Tensor, result: CouplingResult) -> None:
        pool = x0.shape[0] * len(self._group.ranks)
        if pool == 1 and "small" not in self._warned:
            self._warned.add("small")
            rank_zero_warn(
                "ImmiscibleCoupling got a batch of 1 item: coupling needs a batch to re-pair, so the "
                "noise is left as drawn. Use a batch size > 1 (or scope='global' to pool ranks)."
            )
        if pool >= LARGE_POOL and self.config.method in ("lsa", "flip") and "large" not in self._warned:
            self._warned.add("large")
            rank_zero_warn(
                f"ImmiscibleCoupling: the assignment pool has about {pool} items; exact assignment is "
                f"about cubic in the pool (the first took {result.assign_ms:.0f} ms). Consider "
                "scope='node' or an int scope (smaller groups), or method='knn'."
            )

    def _note_auto_solver(self, x0: Tensor, result: CouplingResult) -> None:
        """Says once per pool shape which exact solver ``solver="auto"`` uses for it.

        The choice is a fixed rule of the pool size and item dimension (the same on every rank),
        so the callback can name it without asking the solver.
        """
        if self.config.solver != "auto" or result.method not in ("lsa", "flip"):
            return
        shape = (x0.shape[0] * len(self._group.ranks), math.prod(x0.shape[1:]))
        if shape not in self._solver_noted:
            self._solver_noted.add(shape)
            name = choose_exact_solver(*shape)
            rank_zero_info(
                f"ImmiscibleCoupling: solver='auto' uses {name!r} for pools of {shape[0]} items of "
                f"{shape[1]} values (the rule: lightning_immiscible.solvers.choose_exact_solver)."
            )

    def _check_overhead(self) -> None:
        if len(self._overhead) <= _WARMUP_BATCHES or "overhead" in self._warned:
            return
        measured = self._overhead[1:]  # the first batch includes warm-up work
        assign = statistics.median(a for a, _ in measured)
        step = statistics.median(s for _, s in measured)
        if step > 0 and assign > self.max_step_fraction * step:
            self._warned.add("overhead")
            rank_zero_warn(
                f"ImmiscibleCoupling: the assignment takes {assign:.1f} ms of a {step:.1f} ms training "
                f"step ({100 * assign / step:.0f} % > max_step_fraction={self.max_step_fraction}). "
                "Use smaller coupling groups (scope='node' or an int), a faster solver, or method='knn'."
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ImmiscibleCoupling: unknown {name} {value!r}; choose one of {choices}.")


def _no_autocast(x0: Tensor | None) -> torch.autocast:
    """Coupling runs in full precision even if a precision plugin's autocast is active."""
    device_type = x0.device.type if x0 is not None else "cpu"
    return torch.autocast(device_type=device_type if device_type in ("cuda", "cpu") else "cpu", enabled=False)
