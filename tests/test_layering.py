"""Layering, read from the source: the pure layer imports no Lightning, no cycles, no private names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_immiscible

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_immiscible"
PROJECT = ("lightning_immiscible", "example_projects", "benchmarks", "experiments", "tests")
SCANNED = ("lightning_immiscible", "example_projects", "benchmarks", "experiments", "tests", "docs")
PURE = ("batches", "costs", "coupling", "distributed", "sizing", "solver_race", "solvers", "solvers_approx")
PURE += ("workers", "pools", "groups", "protocol", "streams", "process_race", "embedding", "conditional")
PURE += ("semidiscrete", "dataset_coupling")


def _files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py"))


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_pure_layer_and_couple_import_without_lightning():
    # Catches: an eager import of the callback or mixin in the package __init__ (as before), or a
    # pure module reaching for Lightning (e.g. workers importing the mixin's data finder).
    imports = "; ".join(f"import lightning_immiscible.{m}" for m in PURE)
    code = (
        f"import sys; {imports}; from lightning_immiscible import couple, CouplingSpec, CouplingCollate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_of_the_package_resolves():
    for name in lightning_immiscible.__all__:
        assert getattr(lightning_immiscible, name).__module__.startswith("lightning_immiscible.")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_immiscible.nope  # noqa: B018


def _library_imports(path: Path) -> set[str]:
    """The `lightning_immiscible` submodules a library file imports (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            if name == "lightning_immiscible":
                found.add("__init__")
            elif name.startswith("lightning_immiscible."):
                found.add(name.split(".")[1])
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, []))), None)


def test_library_modules_import_each_other_without_cycles():
    # Catches: mixin -> workers -> mixin (as before), and a module importing the package facade.
    graph = {p.stem: _library_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert not [m for m, deps in graph.items() if "__init__" in deps], "import submodules, not the package"
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker works


def _bound_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound by imports: `(from project modules, from other modules)`."""
    ours, foreign = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if _is_project(a.name) else foreign).add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            target = ours if (node.module and _is_project(node.module)) or node.level else foreign
            target |= {a.asname or a.name for a in node.names}
    return ours, foreign


DOTTED_PRIVATE = re.compile(rf"\b(?:{'|'.join(PROJECT)})(?:\.\w+)*\._[A-Za-z]\w*")


def _private_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_private(node.value)


def _reads_private_by_name(node: ast.AST) -> bool:
    """`getattr(obj, "_x")`, `setattr(...)`, `hasattr(...)` or `obj.__dict__["_x"]`."""
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "setattr", "hasattr"):
        return len(node.args) > 1 and _private_key(node.args[1])
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("__dict__"):
        return _private_key(node.slice)
    return False


def private_uses(source: str) -> list[str]:
    """Private names reached across modules: imported, read from a module or another object."""
    tree = ast.parse(source)
    ours, foreign = _bound_names(tree)
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _is_project(node.module):
            bad += [f"from {node.module} import {a.name}" for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Call) and ast.unparse(root.func) == "super":
                continue  # a class reaching what it inherits
            owner = root.id if isinstance(root, ast.Name) else None
            # self/cls reach their own class; foreign modules (torch, ...) are not this project's.
            if owner not in ("self", "cls") and (owner in ours or owner not in foreign):
                bad.append(f"{ast.unparse(node)} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            bad += DOTTED_PRIVATE.findall(node.value)
        elif _reads_private_by_name(node):
            bad.append(f"{ast.unparse(node)} (line {node.lineno})")
    return bad


def test_the_private_name_scanner_catches_each_kind():
    # The scanner is the oracle of the next test: each broken variant must be reported.
    assert private_uses("from lightning_immiscible.distributed import _knn_local")
    assert private_uses("import lightning_immiscible.distributed as d\nd._knn_local()")
    assert private_uses("def f(cb):\n    return cb._group")
    assert private_uses("mp.setattr('example_projects.common.fid._helper', None)")
    assert private_uses("model.__dict__['_immiscible_noise']")
    assert private_uses("getattr(model, '_hidden', None)")
    assert not private_uses("import torch\ntorch._foreach_add_")  # not ours
    assert private_uses("from lightning_immiscible.workers import CouplingCollate\nCouplingCollate._KEYS")
    assert not private_uses("class A:\n    def f(self):\n        return self._x + super()._y")
    assert not private_uses("from lightning_immiscible.protocol import HEADER_SIZE\nx.__dict__")


@pytest.mark.parametrize(
    "path",
    [p for p in _files() if p != Path(__file__).resolve()],  # not the scanner's own fixtures above
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_private_name_is_used_across_modules(path):
    assert private_uses(path.read_text()) == []


def test_no_reference_to_documents_outside_the_repository():
    # Catches: "DESIGN §4", a `gpu.yaml` that does not exist, files of the development machine.
    pattern = re.compile(r"DESIGN(?:\.md| §)|\bgpu\.yaml\b|/work/|shared/(?:DESIGN|STYLE|ENVIRONMENT)")
    texts = [
        *_files(),
        *ROOT.glob("*.md"),
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "example_projects").rglob("*.md"),
        *(ROOT / "example_projects").rglob("*.yaml"),
    ]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts for m in pattern.finditer(p.read_text())]
    hits = [h for h in hits if not h.startswith("tests/test_layering.py")]  # this test's own pattern
    assert hits == []
