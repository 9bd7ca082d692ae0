"""Renders the decision table ("Should you turn it on?") from ``docs/decisions.yml`` into its pages.

The table lives in one data file and is shown, rendered, on the home page (``docs/index.md``) and in
``README.md``, between the markers below; every other page that advises links the home page's table.
``tests/test_decisions.py`` checks that both pages hold exactly this rendering.

    python docs/scripts/decision_table.py           # rewrites the table in docs/index.md and README.md
    python docs/scripts/decision_table.py --check   # exit status 1 if a page differs from the rendering
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "decisions.yml"
#: Each page that shows the table, and the prefix its links to docs pages need.
PAGES = {"docs/index.md": "", "README.md": "docs/"}
#: The docs site wraps the table in a <div> that docs/stylesheets/extra.css lays out as one card per
#: row on a phone (a three-column table there leaves a column a few words wide).
CARDS = {"docs/index.md"}
CARD_CLASS = "decision-table"
BEGIN = "<!-- decision table: rendered from docs/decisions.yml by docs/scripts/decision_table.py -->"
END = "<!-- end of decision table -->"
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def load(path: Path = DATA) -> dict[str, Any]:
    """The decision data: intro, columns, rows (training, verdict, setting, measured), scope, retired."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def relink(text: str, prefix: str) -> str:
    """``text`` with every relative Markdown link target prefixed (``results.md`` -> ``docs/results.md``)."""

    def fix(m: re.Match[str]) -> str:
        target = m.group(1)
        if prefix and not re.match(r"[a-z]+:|#|/", target):
            target = prefix + target
        return f"]({target})"

    return _LINK.sub(fix, text)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _paragraph(text: str) -> str:
    """A paragraph wrapped at 100 characters, between words only (links and code spans stay whole)."""
    return textwrap.fill(_one_line(text), width=100, break_long_words=False, break_on_hyphens=False)


def render(data: dict[str, Any], prefix: str = "", cards: bool = False) -> str:
    """The block between the markers: the intro, the table, the scope recommendation.

    ``cards``: the table inside ``<div class="decision-table" markdown>`` (the docs site's phone layout).
    """
    head = data["columns"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in data["rows"]:
        verdict = f"**{row['verdict']}**" + (f": {_one_line(row['setting'])}" if row.get("setting") else "")
        table.append(f"| {_one_line(row['training'])} | {verdict} | {_one_line(row['measured'])} |")
    if cards:
        table = [f'<div class="{CARD_CLASS}" markdown>', "", *table, "", "</div>"]
    lines = [_paragraph(data["intro"]), "", *table, "", _paragraph(data["scope"])]
    return relink("\n".join(lines), prefix)


def render_for(page: str, data: dict[str, Any]) -> str:
    """The block as ``page`` (a key of `PAGES`) shows it."""
    return render(data, PAGES[page], cards=page in CARDS)


def splice(page: str, block: str) -> str:
    """``page`` with the text between the markers replaced by ``block``."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} markers")
    return page[: start + len(BEGIN)] + "\n" + block + "\n" + page[end:]


def rendered_block(page: str) -> str:
    """The text a page holds between the markers (without the newlines next to them)."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} markers")
    return page[start + len(BEGIN) : end].strip("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 where a page differs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data, stale = load(), {}
    for name in PAGES:  # every page is rendered before any is written
        text = (ROOT / name).read_text(encoding="utf-8")
        new = splice(text, render_for(name, data))
        if new != text:
            stale[name] = new
    if not args.check:
        for name, new in stale.items():
            (ROOT / name).write_text(new, encoding="utf-8")
    if stale:
        print(("differs from docs/decisions.yml: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
