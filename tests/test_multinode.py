"""Scale-out on real processes: 2 "nodes" x 2 devices on one host, launched by torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_immiscible import couple
from lightning_immiscible.streams import draw_pool
from tests.ports import free_port

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("node", "2", "global", "local")


@pytest.fixture(scope="module")
def multinode_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "tests" / "multinode_fit.py"),
                str(out),
                *SCOPES,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    logs = [p.communicate(timeout=280)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    return {s: [torch.load(out / f"{s}_rank{r}.pt", weights_only=False) for r in range(4)] for s in SCOPES}


def _check_group(ranks, members, group_index, seed=3):
    for draw in range(2):
        x = torch.cat([ranks[r]["records"][draw]["x0"] for r in members])
        pool = draw_pool(x.shape, seed, group_index, draw)
        expected = couple(x, pool, method="lsa")  # the optimum for the group's pooled items
        got = torch.cat([ranks[r]["records"][draw]["noise"] for r in members])
        assert torch.equal(got, expected.noise)


@pytest.mark.parametrize("scope", ["node", "2"])
def test_node_scope_couples_exactly_per_node(multinode_runs, scope):
    ranks = multinode_runs[scope]
    assert [r["group"] for r in ranks] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    _check_group(ranks, (0, 1), 0)
    _check_group(ranks, (2, 3), 1)
    # the two groups draw different pools
    assert not torch.equal(
        ranks[0]["records"][0]["noise"].sort(0)[0], ranks[2]["records"][0]["noise"].sort(0)[0]
    )


def test_global_scope_pools_all_four_ranks(multinode_runs):
    ranks = multinode_runs["global"]
    assert all(r["group"] == (0, 1, 2, 3) for r in ranks)
    _check_group(ranks, (0, 1, 2, 3), 0)


def test_local_scope_couples_each_rank_alone(multinode_runs):
    ranks = multinode_runs["local"]
    for r in range(4):
        assert ranks[r]["group"] == (r,)
        _check_group(ranks, (r,), r)
