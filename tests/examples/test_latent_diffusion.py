"""Tests of the latent diffusion example: configs, coupling on latents, labels, encoder calls, CFG, FID."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from example_projects.common.data import ImageDataModule
from example_projects.common.fid import FIDCallback, fid_metric_name
from example_projects.common.tiny_net import TinyConvNet
from example_projects.common.unet import UNet
from example_projects.latent_diffusion import ClassGrid, DiffusersCodec, LatentDiffusion, cli_main, guided_eps
from example_projects.latent_diffusion.codecs import STAGE1_COMMAND, load_codec
from lightning_immiscible import ImmiscibleCoupling, PooledDataLoader
from lightning_immiscible.workers import find_collates
from tests.examples.support import reductions_per_step

CONFIGS = Path(__file__).resolve().parents[2] / "example_projects" / "latent_diffusion" / "configs"
FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_train_batches=2",
    "--trainer.logger=false",
    "--data.batch_size=8",
    "--data.val_size=8",
]


@pytest.fixture(scope="module", autouse=True)
def _no_pytest_argv() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["cli"])  # LightningCLI warns when it sees pytest's own argv
        yield


def _cfg(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stage 1 through its quickstart config: 2 steps, one validation batch (sets the scaling factor)."""
    tmp = tmp_path_factory.mktemp("stage1")
    cli_main(
        [
            "fit",
            *_cfg("autoencoder_quickstart"),
            *FAST,
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp}",
            f"--checkpoint.dirpath={tmp}",
        ]
    )
    path = tmp / "last.ckpt"
    assert path.is_file()
    return str(path)


def _stage2_args(tmp: Path, ae: str, *configs: str) -> list[str]:
    return [
        "fit",
        *_cfg(*configs),
        *FAST,
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp}",
        f"--checkpoint.dirpath={tmp}",
        f"--model.init_args.autoencoder_path={ae}",
    ]


@pytest.fixture(scope="module")
def stage2_ckpt(ae_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("stage2")
    cli = cli_main(_stage2_args(tmp, ae_ckpt, "quickstart", "immiscible"))
    assert cli.trainer.global_step == 2
    assert cli.model.sample_shape() == (4, 8, 8)
    return str(tmp / "last.ckpt")


def _tiny_model(ae: str, **kwargs: Any) -> LatentDiffusion:
    """Stage 2 on the stage-1 latents (4 x 8 x 8) with a small UNet (conditional when num_classes is set)."""
    net = UNet(4, 16, (1, 2), 1, image_size=8, num_classes=kwargs.get("num_classes"))
    return LatentDiffusion(net, **(dict(autoencoder_path=ae) | kwargs))


def test_stage1_checkpoint_has_scaling_factor(ae_ckpt: str) -> None:
    codec = load_codec("ours", ae_ckpt, 1, 32)
    assert codec.scaling_factor > 0 and math.isfinite(codec.scaling_factor)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    z = codec.encode(images)
    torch.testing.assert_close(z, codec.autoencoder.encode(images) * codec.scaling_factor)
    assert codec.decode(z).shape == images.shape


@pytest.mark.parametrize(
    "configs",
    [
        ("quickstart", "baseline"),
        ("quickstart", "class_conditional", "immiscible"),
        ("quickstart", "class_conditional", "cross_class"),
    ],
    ids=str,
)
def test_stage2_configs_run(configs: tuple[str, ...], ae_ckpt: str, tmp_path: Path) -> None:
    cli = cli_main(_stage2_args(tmp_path, ae_ckpt, *configs))
    assert cli.trainer.global_step == 2
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ImmiscibleCoupling)]
    assert [cb.spec.method for cb in callbacks] == ["none" if "baseline" in configs else "lsa"]
    assert cli.model.hparams.num_classes == (10 if "class_conditional" in configs else None)
    # Catches: the conditional example coupling across classes by default (or the overlay not).
    assert callbacks[0].spec.within_condition == ("cross_class" not in configs)
    conditional = "class_conditional" in configs
    assert (callbacks[0].last_result.prior_skew is not None) == conditional  # labels reached the coupling


@pytest.mark.parametrize(("overlay", "coupled"), [("immiscible", True), ("baseline", False)])
def test_every_logged_reduction_is_positive_when_coupled_and_zero_for_the_baseline(
    overlay: str, coupled: bool, ae_ckpt: str, tmp_path: Path
) -> None:
    """Every step's ``immiscible/reduction_pct`` on latents, read from the CSV as floats (batch 16)."""
    reductions = reductions_per_step(
        cli_main, _stage2_args(tmp_path, ae_ckpt, "quickstart", overlay), tmp_path
    )
    assert len(reductions) == 2
    assert all(r > 0 for r in reductions) if coupled else all(r == 0.0 for r in reductions)


def test_pooled_workers_config_couples_pools_of_latents_in_the_loader(ae_ckpt: str, tmp_path: Path) -> None:
    """``pooled_workers.yaml``: a PooledDataLoader whose collate encodes and couples pools of 4 batches.

    Catches an overlay that does not reach the loader (image batches, coupling on the training
    process) and a model that encodes the workers' latents again (a channel mismatch).
    """
    args = _stage2_args(tmp_path, ae_ckpt, "quickstart", "class_conditional", "pooled_workers")
    cli = cli_main([*args, "--data.num_workers=0"])
    loader = cli.trainer.train_dataloader
    assert isinstance(loader, PooledDataLoader) and loader.batch_sampler.batch_size == 8
    (collate,) = find_collates(loader)
    assert collate.pool_batches == 4 and collate.condition_fn is not None
    assert cli.trainer.global_step == 2 and cli.model.hparams.encoded_batches
    (coupling,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ImmiscibleCoupling)]
    assert coupling.last_result.method == "worker" and coupling.last_result.noise.shape == (8, 4, 8, 8)


def test_another_network_class_from_the_config_builds_and_fits(ae_ckpt: str, tmp_path: Path) -> None:
    """Swapping the latent network is a config edit: the shipped ``tiny_network.yaml``, 2 steps."""
    cli = cli_main(_stage2_args(tmp_path, ae_ckpt, "quickstart", "tiny_network", "immiscible"))
    assert cli.trainer.global_step == 2 and type(cli.model.net) is TinyConvNet
    assert not any(isinstance(m, UNet) for m in cli.model.modules())


def test_labels_without_a_class_embedding_fail_at_construction(ae_ckpt: str) -> None:
    """Catches a class-conditional config whose network ignores labels (it would train unconditional)."""
    unconditional_unet = UNet(4, 16, (1, 2), 1, image_size=8)
    with pytest.raises(ValueError, match=r"net\.init_args\.num_classes: 10"):
        LatentDiffusion(unconditional_unet, autoencoder_path=ae_ckpt, num_classes=10)


def test_finetune_config_starts_from_checkpoint(stage2_ckpt: str, ae_ckpt: str, tmp_path: Path) -> None:
    args = [
        *_stage2_args(tmp_path, ae_ckpt, "quickstart", "finetune", "immiscible"),
        f"--model.init_args.init_checkpoint={stage2_ckpt}",
    ]
    cli = cli_main(args[1:], run=False)  # without the "fit" subcommand
    saved = torch.load(stage2_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    assert cli.model.hparams.lr == 1e-4
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_missing_autoencoder_names_path_and_stage1_command(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError) as err:
        load_codec("ours", missing, 1, 32)
    assert missing in str(err.value) and STAGE1_COMMAND in str(err.value)


def test_diffusers_missing_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails even where it is installed
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_codec("diffusers", "stabilityai/sd-vae-ft-mse", 1, 32)


class _FakeVAE(nn.Module):
    """Stands in for diffusers' ``AutoencoderKL``: encode halves, decode doubles, SD's scaling factor."""

    class config:  # mirrors diffusers' attribute name
        scaling_factor = 0.18215

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def encode(self, x: Tensor) -> Any:
        mean = F.avg_pool2d(x, 8) * 0.5 * self.weight
        return type("Out", (), {"latent_dist": type("Dist", (), {"mode": lambda _: mean})()})()

    def decode(self, z: Tensor) -> Any:
        return type("Out", (), {"sample": F.interpolate(z * 2, scale_factor=8)})()


def test_diffusers_codec_applies_and_undoes_scaling() -> None:
    codec = DiffusersCodec(_FakeVAE(), in_channels=1, image_size=32)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    z = codec.encode(images)
    assert codec.scaling_factor == 0.18215 and codec.latent_shape() == (3, 4, 4)
    torch.testing.assert_close(z, F.avg_pool2d(images.expand(-1, 3, -1, -1), 8) * 0.5 * 0.18215)
    back = codec.decode(z)
    assert back.shape == (2, 1, 32, 32)
    torch.testing.assert_close(back, F.interpolate(F.avg_pool2d(images, 8), scale_factor=8))


class _Oracle(nn.Module):
    """Predicts the exact noise of ``x_t`` from the true latents: loss 0 iff x_t and target share noise."""

    def __init__(self, z0: Tensor, abar: Tensor) -> None:
        super().__init__()
        self.z0, self.abar = z0, abar

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.z0) / (1 - a).sqrt()


def test_training_step_uses_the_same_noise_for_x_t_and_target(
    ae_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_model(ae_ckpt, num_classes=10, cond_drop_prob=0.0)
    batch = (torch.rand(4, 1, 32, 32) * 2 - 1, torch.arange(4))
    model.net = _Oracle(model.codec.encode(batch[0]), model.alphas_cumprod)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    assert float(model.training_step(batch, 0)) < 1e-8
    # A wrong pairing (the target's noise differs from x_t's) must show up in the loss.
    z0 = model.codec.encode(batch[0])
    noise, t = torch.randn_like(z0), torch.full((4,), 500)
    bad = F.mse_loss(
        model.net(model.alphas_cumprod[500].sqrt() * z0 + (1 - model.alphas_cumprod[500]).sqrt() * noise, t),
        noise.roll(1, 0),
    )
    assert float(bad) > 0.1


class _Recorder(L.Callback):
    """Records each training batch's labels and the coupled noise the callback prepared."""

    def __init__(self) -> None:
        self.labels: list[Tensor] = []
        self.coupling: list[tuple[Tensor, Tensor, Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.labels.append(batch[1].clone())
        coupled = pl_module.coupled_batch
        assert coupled is not None and coupled.batch is batch
        self.coupling.append((coupled.x0, coupled.noise, batch[0]))


def test_coupling_on_latents_labels_kept_encoder_once(ae_ckpt: str, tmp_path: Path) -> None:
    model = _tiny_model(ae_ckpt, num_classes=10, cond_drop_prob=0.0)
    encoder_calls, seen_labels, encoded = [0], [], []
    model.codec.autoencoder.encoder.register_forward_hook(
        lambda *_: encoder_calls.__setitem__(0, encoder_calls[0] + 1)
    )
    original_encode, net_forward = model.codec.encode, model.net.forward
    model.codec.encode = lambda x: encoded.append(original_encode(x)) or encoded[-1]  # type: ignore[method-assign]
    model.net.forward = lambda x, t, y=None: seen_labels.append(y) or net_forward(x, t, y)  # type: ignore[method-assign]
    coupling, recorder = ImmiscibleCoupling(method="lsa", seed=0), _Recorder()
    dm = ImageDataModule("mnist5k", batch_size=16, val_size=16)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[coupling, recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert encoder_calls[0] == 3 == len(encoded)  # once per training batch, although asked twice
    assert coupling.last_result is not None and tuple(coupling.last_result.noise.shape) == (16, 4, 8, 8)
    for x0, noise, pixels in recorder.coupling:
        assert any(x0 is e for e in encoded)  # the coupling's x0 is the encoder output ...
        assert x0.shape == noise.shape == (16, 4, 8, 8) != pixels.shape  # ... latents, not pixels
    assert not torch.equal(coupling.last_result.index, torch.arange(16))  # noise really was re-paired
    train_labels = [y for y in seen_labels if y is not None and y.shape == (16,)]
    assert len(train_labels) == 3
    for got, batch_labels in zip(train_labels, recorder.labels, strict=True):
        assert torch.equal(got, batch_labels)  # labels stay with their images


def test_guidance_scale_one_is_the_conditional_model(ae_ckpt: str) -> None:
    net = _tiny_model(ae_ckpt, num_classes=10).net.eval()
    for p in net.parameters():  # non-zero head, so conditional and unconditional differ
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, t, y = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.tensor([1, 200, 500, 999]),
        torch.tensor([0, 3, 7, 9]),
    )
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 10))
    assert not torch.allclose(cond, uncond)
    assert torch.equal(guided_eps(net, x, t, y, 1.0, 10), cond)
    assert torch.equal(guided_eps(net, x, t, y, 0.0, 10), uncond)
    torch.testing.assert_close(guided_eps(net, x, t, y, 3.0, 10), uncond + 3.0 * (cond - uncond))


def test_sampling_shapes_range_determinism(ae_ckpt: str) -> None:
    model = _tiny_model(ae_ckpt, num_classes=10, guidance_scale=2.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, *model.sample_shape(), generator=g)
    a, b = model.sample(noise, steps=3), model.sample(noise.clone(), steps=3)
    assert a.shape == (6, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, model.sample(torch.randn(noise.shape, generator=g), steps=3))
    latents = model.sample_latents(noise, 3, labels=torch.arange(6) % 10, guidance_scale=2.0)
    assert latents.shape == noise.shape
    torch.testing.assert_close(model.codec.decode(latents), a)  # default labels: balanced 0..K-1


class _TinyExtractor(nn.Module):
    """Frozen 4-feature stand-in for Inception: ``(N, 3, H, W)`` uint8 -> ``(N, 4)``."""

    num_features = 4

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x[:, :1].float() / 255, 2).flatten(1)


def test_tiny_fit_logs_fid_and_per_class_grid(ae_ckpt: str, tmp_path: Path) -> None:
    model = _tiny_model(ae_ckpt, num_classes=10, guidance_scale=2.0)
    fid = FIDCallback(num_samples=10, sampling_steps=[2], batch_size=10, extractor=_TinyExtractor())
    grid = ClassGrid(per_class=2, steps=2, dirpath=str(tmp_path / "grids"))
    trainer = L.Trainer(
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[ImmiscibleCoupling(seed=0), fid, grid],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=ImageDataModule("mnist5k", batch_size=8, val_size=8))
    name = fid_metric_name(4, 10, 2)
    assert name in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics[name]))
    assert grid.latest is not None and grid.latest.is_file()


def test_stage2_cli_without_stage1_names_the_path_and_command(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(Exception) as err:
        cli_main(_stage2_args(tmp_path, missing, "quickstart", "immiscible"))
    assert missing in str(err.value) and STAGE1_COMMAND in str(err.value)
