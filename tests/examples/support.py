"""Shared by the example tests: the metrics a CSVLogger wrote, as floats."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def logged_values(metrics_csv: Path, key: str) -> list[float]:
    """Every value of ``key`` in a ``CSVLogger``'s ``metrics.csv``, as floats (empty cells skipped).

    Reading them as floats matters: the CSV holds strings, and the string ``"0.0"`` is truthy.
    """
    with Path(metrics_csv).open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key, "") != ""]


def reductions_per_step(
    cli_main: Callable[[list[str]], Any], args: Sequence[str], save_dir: Path
) -> list[float]:
    """Runs an example CLI with a CSV logger at batch 16, logging every step; its ``reduction_pct`` values.

    ``args`` are the example's test arguments; their ``--trainer.logger=false`` is dropped so the
    config's CSV logger writes under ``save_dir``.
    """
    cli = cli_main(
        [
            *[a for a in args if a != "--trainer.logger=false"],
            "--data.batch_size=16",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={save_dir}",
        ]
    )
    return logged_values(Path(cli.trainer.logger.log_dir) / "metrics.csv", "immiscible/reduction_pct")
