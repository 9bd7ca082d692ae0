"""DDIM example: schedules, the noise pairing of the loss, the sampler, configs and CLI runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from example_projects.common.progress import summary_text
from example_projects.common.unet import UNet
from example_projects.ddim import DDIMDiffusion, cli_main
from example_projects.ddim.schedule import ddim_sample, ddim_timesteps, eps_loss, make_betas, q_sample
from lightning_immiscible import ImmiscibleCoupling
from tests.examples.support import logged_values

CONFIGS = Path(__file__).resolve().parents[2] / "example_projects" / "ddim" / "configs"
QUICK, CIFAR = str(CONFIGS / "quickstart.yaml"), str(CONFIGS / "cifar10.yaml")
IMM, BASE = str(CONFIGS / "immiscible.yaml"), str(CONFIGS / "baseline.yaml")
TINY_FID = [
    "--fid.extractor=example_projects.common.fid.TinyExtractor",
    "--fid.num_samples=8",
    "--fid.sampling_steps=[2, 3]",
    "--fid.batch_size=8",
    "--grid.num_images=4",
    "--grid.steps=2",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv is present beside ``args``."""
    monkeypatch.setattr("sys.argv", ["example_projects.ddim"])


def tiny_net() -> UNet:
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2))


def tiny_model(**kwargs) -> DDIMDiffusion:
    return DDIMDiffusion(tiny_net(), in_channels=1, image_size=8, **kwargs)


# ----------------------------------------------------------------------------- schedules and sampler


def test_schedules() -> None:
    lin = make_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    abar = torch.cumprod(1 - make_betas("cosine", 1000), 0)
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1] < 1e-4 and abar[0] > 0.999
    with pytest.raises(ValueError, match="Unknown schedule"):
        make_betas("quadratic")


def test_ddim_timesteps_are_linear() -> None:
    assert ddim_timesteps(20).tolist() == list(range(0, 1000, 50))
    assert ddim_timesteps(1000).tolist() == list(range(1000))
    with pytest.raises(ValueError):
        ddim_timesteps(0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_recovers_a_point_mass_exactly(schedule: str) -> None:
    """With the exact epsilon of a one-point data set, eta=0 DDIM lands on that point."""
    abar = torch.cumprod(1 - make_betas(schedule, 1000), 0).float()
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(oracle, noise, abar, num_steps=10)
    assert torch.allclose(out, c.expand_as(out), atol=1e-4)


def test_model_sampling_shapes_range_and_determinism() -> None:
    model = tiny_model()
    with torch.no_grad():  # a non-trivial network: the zero-initialised head would output 0
        for p in model.ema.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    noise = torch.randn(5, *model.sample_shape(), generator=torch.Generator().manual_seed(1))
    a, b = model.sample(noise, steps=4), model.sample(noise.clone(), steps=4)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, model.sample(noise, steps=2))
    assert model.ema.model.training is False


# ----------------------------------------------------------------------------- the noise pairing


class BrokenPairing(DDIMDiffusion):
    """Builds x_t from another pairing (noise rolled by one item) than the noise handed out."""

    def loss(self, x0, noise, t):
        return eps_loss(self.net, x0, noise.roll(1, 0), t, self.alphas_cumprod)


class OtherTarget(DDIMDiffusion):
    """Builds x_t with the handed-out noise but regresses onto fresh noise."""

    def loss(self, x0, noise, t):
        return F.mse_loss(self.net(q_sample(x0, noise, t, self.alphas_cumprod), t), torch.randn_like(noise))


def check_same_noise(model: DDIMDiffusion) -> None:
    """Fails unless training_step uses noise_like's noise for x_t AND as the target.

    The network is replaced by a spy that records (x_t, t) and predicts exactly the handed-out
    noise: the loss is then 0 if and only if the target is that noise.
    """
    x0 = torch.rand(6, *model.sample_shape(), generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    model.noise_like = lambda x: noise  # what the coupling hands out for this batch
    seen: dict[str, torch.Tensor] = {}

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t
        return noise.clone()

    model.net.forward = spy
    model.log = lambda *a, **k: None
    loss = model.training_step((x0, torch.zeros(6, dtype=torch.long)), 0)
    abar = model.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6), "x_t pairing"
    assert float(loss) == 0.0, "the target is not the noise that built x_t"


def test_training_step_uses_the_same_noise_for_x_t_and_target() -> None:
    check_same_noise(tiny_model())


@pytest.mark.parametrize("broken", [BrokenPairing, OtherTarget])
def test_a_broken_pairing_fails_the_check(broken: type) -> None:
    model = broken(tiny_net(), in_channels=1, image_size=8)
    with pytest.raises(AssertionError):
        check_same_noise(model)


def test_coupled_noise_reaches_x_t_in_a_real_fit(tmp_path: Path) -> None:
    """With the coupling callback on, x_t is built from exactly the noise the callback prepared."""
    import lightning as L

    from example_projects.common.data import ImageDataModule

    model = tiny_model()
    records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original_noise_like, original_loss = model.noise_like, model.loss

    def noise_like(x0: torch.Tensor) -> torch.Tensor:
        assert model.coupled_batch is not None, "the callback did not prepare noise for this batch"
        return original_noise_like(x0)

    def loss(x0, noise, t):
        records.append((x0, noise, t, model.coupled_batch.noise))
        return original_loss(x0, noise, t)

    model.noise_like, model.loss = noise_like, loss
    dm = ImageDataModule("synthetic", image_size=8, channels=1, batch_size=8, num_synthetic=32)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[ImmiscibleCoupling(method="lsa", seed=0)],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert len(records) == 2
    for _x0, noise, _t, prepared in records:
        assert torch.equal(noise, prepared)


# ----------------------------------------------------------------------------- configs and CLI


def couplings(cli) -> list[ImmiscibleCoupling]:
    return [c for c in cli.trainer.callbacks if isinstance(c, ImmiscibleCoupling)]


@pytest.mark.parametrize(
    ("configs", "methods"),
    [
        ([QUICK], []),
        ([QUICK, IMM], ["lsa"]),
        ([QUICK, BASE], ["none"]),
        ([QUICK, IMM, BASE], ["none"]),  # the last overlay wins: still exactly one coupling
        ([CIFAR, IMM], ["lsa"]),
        ([CIFAR, BASE], ["none"]),
    ],
)
def test_configs_compose_to_exactly_one_coupling(
    configs: list[str], methods: list[str], tmp_path: Path
) -> None:
    args = [a for c in configs for a in ("--config", c)] + [f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, run=False)
    assert [c.spec.method for c in couplings(cli)] == methods
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"FIDCallback", "SampleGrid", "ImmiscibleProgressBar", "RunSummary"} <= names


def test_overlays_differ_only_in_method() -> None:
    imm, base = Path(IMM).read_text().splitlines(), Path(BASE).read_text().splitlines()
    differing = [(a, b) for a, b in zip(imm, base, strict=True) if a != b and not a.startswith("#")]
    assert differing == [("        method: lsa", "        method: none")]


def test_cifar10_config_is_the_paper_setting(tmp_path: Path) -> None:
    cli = cli_main(["--config", CIFAR, "--config", IMM, f"--trainer.default_root_dir={tmp_path}"], run=False)
    hp, fid = cli.model.hparams, next(c for c in cli.trainer.callbacks if type(c).__name__ == "FIDCallback")
    net = cli.config.model.net.init_args
    assert (net.base_channels, list(net.channel_mult), net.num_res_blocks, list(net.attn_resolutions)) == (
        128,
        [1, 2, 2, 2],
        2,
        [16],
    )
    assert (hp.lr, hp.ema_decay, net.dropout, cli.datamodule.batch_size) == (2e-4, 0.9999, 0.1, 128)
    assert (fid.feature, fid.num_samples, fid.num_real) == (2048, 50_000, -1)
    assert sum(p.numel() for p in cli.model.net.parameters()) == pytest.approx(35.7e6, rel=0.01)


def _run_args(tmp_path: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.log_every_n_steps=1",
        *TINY_FID,
    ]


def test_quickstart_fit_logs_fid_grid_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny end-to-end fit of the quickstart (embedded MNIST-5k) logs FID values and a grid."""
    cli = cli_main(["fit", "--config", QUICK, "--config", IMM, *_run_args(tmp_path), "--data.batch_size=16"])
    log_dir = Path(cli.trainer.logger.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    fids = [float(r["val/fid16_n8_ddim2"]) for r in rows if r.get("val/fid16_n8_ddim2")]
    assert len(fids) == 1 and math.isfinite(fids[0]) and fids[0] > 0
    # Read as floats (the string "0.0" is truthy): every logged step coupled, with a real reduction.
    reductions = logged_values(log_dir / "metrics.csv", "immiscible/reduction_pct")
    assert len(reductions) == 2 and all(r > 0 for r in reductions)
    assert (log_dir / "grids" / "latest.png").is_file() and (log_dir / "grids" / "step0000002.png").is_file()
    assert int(cli.model.ema.num_updates) == 2
    summary = summary_text(cli.trainer)
    assert str(log_dir / "grids" / "latest.png") in summary and str(log_dir / "metrics.csv") in summary


def test_cifar10_config_runs_a_few_steps(tmp_path: Path) -> None:
    """The published 35.7 M network, on synthetic 32x32 RGB data, batch 2."""
    cli = cli_main(
        [
            "fit",
            "--config",
            CIFAR,
            "--config",
            BASE,
            *_run_args(tmp_path),
            "--data.dataset=synthetic",
            "--data.batch_size=2",
            "--data.num_synthetic=8",
            "--data.num_workers=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.callbacks.init_args.seed=0",
        ]
    )
    assert cli.trainer.global_step == 2 and "val/fid16_n8_ddim3" in cli.trainer.callback_metrics
    # The baseline overlay runs the same code path without re-pairing: a reduction of exactly 0.
    reductions = logged_values(Path(cli.trainer.logger.log_dir) / "metrics.csv", "immiscible/reduction_pct")
    assert len(reductions) == 2 and all(r == 0.0 for r in reductions)


def test_resume_and_validate_from_a_checkpoint(tmp_path: Path) -> None:
    args = [
        "--config",
        QUICK,
        "--config",
        IMM,
        *_run_args(tmp_path),
        "--data.dataset=synthetic",
        "--data.channels=1",
        "--data.batch_size=8",
        "--data.num_synthetic=32",
    ]
    first = cli_main(["fit", *args])
    ckpt = (
        first.trainer.checkpoint_callback.last_model_path or first.trainer.checkpoint_callback.best_model_path
    )
    assert ckpt and Path(ckpt).is_file()
    resumed = cli_main(["fit", *args, "--trainer.max_steps=4", f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 4 and int(resumed.model.ema.num_updates) == 4
    validated = cli_main(["validate", *args, f"--ckpt_path={ckpt}"])  # FID for a checkpoint, no training
    assert "val/fid16_n8_ddim2" in validated.trainer.callback_metrics


def test_missing_dataset_path_fails_before_training(tmp_path: Path) -> None:
    from example_projects.common.data import DatasetUnavailableError

    with pytest.raises(DatasetUnavailableError, match=r"/no/such/cifar.*quickstart.yaml"):
        cli_main(
            [
                "fit",
                "--config",
                QUICK,
                "--config",
                IMM,
                *_run_args(tmp_path),
                "--data.dataset=cifar10",
                "--data.root=/no/such/cifar",
                "--data.channels=3",
            ]
        )


def test_coupling_args_are_overridable_from_the_command_line(tmp_path: Path) -> None:
    cli = cli_main(
        [
            "--config",
            CIFAR,
            "--config",
            IMM,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks.init_args.scope=node",
            "--trainer.callbacks.init_args.seed=7",
        ],
        run=False,
    )
    (coupling,) = couplings(cli)
    assert (coupling.spec.method, coupling.scope, coupling.seed) == ("lsa", "node", 7)
