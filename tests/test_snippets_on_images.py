"""The first code a user copies runs on image batches ``(B, C, H, W)`` as well as on flat ``(B, D)`` data.

The landing page, the README and the user guide show a ``LightningModule``. Each of those blocks is
executed as pasted (``tests/test_docs.py`` and ``tests/test_readme.py`` do that too), and then its
module class is fitted for a few steps on an image dataset and on a flat dataset, with a
shape-agnostic stand-in for ``self.net`` where the snippet leaves the network to the reader.
"""

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_immiscible import ImmiscibleCoupling

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/user-guide.md"]
# H = 5 and W = 6 differ from the batch size 8: a time tensor of shape (B, 1) then fails to broadcast
# against (B, C, H, W); the recorded input shapes also catch a (B, 1) that broadcasts when B == W.
SHAPES = {"images": (3, 5, 6), "flat": (16,)}
BATCH = 8


def module_blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for code in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S):
            # A block with its own data (train_dataloader) or labels (immiscible_condition) is a
            # self-contained example that tests/test_docs.py runs as pasted: fitting it on unlabeled
            # tensors here would test this harness, not the snippet.
            own_data = "def train_dataloader" in code or "def immiscible_condition" in code
            if "LightningModule)" in code and "def training_step" in code and not own_data:
                found.append((page, code))
    return found


BLOCKS = module_blocks()


class ScaleNet(torch.nn.Module):
    """A denoiser for any shape: one learnable scale; records the shapes it was called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return x * self.w


def test_the_three_pages_each_show_a_module_block():
    # Guards the collector: a renamed class line would otherwise run no snippet at all.
    assert sorted({page for page, _ in BLOCKS}) == sorted(PAGES), [p for p, _ in BLOCKS]


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize(("page", "code"), BLOCKS, ids=[p for p, _ in BLOCKS])
def test_module_snippet_trains_on_images_and_on_flat_data(page, code, kind):
    namespace: dict = {"__name__": "snippet"}
    exec(compile(code, page, "exec"), namespace)
    shown = next(
        v
        for v in namespace.values()
        if isinstance(v, type) and issubclass(v, L.LightningModule) and v.__module__ == "snippet"
    )

    class Tested(shown):
        def __init__(self):
            super().__init__()
            self.net = ScaleNet()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    shape = SHAPES[kind]
    data = torch.utils.data.DataLoader(torch.rand(4 * BATCH, *shape) * 2 - 1, batch_size=BATCH)
    model = Tested()
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[ImmiscibleCoupling(method="lsa")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    # The network saw noised batches of the data's own shape, 3 times (a (B, 1) time tensor on images
    # either raises above or, when it broadcasts, changes this shape).
    assert model.net.seen == [(BATCH, *shape)] * 3
    assert torch.isfinite(trainer.callback_metrics["immiscible/reduction_pct"])
