"""The lower-bound check's own pieces: the floors it installs and the tests it leaves out stay current.

``tools/lower_bounds.sh`` installs the declared floors and runs the library's tests there (CI runs
it after the main suite); ``tools/check_floors.py`` fails that run when a floor was not installed.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "tools" / "lower_bounds.sh").read_text()
_spec = importlib.util.spec_from_file_location("check_floors", ROOT / "tools" / "check_floors.py")
check_floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_floors)


def _bash_array(name: str) -> list[str]:
    body = re.search(rf"^{name}=\((.*?)\)$", SCRIPT, re.S | re.M)
    assert body, f"{name}=(...) not found in tools/lower_bounds.sh"
    return [quoted or bare for quoted, bare in re.findall(r'"([^"]+)"|([^\s"]+)', body.group(1))]


def _declared(name: str) -> Requirement:
    """The requirement on `name` that pyproject.toml declares (in any extra)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = {Requirement(r) for r in re.findall(r'"([A-Za-z][\w.\-\[\]]*\s*>=[^"]+)"', text)}
    return next(r for r in found if r.name == name)


@pytest.mark.parametrize(
    ("installed", "floor", "expected"),
    [("1.23.2", "1.23", True), ("1.23.0", "1.23", True), ("1.24.0", "1.23", False),
     ("2.3.0", "2.3", True), ("2.30.0", "2.3", False), ("0.9.1", "0.9", True), ("4.27.7", "4.27.7", True),
     ("4.27.8", "4.27.7", False)],
)  # fmt: skip
def test_a_floor_counts_as_installed_only_within_its_release_series(installed, floor, expected):
    # Catches: a string-prefix comparison (2.30.0 "starts with" 2.3) and a plain >= (1.24.0 would
    # pass for numpy>=1.23, and the run would not test the floor). Oracle: the cases written out.
    assert check_floors.in_series(Version(installed), Version(floor)) is expected


def test_the_test_tools_are_installed_at_the_floors_pyproject_declares():
    # Catches: a floor raised in pyproject.toml's test or examples extra (e.g. jsonargparse, which
    # LightningCLI checks at run time) while the lower-bound run still installs the old one.
    # Oracle: the requirement strings in pyproject.toml.
    tools = [Requirement(t) for t in _bash_array("TEST_TOOLS")]
    assert tools, "TEST_TOOLS is empty"
    for tool in tools:
        assert tool.specifier == _declared(tool.name).specifier, tool


def test_every_left_out_test_exists():
    # Catches: a renamed or moved test file or test left in the list (pytest ignores an --ignore or
    # --deselect that matches nothing, so the list would silently go stale). Oracle: the file tree.
    left_out = _bash_array("EXTRAS_ONLY")
    assert "tests/examples" in left_out
    for item in left_out:
        path, _, name = item.partition("::")
        assert (ROOT / path).exists(), item
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), item
