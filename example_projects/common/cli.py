"""The example projects' LightningCLI: their callbacks as top-level config groups.

``fid:``, ``grid:``, ``progress_bar:`` and ``summary:`` are config groups of their own, so
``trainer.callbacks`` holds only the coupling and an overlay that sets it (``immiscible.yaml``,
``baseline.yaml``) replaces exactly that one entry. The model's image shape follows the data
(``data.channels``: 1 for MNIST, else 3; ``data.image_size``). The network is its own config
entry (``model.net``: ``class_path`` + ``init_args``), so trying another network is a YAML edit;
its input size is set there, next to its other arguments.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.cli import LightningCLI

from example_projects.common.fid import FIDCallback
from example_projects.common.grids import SampleGrid
from example_projects.common.progress import ImmiscibleProgressBar, RunSummary


class ExampleCLI(LightningCLI):
    """LightningCLI with the examples' callback groups; subclasses pick the FID and grid classes.

    Examples:
        ```python
        class MyCLI(ExampleCLI):
            fid_class = MyFID

        MyCLI(MyModel, ImageDataModule, args=["fit", "--config", "my.yaml"])
        ```
    """

    #: The callback behind ``fid:``.
    fid_class: ClassVar[type[FIDCallback]] = FIDCallback
    #: The callback behind ``grid:``.
    grid_class: ClassVar[type[L.Callback]] = SampleGrid
    #: Where the model's constructor arguments sit (``model.init_args`` in subclass mode).
    model_arguments: ClassVar[str] = "model"

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Adds the callback groups and links the model's image shape to the data's."""
        parser.add_lightning_class_args(self.fid_class, "fid")
        parser.add_lightning_class_args(self.grid_class, "grid")
        parser.add_lightning_class_args(ImmiscibleProgressBar, "progress_bar")
        parser.add_lightning_class_args(RunSummary, "summary")
        for name, target in (("channels", "in_channels"), ("image_size", "image_size")):
            parser.link_arguments(f"data.{name}", f"{self.model_arguments}.{target}", apply_on="instantiate")
