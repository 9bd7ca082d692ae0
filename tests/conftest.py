"""Shared test setup."""

from __future__ import annotations

import pytest

from tests.helpers import free_port


@pytest.fixture(autouse=True)
def fresh_master_port(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A free `MASTER_PORT` for each multi-process test.

    Lightning's launcher writes the port it picks into `os.environ` and never removes it, so every
    later `ddp_fork` fit in the same pytest process reused the first test's port, and failed with
    EADDRINUSE whenever another test's process had bound it meanwhile.
    """
    if request.node.get_closest_marker("ddp") is not None:
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
