"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.ports import free_port


@pytest.fixture(autouse=True)
def fork_safe_ranks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A free `MASTER_PORT` and one torch thread for each multi-process test.

    This file imports neither Lightning nor tests.helpers: Lightning configures its loggers when it
    is first imported, and imported this early (before pytest's log capture is set up) its
    messages no longer reached `caplog` on some versions (the floors' Lightning 2.5.0).

    - Lightning's launcher writes the port it picks into `os.environ` and never removes it, so every
      later `ddp_fork` fit in the same pytest process reused the first test's port, and failed with
      EADDRINUSE whenever another process had bound it meanwhile.
    - Forked ranks inherit the parent's OpenMP thread pool but not its threads: once an earlier test
      had run a multi-threaded MKL kernel in the pytest process, a forked rank's next threaded
      kernel (an in-place `sqrt_` in the costs) waited forever at an OpenMP barrier (seen in the full
      suite only, never in a test run alone). One thread in the parent before the fork keeps the
      ranks' kernels serial.
    """
    if request.node.get_closest_marker("ddp") is None:
        yield
        return
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
