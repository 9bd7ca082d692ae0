"""A progress bar that shows the coupling's distance reduction and cost, and a run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

#: Logged by ``lightning_immiscible.ImmiscibleCoupling`` -> short progress-bar label.
COUPLING_METRICS = {"immiscible/reduction_pct": "red%", "immiscible/assign_ms": "assign_ms"}


class ImmiscibleProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that adds ``red%`` (distance reduction) and ``assign_ms`` when coupled.

    Works whether or not the coupling callback puts them in the bar itself (``prog_bar``).
    """

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        for full, short in COUPLING_METRICS.items():
            value = trainer.callback_metrics.get(full)
            if value is not None:
                items.pop(full, None)
                items[short] = f"{float(value):.2f}" if short == "red%" else f"{float(value):.1f}"
        return items


class RunSummary(L.Callback):
    """At the end of ``fit``, prints where the sample grids, metrics and checkpoints are."""

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(summary_text(trainer))


def summary_text(trainer: L.Trainer) -> str:
    """The end-of-run message: final FID values and the paths of grid, metrics, checkpoint."""
    lines = ["", "Run finished."]
    fids = {k: float(v) for k, v in trainer.callback_metrics.items() if "/fid" in k}
    for name, value in sorted(fids.items()):
        lines.append(f"  {name} = {value:.2f}")
    for cb in trainer.callbacks:
        latest = getattr(cb, "latest", None)
        if isinstance(latest, Path):
            lines.append(f"  sample grid:   {latest}  (one PNG per evaluation beside it)")
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"  metrics (CSV): {Path(logger.log_dir) / 'metrics.csv'}")
        elif getattr(logger, "log_dir", None):
            lines.append(f"  logs:          {logger.log_dir}")
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if ckpt:
        lines.append(f"  checkpoint:    {ckpt}")
    return "\n".join(lines)
