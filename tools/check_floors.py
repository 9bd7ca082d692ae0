"""Says which versions a lower-bound environment holds, and fails where a declared floor is not among them.

Run by ``tools/lower_bounds.sh`` with the new environment's Python, after the install. It reads the
requirements of the installed ``lightning-immiscible`` (with its ``fast`` and ``pot`` extras) and
the test tools named on the command line, and prints each one's declared floor and installed
version. With ``--resolution lowest-direct`` it exits 1 when an installed version lies outside its
floor's release series (``numpy>=1.23`` installed as numpy 1.24.0, say): that floor has no wheel
for this Python, so the run would not test it, and the floor should be raised.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

PROJECT = "lightning-immiscible"
EXTRAS = ("", "fast", "pot")


def applies(req: Requirement) -> bool:
    """Whether `req` is installed with the checked extras on this Python."""
    return req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in EXTRAS)


def floor_of(req: Requirement) -> Version | None:
    """The version of `req`'s `>=` specifier (None without one)."""
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(floors) if floors else None


def in_series(installed: Version, floor: Version) -> bool:
    """Whether `installed` is a release of `floor`'s series (1.23.2 of 1.23, 2.3.0 of 2.3)."""
    return installed.release[: len(floor.release)] == floor.release


def rows(tools: list[str]) -> list[tuple[str, str, Version | None, Version]]:
    """`(name, declared specifier, floor, installed version)` of each checked requirement."""
    reqs = [Requirement(r) for r in metadata.requires(PROJECT) or []]
    reqs = [r for r in reqs if applies(r)] + [Requirement(t) for t in tools]
    return [(r.name, str(r.specifier), floor_of(r), Version(metadata.version(r.name))) for r in reqs]


def main(argv: list[str] | None = None) -> int:
    """Prints the table; returns 1 when a floor was not installed in lowest-direct mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="lowest-direct")
    parser.add_argument("tools", nargs="*", help="test tools installed beside the project")
    args = parser.parse_args(argv)
    print(f"check_floors: Python {platform.python_version()}, {args.resolution}")
    print(f"  {'package':<16} {'declared':<12} installed")
    missed = []
    for name, spec, floor, installed in rows(args.tools):
        print(f"  {name:<16} {spec:<12} {installed}")
        if args.resolution == "lowest-direct" and floor is not None and not in_series(installed, floor):
            missed.append(f"{name}: declared {spec}, lowest installable here {installed}")
    for line in missed:
        print(f"check_floors: floor not tested ({line}): raise it", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
