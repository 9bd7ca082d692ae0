"""The docs: python examples run, every library error/warning is listed in troubleshooting.

The site build and its HTML are checked in ``tests/test_site_html.py``.
"""

import ast
import re
import textwrap
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


def _docstring_examples() -> list[tuple[str, str]]:
    """Every ```python block in the library's docstrings (module, class, function, method)."""
    found = []
    for path in sorted((ROOT / "lightning_immiscible").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            name = getattr(node, "name", "<module>")
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc, re.S)):
                found.append((f"{path.stem}.{name}#{i}", textwrap.dedent(code)))
    return found


DOCSTRING_EXAMPLES = _docstring_examples()


@pytest.mark.parametrize(("where", "code"), DOCSTRING_EXAMPLES, ids=[w for w, _ in DOCSTRING_EXAMPLES])
def test_docstring_examples_run(where, code):
    # The API reference renders these blocks; a renamed argument or import breaks one here first
    # (tried: "methd=" in the coupling module's example fails with a TypeError).
    exec(compile(code, where, "exec"), {"__name__": "docstring_example"})


def test_docstring_examples_are_found():
    # Guards the collector itself: without it a regex slip would silently run no example at all.
    assert any(w.startswith("coupling.couple#") for w, _ in DOCSTRING_EXAMPLES), DOCSTRING_EXAMPLES


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
            if not (name.endswith(("Error", "Exception")) or name in ("rank_zero_warn", "warn_once")):
                continue
            message = call.args[-1] if name == "warn_once" else call.args[0]  # warn_once(key, message)
            parts = message.values if isinstance(message, ast.JoinedStr) else [message]
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


def test_cost_numbers_live_on_the_performance_page_only():
    # "What does B = 1024 cost" was quoted as 22, 38, 40, 49, 134, 159 and 225 ms on different pages,
    # each measured differently. The first pages a user reads link to the one cost table instead.
    # Catches: a page that adds its own millisecond figure (tried: the old landing-page cost table).
    first_pages = ("index.md", "choosing-a-method.md", "user-guide.md")
    pages = [ROOT / "README.md", *(DOCS / name for name in first_pages)]
    quoted = {p.name: re.findall(r"\b\d+(?:\.\d+)? ?ms\b", p.read_text()) for p in pages}
    assert not any(quoted.values()), quoted
    assert "performance.md#what-a-coupling-costs" in (DOCS / "index.md").read_text()
