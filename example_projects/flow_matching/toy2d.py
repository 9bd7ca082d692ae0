"""The 2-D template: an MLP velocity field from a Gaussian to 8 Gaussians or two moons.

``python -m example_projects.flow_matching.toy2d fit --config .../toy2d.yaml --config .../ot.yaml``

This is where minibatch coupling is known to matter most (Tong et al. 2024, Pooladian et al. 2023):
with the noise re-paired to the batch by an exact assignment, the learned paths cross less, so one
Euler step lands closer to the target. The evaluation callback
([Toy2DEval][example_projects.flow_matching.toy2d_eval.Toy2DEval]) measures it as an exact W2.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from example_projects.common.training import eval_mode
from example_projects.flow_matching.objective import TimeSampling, flow_matching_loss, sample_time
from example_projects.flow_matching.samplers import SamplerName, integrate
from example_projects.flow_matching.targets2d import TargetName, sample_target
from example_projects.flow_matching.toy2d_eval import Toy2DEval
from lightning_immiscible import ImmiscibleMixin


class MLPVelocity(nn.Module):
    """``v(x, t)``: an MLP on ``[x, t]`` (torchcfm's toy network: 3 hidden layers of width 64, SELU).

    Args:
        dim: Data dimension.
        width: Hidden width.
        depth: Hidden layers.
    """

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(dim + 1 if i == 0 else width, width), nn.SELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``(B, dim)`` points and ``(B,)`` times -> ``(B, dim)`` velocities."""
        return self.net(torch.cat([x, t.to(x.dtype)[:, None]], dim=1))


class Toy2DData(L.LightningDataModule):
    """A fixed training sample of a 2-D target, and a small validation sample.

    Args:
        target: ``8gaussians`` or ``moons``.
        num_train: Training points (drawn once from ``seed``).
        batch_size: Points per batch (the coupling's pool size).
        num_val: Validation points (for the validation loss).
        seed: Seed of the samples.
    """

    def __init__(
        self,
        target: TargetName = "8gaussians",
        num_train: int = 100_000,
        batch_size: int = 256,
        num_val: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.target, self.num_train, self.batch_size = target, num_train, batch_size
        self.num_val, self.seed = num_val, seed

    @override
    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.train_set = TensorDataset(sample_target(self.target, self.num_train, g))
        self.val_set = TensorDataset(sample_target(self.target, self.num_val, g))

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)


class Toy2DFlow(ImmiscibleMixin, L.LightningModule):
    """Flow matching on 2-D points; ``noise = self.noise_like(x0)`` is the one coupled line.

    Args:
        net: The velocity network ``net(x, t)``, injected from the config (``class_path``).
        time_sampling: ``uniform`` or ``logit_normal`` training times.
        lr: Adam learning rate.
    """

    def __init__(self, net: nn.Module, time_sampling: TimeSampling = "uniform", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def loss(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Flow-matching loss for ``(B, 2)`` data, its paired noise and ``(B,)`` times."""
        return flow_matching_loss(self.net, x0, noise, t)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.coupled_data(batch)  # immiscible_data(batch), computed once per batch
        noise = self.noise_like(x0)  # coupled noise when ImmiscibleCoupling is active
        t = sample_time(x0.shape[0], self.hparams.time_sampling, device=x0.device)
        loss = self.loss(x0, noise, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0 = self.immiscible_data(batch)
        g = torch.Generator().manual_seed(batch_idx)  # the same noise and t every evaluation
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = sample_time(x0.shape[0], "uniform", generator=g, device=x0.device)
        self.log("val/loss", self.loss(x0, noise, t))

    @torch.no_grad()
    def sample(
        self, noise: Tensor, steps: int, sampler: SamplerName = "euler", return_path: bool = False
    ) -> Tensor:
        """Integrates the learned field from ``(B, 2)`` noise; the path with ``return_path``."""
        with eval_mode(self.net) as net:
            return integrate(net, noise, steps, sampler, return_path)

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


class Toy2DCLI(LightningCLI):
    """LightningCLI with the evaluation callback as its own ``eval:`` group.

    So ``trainer.callbacks`` holds only the coupling, and the overlays (``ot.yaml``,
    ``baseline.yaml``...) replace exactly that entry.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Adds ``eval:`` (W2, straightness and plots)."""
        parser.add_lightning_class_args(Toy2DEval, "eval")


def cli_main(args: list[str] | None = None, run: bool = True) -> Toy2DCLI:
    """Runs the 2-D template's CLI (``fit``, ``validate``...); returns the CLI object."""
    return Toy2DCLI(Toy2DFlow, Toy2DData, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()
