"""Tables of the docs' "When does it help?" page, rendered from the regimes sweep's committed report.

Each function takes the report's JSON (`report.json`: its paired cells and steps-to-quality rows)
and returns Markdown; the page shows them verbatim (a test checks it), so no number there is typed
by hand. Effects are % of the `none` arm's mean ± s.e. over the paired seeds; bold: the arm is
better (paired t p < 0.05), italics: worse, plain: no effect detected.

    python benchmarks/regimes_tables.py   # prints every table of the page
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling regimes_* modules

from regimes_quality import quality_markdown
from regimes_report import map_cell

IMAGES = ("digits64", "mnist14", "mnist28")
CHECKPOINTS = ("250", "500", "1000")
#: The arm these tables follow: minibatch OT over pools of 256 (its `l2` and pool siblings agree
#: within their standard errors at every cell of the map).
ARM = "lsa-sq-p256"
DATA_METRICS = ("sw2", "energy")


def index(report: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """Cells by (dataset, objective, arm, checkpoint, sampler steps, metric)."""
    keys = ("dataset", "objective", "arm", "step", "sampler_steps", "metric")
    return {tuple(c[k] for k in keys): c for c in report["cells"]}


def _value(cell: dict[str, Any], arm_side: bool) -> str:
    value = cell["baseline"] + (cell["mean"] if arm_side else 0.0)
    return f"{value:.3g}"


def rise_table(report: dict[str, Any], steps: tuple[str, ...] = ("1", "2")) -> str:
    """The baseline's and the coupled arm's classifier distance at each checkpoint, and the effect."""
    cells = index(report)
    head = ["data", "sampler steps"] + [f"`none` at {c}" for c in CHECKPOINTS]
    head += [f"OT at {c}" for c in CHECKPOINTS] + [f"effect at {c}" for c in CHECKPOINTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in IMAGES:
        for k in steps:
            row = [cells[(dataset, "fm", ARM, c, k, "fd")] for c in CHECKPOINTS]
            values = [_value(r, False) for r in row] + [_value(r, True) for r in row]
            lines.append(f"| {dataset} | {k} | " + " | ".join(values + [map_cell(r) for r in row]) + " |")
    return "\n".join(lines) + "\n"


def disagreement_table(report: dict[str, Any]) -> str:
    """Every (data, checkpoint, sampler steps) where the classifier distance and a data-space distance
    give opposite verdicts for the OT arm (one helps, the other harms)."""
    cells = index(report)
    head = ["data", "checkpoint", "sampler steps", "classifier distance", "sliced W2", "energy distance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in IMAGES:
        for c in CHECKPOINTS:
            for k in ("1", "2", "4", "8"):
                fd = cells[(dataset, "fm", ARM, c, k, "fd")]
                data = [cells[(dataset, "fm", ARM, c, k, m)] for m in DATA_METRICS]
                if {fd["verdict"], *(d["verdict"] for d in data)} >= {"helps", "harms"}:
                    shown = [map_cell(x) for x in (fd, *data)]
                    lines.append(f"| {dataset} | {c} | {k} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def quality_table(report: dict[str, Any]) -> str:
    """Steps to quality of flow matching for the pool-256 `lsa` arms at 1 and 2 sampler steps."""
    rows = [
        r for r in report["steps_to_quality"] if r["objective"] == "fm" and r["sampler_steps"] in ("1", "2")
    ]
    return quality_markdown(rows, ("lsa-l2-p256", "lsa-sq-p256"))


TABLES = {"rise": rise_table, "disagreement": disagreement_table, "quality": quality_table}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--out``: the sweep's folder, whose ``report.json`` the tables are rendered from."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/regimes"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Prints every table, each under its name."""
    report = json.loads((parse_args(argv).out / "report.json").read_text())
    for name, render in TABLES.items():
        sys.stdout.write(f"<!-- {name} -->\n{render(report)}\n")


if __name__ == "__main__":
    main()
