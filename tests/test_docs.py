"""The docs: python examples run, every library error/warning is listed in troubleshooting.

The site build and its HTML are checked in ``tests/test_site_html.py``.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCKS = [
    (p.name, i, code)
    for p in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), re.S))
]


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_docs_python_blocks_run(page, index, code):
    exec(compile(code, f"docs/{page}#{index}", "exec"), {"__name__": "docs_example"})


def _message_fragments() -> list[tuple[str, str]]:
    """The longest literal piece of every message the library raises or warns."""
    found = []
    for path in sorted((ROOT / "lightning_immiscible").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            call = node.exc if isinstance(node, ast.Raise) else node
            if not isinstance(call, ast.Call) or not call.args:
                continue
            name = getattr(call.func, "id", getattr(call.func, "attr", ""))
            if not (name.endswith(("Error", "Exception")) or name == "rank_zero_warn"):
                continue
            parts = call.args[0].values if isinstance(call.args[0], ast.JoinedStr) else [call.args[0]]
            pieces = [p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)]
            if pieces:
                found.append(
                    (f"{path.name}:{call.lineno}", max(pieces, key=len).replace("`", "").strip()[:40])
                )
    return sorted(set(found))


def test_troubleshooting_lists_every_library_message():
    page = (DOCS / "troubleshooting.md").read_text().replace("`", "")
    missing = [(where, frag) for where, frag in _message_fragments() if frag not in page]
    assert not missing, f"add these messages to docs/troubleshooting.md: {missing}"
