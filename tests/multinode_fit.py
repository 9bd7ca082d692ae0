"""One rank of a multi-node fit, started by torchrun (see tests/test_multinode.py).

Usage: torchrun --nnodes 2 --nproc-per-node 2 --node-rank N ... tests/multinode_fit.py OUT SCOPE...
Each scope is fitted in turn; each rank saves its records to OUT/{scope}_rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_immiscible import ImmiscibleCoupling
from tests.helpers import ToyDiffusion, trainer  # the test puts the repository on PYTHONPATH


class GroupSeen(Callback):
    """Records the coupling group during the fit (the callback releases its groups at the fit's end)."""

    def __init__(self, coupling: ImmiscibleCoupling):
        self.coupling, self.ranks, self.index = coupling, (), -1

    def on_train_end(self, trainer, pl_module):
        self.ranks, self.index = self.coupling.group.ranks, self.coupling.group.index


def main(out: Path, scopes: list[str]) -> None:
    for scope in scopes:
        coupling = ImmiscibleCoupling(method="lsa", scope=int(scope) if scope.isdigit() else scope, seed=3)
        module = ToyDiffusion(sizes=(16,), batch_size=8)
        seen = GroupSeen(coupling)
        t = trainer(
            callbacks=[coupling, seen],
            devices=2,
            num_nodes=2,
            strategy="ddp",
            max_steps=2,
            use_distributed_sampler=False,
        )
        t.fit(module)
        torch.save(
            {"records": module.records, "group": seen.ranks, "index": seen.index},
            out / f"{scope}_rank{t.global_rank}.pt",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
