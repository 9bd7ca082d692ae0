"""Every file the example projects name (configs, modules, docs, images) exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_projects"
# A file name with one of these suffixes, alone or after a relative path.
REFERENCE = re.compile(r"(?<![\w/.-])((?:\.\.\./|[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:yaml|py|md|png))\b")
# Written by a run, not shipped: sample grids, the CLI's saved config, the user's own config, and the
# flow-matching `compare` command's picture and table.
OUTPUTS = {"latest.png", "config.yaml", "my.yaml", "compare.png", "compare.md"}


def _exists(ref: str, source: Path) -> bool:
    name = Path(ref).name
    if ref.startswith(".../"):  # the docs' shorthand for the example's own configs folder
        example = source.relative_to(EXAMPLES).parts[0]
        return (EXAMPLES / example / "configs" / ref[4:]).is_file()
    if "/" not in ref:  # a bare name: a config of some example, or a module of the projects
        return any(EXAMPLES.rglob(name))
    return any((base / ref).exists() for base in (ROOT, source.parent, EXAMPLES))


def test_every_file_the_examples_refer_to_exists() -> None:
    """Catches a file named in a comment or a doc but never committed, or moved since."""
    missing = []
    for source in sorted(EXAMPLES.rglob("*")):
        if source.suffix not in (".py", ".yaml", ".md"):
            continue
        for ref in REFERENCE.findall(source.read_text()):
            if Path(ref).name not in OUTPUTS and "grids/" not in ref and not _exists(ref, source):
                missing.append(f"{source.relative_to(ROOT)}: {ref}")
    assert not missing, "files named but absent: " + "; ".join(missing)


def test_the_scan_sees_a_missing_file(tmp_path: Path) -> None:
    """The scan itself: a made-up config name in an example's text is reported."""
    text = "2048 is the standard (see tpu.yaml); see .../quickstart.yaml and configs/cifar10.yaml"
    refs = REFERENCE.findall(text)
    assert refs == ["tpu.yaml", ".../quickstart.yaml", "configs/cifar10.yaml"]
    source = EXAMPLES / "ddim" / "README.md"
    assert [_exists(r, source) for r in refs] == [False, True, True]
