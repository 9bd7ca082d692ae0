"""ImmiscibleMixin: finding x0 in batches, the coupled-batch hand-off, noise_like's fallbacks."""

import lightning as L
import pytest
import torch

from lightning_immiscible import CoupledBatch, CouplingInputError, CouplingResult, ImmiscibleMixin
from lightning_immiscible.batches import find_data_tensor
from lightning_immiscible.mixin import hand_off
from lightning_immiscible.workers import BATCH_KEY, NOISE_KEY, STATS_KEY, CouplingCollate


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
    assert module.coupled_batch is None


def _coupled(batch, x0, noise, draw=0):
    result = CouplingResult(noise, torch.arange(noise.shape[0]), 1.0, 0.5)
    return CoupledBatch(batch=batch, x0=x0, result=result, draw=draw)


def test_noise_like_returns_prepared_noise_once_per_batch_only():
    module = Plain()
    x0, prepared = torch.randn(3, 2), torch.randn(3, 2)
    hand_off(module).give(_coupled(x0, x0, prepared))
    assert module.coupled_batch is not None and module.coupled_batch.noise is prepared
    assert torch.equal(module.noise_like(x0), prepared)
    module.eval()  # validation / sampling never get the training batch's noise
    assert not torch.equal(module.noise_like(x0), prepared)
    module.train()
    hand_off(module).release()
    assert module.coupled_batch is None
    assert not torch.equal(module.noise_like(x0), prepared)


def test_noise_like_with_other_shape_warns_and_falls_back():
    module = Plain()
    hand_off(module).give(_coupled(None, torch.zeros(3, 2), torch.randn(3, 2)))
    with pytest.warns(UserWarning, match="returning uncoupled"):
        n = module.noise_like(torch.zeros(4, 2))
    assert n.shape == (4, 2)


def test_coupled_data_reads_the_callbacks_x0_so_an_override_runs_once():
    # Catches: coupled_data recomputing immiscible_data (calls would be 2), or returning the
    # coupled x0 for another batch (the last assertion).
    module = Encoded()
    batch = {"image": torch.ones(2, 3)}
    x0 = module.immiscible_data(batch)  # what the callback does, once
    hand_off(module).give(_coupled(batch, x0, torch.randn(2, 3)))
    assert module.coupled_data(batch) is x0 and module.calls == 1
    rebuilt = {"image": batch["image"]}  # e.g. DDP's input handling: a new dict, the same tensors
    assert module.coupled_data(rebuilt) is x0 and module.calls == 1
    other = {"image": torch.ones(2, 3)}
    assert module.coupled_data(other) is not x0 and module.calls == 2  # another batch: computed afresh


def test_recomputing_an_overridden_immiscible_data_gets_a_one_time_hint():
    module = Encoded()
    batch = {"image": torch.ones(2, 3)}
    noise = torch.randn(2, 3)
    hand_off(module).give(_coupled(batch, module.immiscible_data(batch), noise))
    with pytest.warns(UserWarning, match="coupled_data"):
        again = module.noise_like(module.immiscible_data(batch))  # the old pattern: encodes twice
    assert torch.equal(again, noise) and module.calls == 2


def test_worker_batches_are_unwrapped_in_on_after_batch_transfer():
    # Catches: the inner batch not handed on (training_step would get the dict), or the
    # worker's noise not kept for the callback.
    module = Plain()
    samples = [(x, torch.tensor(i)) for i, x in enumerate(torch.rand(6, 4))]
    wrapped = CouplingCollate("lsa", seed=0)(samples)
    inner = module.on_after_batch_transfer(wrapped, 0)
    assert isinstance(inner, list | tuple) and inner[0] is wrapped[BATCH_KEY][0]
    worker = hand_off(module).worker
    assert worker is not None and worker.batch is inner and worker.noise is wrapped[NOISE_KEY]
    stats = wrapped[STATS_KEY].tolist()
    assert (worker.cost_before, worker.cost_after, worker.assign_ms) == tuple(stats)
    plain = (torch.rand(6, 4),)
    assert module.on_after_batch_transfer(plain, 0) is plain and hand_off(module).worker is None
