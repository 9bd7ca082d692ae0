"""The examples' shared training pieces: EMA once per optimizer step, warm-up, eval mode, shape checks,
and the injected network (another network class through the config builds and fits)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from example_projects.common.data import synthetic_tensor
from example_projects.common.tiny_net import TinyConvNet
from example_projects.common.training import check_sample_shape, eval_mode, warmup_optimizer
from example_projects.common.unet import UNet
from example_projects.consistency import ConsistencyTraining
from example_projects.consistency import cli_main as consistency_cli
from example_projects.ddim import DDIMDiffusion
from example_projects.ddim import cli_main as ddim_cli
from example_projects.ddim.schedule import eps_loss
from example_projects.flow_matching import cli_main as flow_cli
from tests.helpers import trainer as make_trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv is present beside ``args``."""
    monkeypatch.setattr("sys.argv", ["example"])


def _tiny(example: str, decay: float) -> L.LightningModule:
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2))
    common = dict(in_channels=1, image_size=8, ema_decay=decay, ema_warmup=False, lr=1e-2)
    if example == "ddim":
        return DDIMDiffusion(net, **common)
    return ConsistencyTraining(net, total_steps=4, optimizer="adam", **common)


class TrainedWeightsAfterEachStep(L.Callback):
    """Records the trained parameters whenever an optimizer step has happened (the oracle's input)."""

    def __init__(self) -> None:
        self.micro_batches, self.weights, self.last_step = 0, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.micro_batches += 1
        if trainer.global_step > self.last_step:
            self.last_step = trainer.global_step
            self.weights.append([p.detach().clone() for p in pl_module.parameters() if p.requires_grad])


@pytest.mark.parametrize("example", ["ddim", "consistency"])
def test_ema_moves_once_per_optimizer_step_with_gradient_accumulation(example: str, tmp_path: Path) -> None:
    """With accumulate_grad_batches=2, 4 micro-batches are 2 optimizer steps: the EMA moves twice.

    Oracle: the EMA formula ``ema = d ema + (1 - d) w_k`` replayed from the initial weights over the
    weights ``w_k`` recorded after each optimizer step. Catches an update per micro-batch (4 updates,
    the consistency example's old ``on_train_batch_end``) and an update lagging one step (the old
    ``on_before_zero_grad``: it averages ``w_0, w_1`` instead of ``w_1, w_2``).
    """
    torch.manual_seed(0)
    model = _tiny(example, decay=0.5)
    expected = [p.detach().clone() for p in model.ema.model.parameters()]
    record = TrainedWeightsAfterEachStep()
    trainer = make_trainer(
        max_steps=2, accumulate_grad_batches=2, callbacks=[record], default_root_dir=tmp_path
    )
    data = TensorDataset(*synthetic_tensor(16, 1, 8))
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert record.micro_batches == 4 and len(record.weights) == 2
    for weights in record.weights:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights, strict=True)]
    assert int(model.ema.num_updates) == 2
    for got, want in zip(model.ema.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_warmup_optimizer_ramps_linearly_per_optimizer_step() -> None:
    param = nn.Parameter(torch.zeros(1))
    config = warmup_optimizer([param], lr=0.4, warmup_steps=4, optimizer="radam", betas=(0.5, 0.9))
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.RAdam) and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(6):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    no_warmup = warmup_optimizer([param], lr=0.4)
    assert isinstance(no_warmup["optimizer"], torch.optim.Adam)
    assert no_warmup["optimizer"].param_groups[0]["lr"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        warmup_optimizer([param], lr=0.1, optimizer="sgd")  # type: ignore[arg-type]


def test_eval_mode_restores_the_mode_also_after_an_error() -> None:
    net = nn.Dropout(0.5).train()
    with eval_mode(net) as inside:
        assert inside is net and not net.training
    assert net.training
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("sampling failed")
    assert net.training
    frozen = nn.Dropout(0.5).eval()
    with eval_mode(frozen):
        pass
    assert not frozen.training  # an eval-mode network (the EMA copy) stays in eval mode


def test_shape_checks_name_the_settings() -> None:
    with pytest.raises(ValueError, match=r"\(3, 8, 8\).*\(1, 8, 8\).*model.net.init_args"):
        check_sample_shape(torch.zeros(2, 3, 8, 8), (1, 8, 8))
    check_sample_shape(torch.zeros(2, 1, 8, 8), (1, 8, 8))


def test_a_network_with_the_wrong_output_channels_fails_instead_of_broadcasting() -> None:
    """A 1-channel prediction for 3-channel data would be broadcast by ``mse_loss`` (with a warning)."""

    def one_channel(x: Tensor, t: Tensor) -> Tensor:
        return x[:, :1]

    x0, noise = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    abar = torch.linspace(0.99, 0.01, 10)
    with pytest.raises(ValueError, match=r"returned shape \(2, 1, 4, 4\)"):
        eps_loss(one_channel, x0, noise, torch.tensor([1, 2]), abar)


# ----------------------------------------------------------------------------- the injected network


@pytest.mark.parametrize(
    ("example", "cli_main"),
    [("ddim", ddim_cli), ("consistency", consistency_cli), ("flow_matching", flow_cli)],
)
def test_another_network_class_from_the_config_builds_and_fits(example, cli_main, tmp_path: Path) -> None:
    """Swapping the network is a config edit: the quickstart with the shipped ``tiny_network.yaml``
    (only ``model.net`` replaced) builds that class, not the UNet, and fits 2 steps."""
    configs = ROOT / "example_projects" / example / "configs"
    cli = cli_main(
        [
            "fit",
            *("--config", str(configs / "quickstart.yaml")),
            *("--config", str(configs / "tiny_network.yaml")),
            *("--config", str(configs / "immiscible.yaml")),
            "--data.dataset=synthetic",
            "--data.channels=1",
            "--data.image_size=8",
            "--data.num_synthetic=16",
            "--data.batch_size=4",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 2
    trained = cli.model.denoiser.net if example == "consistency" else cli.model.net
    assert type(trained) is TinyConvNet
    assert not any(isinstance(m, UNet) for m in cli.model.modules())
    assert int(cli.model.ema.num_updates) == 2
