"""Tests of the consistency-training (iCT) example: curriculum, coupled noise, sampling, CLI, FID."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from example_projects.common.data import synthetic_tensor
from example_projects.common.fid import TinyExtractor
from example_projects.common.unet import UNet
from example_projects.consistency import ConsistencyTraining, cli_main
from example_projects.consistency.callbacks import ConsistencyFID, ConsistencyGrid, cm_fid_metric_name
from example_projects.consistency.training import (
    consistency_loss,
    discretisation_steps,
    huber_c,
    karras_sigmas,
    lognormal_index_probs,
    pseudo_huber,
    sample_pairs,
    sampling_sigmas,
)
from lightning_immiscible import CoupledBatch, CouplingResult, ImmiscibleCoupling
from lightning_immiscible.mixin import hand_off
from tests.examples.support import reductions_per_step

CONFIGS = Path(__file__).resolve().parents[2] / "example_projects" / "consistency" / "configs"
TINY = dict(image_size=8, total_steps=8)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv is present beside ``args``."""
    monkeypatch.setattr("sys.argv", ["example_projects.consistency"])


def tiny_net() -> UNet:
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)


def tiny_model(**kwargs) -> ConsistencyTraining:
    return ConsistencyTraining(
        tiny_net(), **{**TINY, "optimizer": "adam", "lr": 1e-3, "ema_decay": 0.9, **kwargs}
    )


# --- the discretisation curriculum and the iCT building blocks ----------------------------------------


def test_curriculum_values_boundaries_and_cap():
    # K = 800, s0 = 10, s1 = 1280: K' = floor(800 / (log2(128) + 1)) = 100.
    assert discretisation_steps(0, 800) == 11
    assert discretisation_steps(99, 800) == 11
    assert discretisation_steps(100, 800) == 21
    assert discretisation_steps(199, 800) == 21
    assert discretisation_steps(200, 800) == 41
    assert discretisation_steps(699, 800) == 641
    assert discretisation_steps(700, 800) == 1281
    assert discretisation_steps(799, 800) == 1281
    assert discretisation_steps(10**9, 800) == 1281  # capped at s1 + 1
    # The published CIFAR-10 run: K = 400k, K' = 50k.
    assert [discretisation_steps(k, 400_000) for k in (0, 49_999, 50_000, 350_000)] == [11, 11, 21, 1281]
    # Other s0/s1 and a run shorter than the number of stages (K' clamps to 1).
    assert [discretisation_steps(k, 1000, 10, 160) for k in (0, 199, 200, 800, 999)] == [11, 11, 21, 161, 161]
    assert [discretisation_steps(k, 2) for k in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]


def test_curriculum_rejects_bad_bounds():
    with pytest.raises(ValueError, match="s0"):
        discretisation_steps(0, 100, s0=20, s1=10)


def test_karras_sigmas_and_lognormal_pairs():
    sigmas = karras_sigmas(11)
    assert sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    probs = lognormal_index_probs(sigmas)
    assert probs.shape == (10,) and torch.all(probs > 0) and float(probs.sum()) == pytest.approx(1.0)
    # Most mass near ln(sigma) = -1.1: the pair containing sigma = exp(-1.1) ~ 0.33 is the most likely.
    mode = int(probs.argmax())
    assert sigmas[mode] <= math.exp(-1.1) * 3 and sigmas[mode + 1] >= math.exp(-1.1) / 3
    g = torch.Generator().manual_seed(0)
    lo, hi = sample_pairs(sigmas, 64, generator=g)
    assert torch.all(hi > lo)
    assert torch.equal(lo, sample_pairs(sigmas, 64, generator=torch.Generator().manual_seed(0))[0])


def test_pseudo_huber_and_scale():
    x, y = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(pseudo_huber(x, y, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    assert huber_c((3, 32, 32)) == pytest.approx(0.0299, abs=1e-4)  # iCT's c = 0.03 on CIFAR-10


def test_boundary_condition_is_identity():
    model = tiny_model()
    x = torch.randn(3, 1, 8, 8)
    out = model.denoiser(x, torch.full((3,), model.hparams.sigma_min))
    assert torch.allclose(out, x, atol=1e-6)


# --- the coupled noise: one z for the student and the target ------------------------------------------


class Spy(nn.Module):
    """Wraps the consistency function and records every call's input and noise level."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return self.inner(x, sigma)


def implied_noises(calls: list[tuple[Tensor, Tensor]], x0: Tensor) -> list[Tensor]:
    """``z = (x - x0) / sigma`` for each recorded call ``x = x0 + sigma z``."""
    return [(x - x0) / sigma.view(-1, 1, 1, 1) for x, sigma in calls]


def assert_student_and_target_share(calls: list[tuple[Tensor, Tensor]], x0: Tensor, noise: Tensor) -> None:
    assert len(calls) == 2, "one target and one student call per training step"
    (_, s_target), (_, s_student) = calls
    assert torch.all(s_student > s_target), "the student sees the larger level sigma_{i+1}"
    for z in implied_noises(calls, x0):
        torch.testing.assert_close(z, noise, atol=1e-3, rtol=1e-3)


def _step_with_prepared_noise(model: ConsistencyTraining) -> tuple[Spy, Tensor, Tensor]:
    torch.manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    batch = (x0, torch.zeros(6, dtype=torch.long))
    coupled = torch.randn(6, 1, 8, 8).flip(0)  # stands in for the callback's re-paired noise
    result = CouplingResult(coupled, torch.arange(6), 1.0, 1.0)
    hand_off(model).give(CoupledBatch(batch=batch, x0=x0, result=result, draw=0))
    spy = Spy(model.denoiser)
    model.denoiser = spy
    model.training_step(batch, 0)
    return spy, x0, coupled


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_student_and_target_inputs_share_the_coupled_noise():
    spy, x0, coupled = _step_with_prepared_noise(tiny_model())
    assert_student_and_target_share(spy.calls, x0, coupled)


class FreshTargetNoise(ConsistencyTraining):
    """Deliberately broken: the target gets its own fresh noise instead of the coupled one."""

    def loss(self, x0, noise, sigma, sigma_next, denoiser=None):
        net = denoiser or self.denoiser
        with torch.no_grad():
            target = net(x0 + sigma.to(x0).view(-1, 1, 1, 1) * torch.randn_like(x0), sigma.to(x0))
        student = net(x0 + sigma_next.to(x0).view(-1, 1, 1, 1) * noise, sigma_next.to(x0))
        return (student - target).square().mean()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_shared_noise_check_catches_a_broken_target():
    spy, x0, coupled = _step_with_prepared_noise(
        FreshTargetNoise(tiny_net(), **{**TINY, "optimizer": "adam"})
    )
    with pytest.raises(AssertionError):
        assert_student_and_target_share(spy.calls, x0, coupled)


def test_fit_uses_the_callbacks_coupled_noise_for_both_inputs(tmp_path):
    model = tiny_model()
    spy = Spy(model.denoiser)
    model.denoiser = spy
    seen: list[tuple[Tensor, Tensor]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch[0].clone(), coupling.last_result.noise.clone()))

    coupling = ImmiscibleCoupling(method="lsa", seed=3)
    data = TensorDataset(*synthetic_tensor(16, 1, 8))
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[coupling, Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    assert len(seen) == 2
    for step, (x0, noise) in enumerate(seen):
        assert_student_and_target_share(spy.calls[2 * step : 2 * step + 2], x0, noise)


def test_consistency_loss_takes_the_noise_as_argument():
    torch.manual_seed(0)
    model = tiny_model()
    x0, noise = torch.rand(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    sigma, sigma_next = torch.tensor([0.1, 0.5, 1.0, 2.0]), torch.tensor([0.2, 0.7, 1.5, 3.0])
    a = consistency_loss(model.denoiser, x0, noise, sigma, sigma_next, 0.01)
    b = consistency_loss(model.denoiser, x0, noise, sigma, sigma_next, 0.01)
    assert a.ndim == 0 and torch.isfinite(a) and torch.equal(a, b)
    a.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


# --- sampling ----------------------------------------------------------------------------------------


def test_sampling_sigmas():
    assert sampling_sigmas(1) == [80.0]
    assert sampling_sigmas(2) == pytest.approx([80.0, 0.821])
    four = sampling_sigmas(4)
    assert four[0] == pytest.approx(80.0) and four[-1] == pytest.approx(0.821)
    assert all(a > b for a, b in itertools.pairwise(four))
    with pytest.raises(ValueError):
        sampling_sigmas(0)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sample_shapes_range_and_determinism(steps):
    model = tiny_model()
    with torch.no_grad():  # give the untrained (zero-initialised head) network a non-trivial output
        for p in model.ema.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.sample(noise, steps)
    assert out.shape == (5, 1, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, model.sample(noise.clone(), steps))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.sample(noise, steps, generator=g1), model.sample(noise, steps, generator=g2))
    assert not torch.equal(out, model.sample(torch.randn(5, 1, 8, 8), steps))
    assert model.ema.model.training is False


# --- the CLI and its configs ---------------------------------------------------------------------------


def _cli_args(tmp_path: Path, *configs: str) -> list[str]:
    args = ["fit"]
    for name in configs:
        args += ["--config", str(CONFIGS / name)]
    return [
        *args,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--data.dataset=synthetic",
        "--data.root=null",
        "--data.image_size=8",
        "--data.channels=1",
        "--data.batch_size=4",
        "--data.num_synthetic=16",
        "--model.net.init_args.in_channels=1",
        "--model.net.init_args.image_size=8",
        "--model.net.init_args.channel_mult=[1, 2]",
        "--model.net.init_args.attn_resolutions=[]",
        "--model.net.init_args.base_channels=8",
        "--model.net.init_args.num_res_blocks=1",
        "--fid.num_samples=4",
        "--grid.num_images=2",
    ]


def _couplings(cli) -> list[ImmiscibleCoupling]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, ImmiscibleCoupling)]


@pytest.mark.parametrize(
    ("base", "overlay", "method"),
    [
        ("quickstart.yaml", "immiscible.yaml", "lsa"),
        ("cifar10.yaml", "baseline.yaml", "none"),
        ("celeba64.yaml", "immiscible.yaml", "lsa"),
    ],
)
def test_every_config_runs_two_steps(tmp_path, base, overlay, method):
    cli = cli_main(_cli_args(tmp_path, base, overlay))
    assert cli.trainer.global_step == 2
    couplings = _couplings(cli)
    assert len(couplings) == 1 and couplings[0].spec.method == method
    assert (
        isinstance(cli.model, ConsistencyTraining)
        and cli.model.hparams.in_channels == cli.datamodule.channels
    )


@pytest.mark.parametrize("base", ["quickstart.yaml", "cifar10.yaml", "celeba64.yaml"])
@pytest.mark.parametrize(("overlay", "method"), [("immiscible.yaml", "lsa"), ("baseline.yaml", "none")])
def test_every_config_and_overlay_parse_to_one_coupling(tmp_path, base, overlay, method):
    cli = cli_main(_cli_args(tmp_path, base, overlay)[1:], run=False)
    couplings = _couplings(cli)
    assert len(couplings) == 1 and couplings[0].spec.method == method


@pytest.mark.parametrize("base", ["quickstart.yaml", "cifar10.yaml", "celeba64.yaml"])
def test_published_settings_in_the_configs_parse_unchanged(base):
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / base),
            "--config",
            str(CONFIGS / "immiscible.yaml"),
            "--data.dataset=synthetic",
            "--data.root=null",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
        ],
        run=False,
    )
    h = cli.config.model
    assert (h.sigma_min, h.sigma_max, h.sigma_data, h.rho, h.p_mean, h.p_std) == (
        0.002,
        80.0,
        0.5,
        7.0,
        -1.1,
        2.0,
    )
    assert list(cli.config.fid.sampling_steps) == [1, 2]
    if base != "quickstart.yaml":
        assert (h.s0, h.s1, h.optimizer, h.lr) == (10, 1280, "radam", 1e-4)
        assert cli.config.fid.feature == 2048 and cli.config.fid.num_samples == 50_000


@pytest.mark.parametrize(("overlay", "coupled"), [("immiscible.yaml", True), ("baseline.yaml", False)])
def test_every_logged_reduction_is_positive_when_coupled_and_zero_for_the_baseline(
    tmp_path, overlay, coupled
):
    """Every step's ``immiscible/reduction_pct``, read from the CSV as floats (``"0.0"`` is truthy).

    Batch 16: an exact assignment that re-pairs nothing (identity already optimal) is then
    vanishingly unlikely, so 0 in a coupled run means the coupling did not run.
    """
    reductions = reductions_per_step(cli_main, _cli_args(tmp_path, "quickstart.yaml", overlay), tmp_path)
    assert len(reductions) == 2
    assert all(r > 0 for r in reductions) if coupled else all(r == 0.0 for r in reductions)


def test_overlays_compose_to_one_coupling(tmp_path):
    args = []
    for name in ("quickstart.yaml", "immiscible.yaml", "baseline.yaml"):
        args += ["--config", str(CONFIGS / name)]
    cli = cli_main(args, run=False)
    couplings = _couplings(cli)
    assert len(couplings) == 1 and couplings[0].spec.method == "none"


# --- a tiny end-to-end fit logs FID for one- and two-step samples ---------------------------------------


TINY_FID = [
    "--fid.extractor=example_projects.common.fid.TinyExtractor",
    "--fid.num_samples=8",
    "--fid.batch_size=8",
    "--fid.sampling_steps=[1, 2]",
]


def test_quickstart_cli_fit_logs_fid_for_one_and_two_steps_and_grids(tmp_path):
    args = [
        a for a in _cli_args(tmp_path, "quickstart.yaml", "immiscible.yaml") if "limit_val_batches" not in a
    ]
    cli = cli_main(
        [*args, "--trainer.val_check_interval=2", "--grid.dirpath", str(tmp_path / "grids"), *TINY_FID]
    )
    metrics = cli.trainer.callback_metrics
    for steps in (1, 2):
        name = cm_fid_metric_name(16, 8, steps)
        assert name == f"val/fid16_n8_cm{steps}"
        assert name in metrics and math.isfinite(float(metrics[name]))
        assert (tmp_path / "grids" / f"cm{steps}" / "latest.png").is_file()


def test_tiny_fit_logs_fid_for_one_and_two_steps(tmp_path):
    model = tiny_model()
    fid = ConsistencyFID(num_samples=16, sampling_steps=[1, 2], batch_size=8, extractor=TinyExtractor(12))
    grid = ConsistencyGrid(num_images=4, steps=[1, 2], dirpath=str(tmp_path / "grids"))
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        callbacks=[ImmiscibleCoupling(seed=0), fid, grid],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=TinyData())
    for steps in (1, 2):
        name = cm_fid_metric_name(12, 16, steps)
        assert name in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics[name]))
        assert (tmp_path / "grids" / f"cm{steps}" / "latest.png").is_file()
    assert grid.latest == tmp_path / "grids" / "cm1" / "latest.png"
    assert model.num_levels() == discretisation_steps(4, 8)


class TinyData(L.LightningDataModule):
    """16 synthetic 8x8 images with ``real_images()`` for the FID statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.data = TensorDataset(*synthetic_tensor(16, 1, 8))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    def real_images(self) -> TensorDataset:
        return self.data
