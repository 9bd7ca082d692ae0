"""The multi-process tests' launcher (tests/helpers.py::run_ranks): a rank that never reports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import run_ranks


def _report_unless_stuck(rank: int, flag: Path | None, queue) -> None:
    """Rank 1 hangs when `flag` is None (always) or on the first launch only (flag not yet written)."""
    if rank == 1 and (flag is None or not flag.exists()):
        if flag is not None:
            flag.write_text("launched once")
        time.sleep(60)
    queue.put((rank, "ok", rank))


def test_a_rank_stuck_on_one_launch_only_is_launched_again_with_a_warning(tmp_path):
    # Catches a launcher that waits forever, returns the one rank that reported as the result, or
    # retries without saying so.
    flag = tmp_path / "flag"
    with pytest.warns(UserWarning, match=r"launch 1 of 2: rank\(s\) \[1\] did not report"):
        results = run_ranks(_report_unless_stuck, lambda r, port, q: (r, flag, q), timeout=3)
    assert results == {0: ("ok", 0), 1: ("ok", 1)}


def test_a_rank_stuck_on_every_launch_fails_the_test():
    # Catches a retry that hides a deterministic hang (what a library hang across ranks would be).
    with (
        pytest.warns(UserWarning),
        pytest.raises(AssertionError, match=r"rank\(s\) \[1\] did not report in any"),
    ):
        run_ranks(_report_unless_stuck, lambda r, port, q: (r, None, q), timeout=3)
