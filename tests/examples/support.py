"""Shared by the example tests: the metrics a CSVLogger wrote, as floats."""

from __future__ import annotations

import csv
from pathlib import Path


def logged_values(metrics_csv: Path, key: str) -> list[float]:
    """Every value of ``key`` in a ``CSVLogger``'s ``metrics.csv``, as floats (empty cells skipped).

    Reading them as floats matters: the CSV holds strings, and the string ``"0.0"`` is truthy.
    """
    with Path(metrics_csv).open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key, "") != ""]
