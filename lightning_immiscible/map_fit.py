"""Fitting a dataset-level map inside a Lightning run: every rank together, logged, resumable.

[FitSemidiscreteMap][lightning_immiscible.map_fit.FitSemidiscreteMap] fits a
[SemidiscreteMap][lightning_immiscible.semidiscrete.SemidiscreteMap] in `on_fit_start`: after
the process group is up and a checkpoint's state is restored, before Lightning builds and starts
the train dataloader (whose workers then get the fitted map). Under DDP every rank draws its own
fitting noise and the hit counts are summed over the ranks each step (an all-reduce),
so the ranks make identical updates and hold identical potentials, `world_size` times faster than
one rank alone. A rank that fails in a step or a convergence check tells the others in that sum,
so every rank stops at the same step; `collective_timeout_s` bounds the wait for a stalled rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_immiscible.groups import RankGroup, build_world_group, collective, destroy_groups, place
from lightning_immiscible.semidiscrete import SemidiscreteMap


class FitSemidiscreteMap(pl.Callback):
    """Fits a dataset-level map at the start of `fit`, on all ranks together.

    Args:
        sd_map: The map to fit (the one the train dataloader's
            [DatasetCouplingLoader][lightning_immiscible.dataset_coupling.DatasetCouplingLoader]
            holds); `None`: the `sd_map` attribute of the trainer's datamodule, else of the
            LightningModule, when the fit starts (for configs, where the callback cannot name it).
        steps: Fitting steps in all (a map restored with fewer continues; with as many or more, or
            already converged, nothing is fitted).
        batch_size: Noise draws per fitting step on each rank.
        lr: Adam's learning rate (see [fit][lightning_immiscible.semidiscrete.SemidiscreteMap.fit]).
        tol: Stop once `hit_chi2` is at most this (`None`: run all `steps`).
        check_every: Steps between convergence checks (each logged as `immiscible/map_chi2`).
        path: A file to save the map's state to after every check (rank 0) and to resume a fit
            from; `None`: the state lives only in Lightning checkpoints.
        collective_timeout_s: Timeout, in seconds (> 0), of the fit's collectives under DDP (the
            broadcast of `path`'s state and each step's all-reduce), which then run in a dedicated
            process group; a rank that does not reach one fails with a message saying so. `None`:
            the process group's timeout (as for
            [ImmiscibleCoupling][lightning_immiscible.callback.ImmiscibleCoupling]).

    The fitted state is also saved in Lightning checkpoints (this callback's `state_dict`), so a
    resumed run does not fit again.
    """

    def __init__(
        self,
        sd_map: SemidiscreteMap | None = None,
        steps: int = 20_000,
        *,
        batch_size: int = 1024,
        lr: float = 0.02,
        tol: float | None = 0.05,
        check_every: int = 500,
        path: str | Path | None = None,
        collective_timeout_s: float | None = None,
    ) -> None:
        if sd_map is not None and not isinstance(sd_map, SemidiscreteMap):
            raise TypeError(f"FitSemidiscreteMap needs a SemidiscreteMap, got {type(sd_map).__name__}.")
        if collective_timeout_s is not None and not collective_timeout_s > 0:
            raise ValueError(
                f"FitSemidiscreteMap(collective_timeout_s={collective_timeout_s!r}): pass a number of "
                "seconds > 0, or None for the process group's timeout."
            )
        self.collective_timeout_s = None if collective_timeout_s is None else float(collective_timeout_s)
        self._given, self._map = sd_map, sd_map
        self.steps, self.batch_size, self.lr = int(steps), int(batch_size), float(lr)
        self.tol, self.check_every = tol, int(check_every)
        self.path = None if path is None else Path(path)
        self.converged = False
        self.chi2: float | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def map(self) -> SemidiscreteMap:
        """The map this callback fits (found on the datamodule or module when the fit starts)."""
        if self._map is None:
            raise RuntimeError("FitSemidiscreteMap: no map yet; it is looked up when the fit starts.")
        return self._map

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Starts each fit fresh (before a checkpoint's state is restored into it)."""
        self._map, self._pending, self.converged, self.chi2 = self._given, None, False, None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lets go of a map found on the datamodule or module (the next fit looks again)."""
        self._map, self._pending = self._given, None

    def _find_map(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._map is not None:
            return
        for owner in (trainer.datamodule, pl_module):
            found = getattr(owner, "sd_map", None)
            if isinstance(found, SemidiscreteMap):
                self._map = found
                return
        raise TypeError(
            "FitSemidiscreteMap(sd_map=None) looks for a SemidiscreteMap in the datamodule's or the "
            "LightningModule's sd_map attribute and found none: pass the map, or set sd_map in setup()."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resumes from `path` if it holds a later fit, then fits what is left."""
        self._find_map(trainer, pl_module)
        if self._pending is not None:  # a checkpoint's state, restored before the map was found
            self.map.load_state_dict(self._pending)
            self._pending = None
        if self.path is None and (self.converged or self.map.steps >= self.steps):
            return  # nothing to fit: no collective, no group
        group = build_world_group(self.collective_timeout_s, trainer.strategy.root_device)
        try:
            self._resume(trainer, group)
            while not self.converged and self.map.steps < self.steps:
                chunk = min(self.check_every, self.steps - self.map.steps)
                report = self.map.fit(
                    chunk, batch_size=self.batch_size, lr=self.lr, tol=self.tol, check_every=chunk,
                    rank=trainer.global_rank, reduce=self._reducer(trainer, group),
                )  # fmt: skip
                self.chi2, self.converged = report.chi2[-1][1], report.converged
                self._report(trainer)
            self._leave_together(group)
        finally:
            destroy_groups(group)

    @staticmethod
    def _leave_together(group: RankGroup) -> None:
        """A barrier in the fit's own group after a fit that ended well on every rank.

        Destroying a dedicated gloo group that a peer has already destroyed and left hangs under
        torch 2.3 (seen in the lower-bound check); after this barrier every rank destroys it at
        about the same time. Not on a failed fit: its ranks stop at the same point already.
        """
        if group.process_group is None:
            return
        with collective(group, "FitSemidiscreteMap's closing barrier"):
            dist.barrier(group=group.process_group)

    def _resume(self, trainer: pl.Trainer, group: RankGroup) -> None:
        """Continues from the fit saved at `path` when it is further along than the map."""
        state = self._saved_fit(trainer, group)
        if state is not None and int(state["steps"]) > self.map.steps:
            self.map.load_state_dict(state)
            rank_zero_info(
                f"FitSemidiscreteMap: resumed the map's fit at step {self.map.steps} from {self.path}."
            )

    def _saved_fit(self, trainer: pl.Trainer, group: RankGroup) -> dict[str, Any] | None:
        """The fit saved at `path`, read on rank 0 and broadcast, so every rank resumes alike.

        (Only rank 0 writes the file; another node may not see it.)
        """
        if self.path is None:
            return None
        state = None
        if trainer.is_global_zero and self.path.exists():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        if group.process_group is None:
            return state if trainer.world_size == 1 else trainer.strategy.broadcast(state, src=0)
        box = [state]
        with collective(group, "FitSemidiscreteMap's broadcast of the saved fit"):
            dist.broadcast_object_list(
                box, src=group.ranks[0], group=group.process_group, device=group.device
            )
        return box[0]

    def _reducer(self, trainer: pl.Trainer, group: RankGroup) -> Callable[[Tensor], Tensor] | None:
        """The sum over ranks the fit's steps and checks go through (`None`: one rank)."""
        if trainer.world_size == 1:
            return None
        if group.process_group is None:  # a strategy without torch.distributed: its own reduce
            device = trainer.strategy.root_device
            return lambda v: trainer.strategy.reduce(v.to(device), reduce_op="sum").to(v.device)

        def reduce(values: Tensor) -> Tensor:
            data = place(values, group)
            with collective(group, "FitSemidiscreteMap's all-reduce of the hit counts"):
                dist.all_reduce(data, group=group.process_group)
            return data.to(values.device)

        return reduce

    def _report(self, trainer: pl.Trainer) -> None:
        rank_zero_info(
            f"FitSemidiscreteMap: step {self.map.steps}, hit chi2 {self.chi2:.4f} (0: every item hit "
            f"equally often; the map uses about {100 / (1 + max(self.chi2 or 0.0, 0.0)):.0f} % of the items)."
        )
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"immiscible/map_chi2": float(self.chi2 or 0.0)}, step=self.map.steps)
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save(self.map.state_dict(), tmp)
            tmp.replace(self.path)

    def state_dict(self) -> dict[str, Any]:
        """The map's fitted state, whether it converged and its last `hit_chi2`."""
        state = None if self._map is None else self._map.state_dict()
        return {"map": state, "converged": self.converged, "chi2": self.chi2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the fitted map (a resumed run does not fit it again)."""
        if state_dict["map"] is None:
            return
        if self._map is None:
            self._pending = state_dict["map"]
        else:
            self._map.load_state_dict(state_dict["map"])
        self.converged, self.chi2 = bool(state_dict["converged"]), state_dict["chi2"]
