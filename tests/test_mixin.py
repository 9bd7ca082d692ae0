"""ImmiscibleMixin: finding x0 in batches, noise_like's fallbacks, once-per-batch data."""

import lightning as L
import pytest
import torch

from lightning_immiscible import CouplingInputError, ImmiscibleMixin, find_data_tensor


class Plain(ImmiscibleMixin, L.LightningModule):
    pass


class Encoded(ImmiscibleMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def immiscible_data(self, batch):
        self.calls += 1
        return batch["image"] * 2


def test_find_data_tensor_in_common_batch_layouts():
    x = torch.randn(4, 3)
    labels = torch.arange(4)
    assert find_data_tensor(x) is x
    assert find_data_tensor((x, labels)) is x
    assert find_data_tensor([labels, x]) is x
    assert find_data_tensor({"label": labels, "image": x}) is x
    other = torch.randn(4, 2)
    assert find_data_tensor({"mask": other, "pixel_values": x}) is x  # known keys win
    assert find_data_tensor({"nested": [labels, {"z": x}]}) is x


@pytest.mark.parametrize(
    "batch", [torch.arange(4), (torch.arange(4), "text"), {"ids": torch.arange(3)}, None]
)
def test_batch_without_float_tensor_says_how_to_override(batch):
    with pytest.raises(CouplingInputError, match="Override `immiscible_data"):
        find_data_tensor(batch)


def test_noise_like_without_callback_is_randn_like():
    module = Plain()
    x0 = torch.zeros(5, 2, dtype=torch.float64)
    n = module.noise_like(x0)
    assert n.shape == x0.shape and n.dtype == torch.float64 and n.std() > 0
    assert not module.immiscible_noise_ready


def test_noise_like_returns_prepared_noise_once_per_batch_only():
    module = Plain()
    x0, prepared = torch.randn(3, 2), torch.randn(3, 2)
    module._immiscible_set(batch=x0, x0=x0, noise=prepared)
    assert torch.equal(module.noise_like(x0), prepared)
    module.eval()  # validation / sampling never get the training batch's noise
    assert not torch.equal(module.noise_like(x0), prepared)
    module.train()
    module._immiscible_clear()
    assert not torch.equal(module.noise_like(x0), prepared)


def test_noise_like_with_other_shape_warns_and_falls_back():
    module = Plain()
    module._immiscible_set(batch=None, x0=torch.zeros(3, 2), noise=torch.randn(3, 2))
    with pytest.warns(UserWarning, match="returning uncoupled"):
        n = module.noise_like(torch.zeros(4, 2))
    assert n.shape == (4, 2)


def test_overridden_immiscible_data_runs_once_for_the_prepared_batch():
    module = Encoded()
    batch = {"image": torch.ones(2, 3)}
    x0 = module.immiscible_data(batch)  # what the callback does
    module._immiscible_set(batch, x0, torch.randn(2, 3))
    again = module.immiscible_data(batch)  # what training_step does
    assert again is x0 and module.calls == 1
    module.immiscible_data({"image": torch.ones(2, 3)})  # another batch: computed afresh
    assert module.calls == 2
