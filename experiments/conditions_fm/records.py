"""The records of the conditions experiment: one JSON file per finished (part, setting, arm, seed).

Each record stores where it ran from (`provenance`): the commit, the git tree hash of
`lightning_immiscible/` at that commit, a `dirty` flag (uncommitted changes to the library or to
any Python file) and the last commit that changed the pre-registration page. Each part's records
hold one library version: `check_can_add` refuses a record whose library tree hash differs from
the records of its part already there, and one made with other settings of its part. The two parts
are separate experiments (no comparison reads across them), so the library may change between
parts, never within one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGE = "docs/results/conditions-preregistration.md"


def git(*args: str) -> str | None:
    """`git args...` in the repository's root: its output, or `None` where git fails."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Where a run starts from: commit, library tree hash, dirty flags, the page's last commit and date."""
    page = (git("log", "-1", "--format=%H %cI", "--", PAGE) or " ").split(" ")
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_tree": git("rev-parse", "HEAD:lightning_immiscible"),
        "library_dirty": bool(git("status", "--porcelain", "--", "lightning_immiscible")),
        "dirty": bool(git("status", "--porcelain", "--", "lightning_immiscible", "*.py")),
        "prereg_commit": page[0] or None,
        "prereg_date": page[1] or None,
    }


def record_path(records: Path, part: str, setting: str, arm: str, seed: int) -> Path:
    """The record of one (part, setting, arm, seed)."""
    return records / f"{part}-{setting}-{arm}-seed{seed}.json"


def load(records: Path) -> list[dict[str, Any]]:
    """Every record in the folder (sorted by file name)."""
    return [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


def check_can_add(records: Path, prov: dict[str, Any], part: str, settings: dict[str, Any]) -> None:
    """Refuses (`SystemExit`) a new record that would mix library versions or settings in `records`.

    Args:
        records: The records folder.
        prov: The new record's provenance.
        part: Its part (`"a"` or `"b"`).
        settings: Its part's settings (as JSON would store them).

    Raises:
        SystemExit: A record of the same part there has another library tree hash or other settings.
    """
    wanted = json.loads(json.dumps(settings))
    for path in sorted(records.glob("*.json")):
        old = json.loads(path.read_text())
        if old["part"] != part:
            continue
        if old["provenance"]["library_tree"] != prov["library_tree"]:
            raise SystemExit(
                f"{path} ran with library tree hash {old['provenance']['library_tree']}, this code has "
                f"{prov['library_tree']}: one library version per part. Start over in another folder."
            )
        if old["settings"] != wanted:
            raise SystemExit(f"{path} was made with other settings; use another folder.")


def write(path: Path, record: dict[str, Any]) -> None:
    """Writes a record atomically (a stopped run leaves no half record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
