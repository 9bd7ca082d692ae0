"""ImmiscibleCoupling in single-process fits: pairing, batch formats, logging, resume, warnings."""

import logging
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.mixin import hand_off
from lightning_immiscible.streams import Stream, draw_noise, draw_pool
from lightning_immiscible.workers import CouplingCollate
from tests.helpers import ResumableLoader, ToyDiffusion, trainer


def _fit(module, callback, **kwargs):
    t = trainer(callbacks=[callback], **kwargs)
    t.fit(module)
    return t


def test_training_step_gets_the_coupled_pool_noise():
    module, cb = ToyDiffusion(), ImmiscibleCoupling(method="lsa", seed=7)
    _fit(module, cb, max_steps=4)
    assert len(module.records) == 4 and cb.draws == 4
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, seed=7, group_index=0, draw_index=draw)
        expected = couple(rec["x0"], pool, method="lsa")
        assert torch.equal(rec["noise"], expected.noise)
    # different draws use different noise
    assert not torch.equal(module.records[0]["noise"], module.records[1]["noise"])


@pytest.mark.parametrize("batch_format", ["tuple", "list", "dict"])
def test_batch_formats_and_logged_metrics(batch_format):
    module, cb = ToyDiffusion(batch_format=batch_format), ImmiscibleCoupling(seed=1)
    t = _fit(module, cb, max_steps=2)
    metrics = t.callback_metrics
    for key in ("cost_before", "cost_after", "reduction_pct", "assign_ms"):
        assert f"immiscible/{key}" in metrics
    assert float(metrics["immiscible/reduction_pct"]) > 0
    assert metrics["immiscible/cost_after"] < metrics["immiscible/cost_before"]


def test_baseline_method_none_keeps_the_drawn_noise_and_logs_zero_reduction():
    module, cb = ToyDiffusion(), ImmiscibleCoupling(method="none", seed=2)
    t = _fit(module, cb, max_steps=1)
    pool = draw_pool(module.records[0]["x0"].shape, 2, 0, 0)
    assert torch.equal(module.records[0]["noise"], pool)
    assert float(t.callback_metrics["immiscible/reduction_pct"]) == 0.0


def test_validation_never_sees_coupled_noise():
    module, cb = ToyDiffusion(), ImmiscibleCoupling(seed=3)
    _fit(module, cb, max_steps=4, limit_val_batches=2, val_check_interval=2)
    assert module.val_noise_was_coupled and not any(module.val_noise_was_coupled)


def test_gradient_accumulation_draws_fresh_noise_per_micro_batch():
    module, cb = ToyDiffusion(sizes=(32,)), ImmiscibleCoupling(seed=4)
    _fit(module, cb, max_steps=2, accumulate_grad_batches=2)
    assert cb.draws == 4
    noises = [r["noise"] for r in module.records]
    assert all(not torch.equal(a, b) for i, a in enumerate(noises) for b in noises[i + 1 :])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    module, cb = ToyDiffusion(), ImmiscibleCoupling(seed=5)
    _fit(module, cb, max_steps=2, precision=precision)
    rec = module.records[0]
    assert rec["noise"].dtype == rec["x0"].dtype == torch.float32
    assert cb.last_result is not None and cb.last_result.reduction_pct > 0


class ResumableToy(ToyDiffusion):
    def train_dataloader(self):
        return ResumableLoader(self._dataset(), batch_size=self.batch_size, shuffle=False)


@pytest.mark.parametrize("stop", [3, 6], ids=["mid_epoch", "epoch_boundary"])
def test_resume_draws_the_same_noise_stream(tmp_path, caplog, stop):
    # 6 batches per epoch; the run is interrupted after `stop` steps and resumed to 9 steps. Every
    # later draw's noise must equal the uninterrupted run's, element-wise, with no condition.
    # Catches: a draw counter or seed not restored (the pools differ), a counter restored off by
    # one, and the seed drawn afresh on resume. The data are equal per step (ResumableLoader),
    # so a coupling that differs can only come from the noise stream.
    first = ResumableToy(sizes=(48,))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    cb = ImmiscibleCoupling(seed=None)  # a random seed, shared and checkpointed
    trainer(callbacks=[cb, ckpt], max_steps=stop, enable_checkpointing=True).fit(first)
    resumed, cb2 = ResumableToy(sizes=(48,)), ImmiscibleCoupling(seed=None)  # the checkpoint's seed wins
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[cb2], max_steps=9).fit(
            resumed, ckpt_path=next(tmp_path.glob(f"*step={stop}*.ckpt"))
        )
    assert cb2.resolved_seed == cb.resolved_seed and cb2.draws == 9
    seeds_logged = re.findall(r"seed=(\d+)", caplog.text)
    assert seeds_logged == [str(cb.resolved_seed)]  # only the restored seed, never a fresh one first
    uninterrupted = ResumableToy(sizes=(48,))
    _fit(uninterrupted, ImmiscibleCoupling(seed=cb.resolved_seed), max_steps=9)
    interrupted = first.records + resumed.records
    assert len(interrupted) == len(uninterrupted.records) == 9
    for a, b in zip(interrupted, uninterrupted.records, strict=True):
        assert torch.equal(a["x0"], b["x0"])
        assert torch.equal(a["noise"], b["noise"])


def test_state_dict_round_trip():
    cb = ImmiscibleCoupling(seed=9)
    other = ImmiscibleCoupling()
    other.load_state_dict({**cb.state_dict(), "draws": 17})
    assert (other.resolved_seed, other.draws, other.seed) == (9, 17, None)  # the constructor's stays


def test_scope_auto_group_size_is_restored_on_resume_in_the_same_world():
    # scope="auto" measured and chose groups of 2: a resume on the same world size must couple in
    # groups of 2 at once, not probe locally again. Catches a load_state_dict that drops
    # auto_group_size (the resumed run would couple alone, with other pools, until it re-decided).
    cb = ImmiscibleCoupling(scope="auto", seed=3)
    again = ImmiscibleCoupling(scope="auto")
    again.load_state_dict({**cb.state_dict(), "auto_group_size": 2, "draws": 12})
    assert again.auto_group_size == 2 and again.effective_scope() == 2


def test_single_item_batches_warn_once_and_keep_noise():
    module, cb = ToyDiffusion(sizes=(3,), batch_size=1), ImmiscibleCoupling(seed=6)
    with pytest.warns(UserWarning, match="batch of 1 item"):
        _fit(module, cb, max_steps=3)
    assert torch.equal(module.records[0]["noise"], draw_pool((1, 12), 6, 0, 0))


def test_overhead_and_large_pool_warnings(monkeypatch):
    monkeypatch.setattr("lightning_immiscible.callback.LARGE_POOL", 8)
    module, cb = ToyDiffusion(sizes=(64,)), ImmiscibleCoupling(seed=7, max_step_fraction=1e-9)
    with pytest.warns(UserWarning) as record:
        _fit(module, cb, max_steps=6)
    messages = " ".join(str(w.message) for w in record)
    assert "about cubic in the pool" in messages
    assert "max_step_fraction=1e-09" in messages


def test_bad_data_raises_clear_error_during_fit():
    class NaNModule(ToyDiffusion):
        def immiscible_data(self, batch):
            x = batch[0].clone()
            x[0, 0] = float("nan")
            return x

    with pytest.raises(ValueError, match="NaN/Inf"):
        _fit(NaNModule(), ImmiscibleCoupling(seed=1), max_steps=1)


def test_module_without_mixin_is_rejected_at_setup():
    class NoMixin(L.LightningModule):
        training_step = ToyDiffusion.training_step
        configure_optimizers = ToyDiffusion.configure_optimizers
        train_dataloader = ToyDiffusion.train_dataloader

    t = trainer(callbacks=[ImmiscibleCoupling()], max_steps=1)
    with pytest.raises(TypeError, match="mixes in ImmiscibleMixin"):
        t.fit(NoMixin())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ot"}, "Unknown method"),
        ({"metric": "cos"}, "Unknown metric"),
        ({"scope": "cluster"}, "Unknown scope"),
        ({"solver": "magic"}, "Unknown solver"),
        ({"k": 0}, "k must be >= 1"),
    ],
)
def test_constructor_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImmiscibleCoupling(**kwargs)


def test_configurable_from_lightning_cli_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_immiscible.ImmiscibleCoupling\n"
        "      init_args: {method: flip, metric: sqeuclidean, scope: 2, seed: 11, max_step_fraction: 0.5}\n"
    )
    cli = LightningCLI(ToyDiffusion, run=False, args=["--config", str(config), "--trainer.logger=false"])
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, ImmiscibleCoupling)]
    assert len(cbs) == 1
    cb = cbs[0]
    assert (cb.spec.method, cb.spec.metric, cb.scope, cb.seed, cb.max_step_fraction) == (
        "flip",
        "sqeuclidean",
        2,
        11,
        0.5,
    )


def test_worker_coupled_noise_is_used_and_the_batch_unwrapped():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_immiscible.workers import CouplingCollate

    class WorkerFed(ToyDiffusion):
        def train_dataloader(self):
            data = TensorDataset(torch.rand(32, 12) * 2 - 1, torch.arange(32))
            return DataLoader(data, batch_size=8, num_workers=1, collate_fn=CouplingCollate("lsa", seed=3))

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, list | tuple) and len(batch) == 2  # the inner batch, unwrapped
            self.assigned_ms.append(self.trainer.callbacks[0].last_result.assign_ms)
            return super().training_step(batch, batch_idx)

    module, cb = WorkerFed(), ImmiscibleCoupling(seed=1)
    module.assigned_ms = []
    t = _fit(module, cb, max_steps=3)
    assert module.assigned_ms == [0.0, 0.0, 0.0]  # nothing on the training step's critical path
    assert float(t.callback_metrics["immiscible/worker_assign_ms"]) > 0
    for rec in module.records:  # the worker's noise is a coupling of this very x0
        res = couple(rec["x0"], rec["noise"])
        assert torch.equal(res.index, torch.arange(8))  # already optimal: lsa keeps it
    assert float(t.callback_metrics["immiscible/reduction_pct"]) > 0


def test_the_hand_off_is_the_coupled_batch_and_is_released_after_each_batch():
    # Catches: a hand-off that outlives its batch (validation or the next batch would see it), one
    # whose x0 is not what immiscible_data returned, and a draw counter that is not the stream's.
    class Inspecting(ToyDiffusion):
        def training_step(self, batch, batch_idx):
            coupled = self.coupled_batch
            assert coupled is not None and coupled.batch is batch and coupled.x0 is batch[0]
            self.seen.append((coupled.draw, coupled.noise.clone(), coupled.result.index.clone()))
            return super().training_step(batch, batch_idx)

    module, cb = Inspecting(), ImmiscibleCoupling(seed=8)
    module.seen = []
    _fit(module, cb, max_steps=3, limit_val_batches=1, val_check_interval=2)
    assert [draw for draw, _, _ in module.seen] == [0, 1, 2]
    for (draw, noise, index), rec in zip(module.seen, module.records, strict=True):
        pool = draw_pool(rec["x0"].shape, 8, 0, draw)
        assert torch.equal(noise, rec["noise"]) and torch.equal(noise, pool[index])
    assert module.coupled_batch is None and hand_off(module).worker is None
    assert module.val_noise_was_coupled == [False]


def test_the_hand_off_is_released_when_the_training_step_fails():
    class Failing(ToyDiffusion):
        def training_step(self, batch, batch_idx):
            assert self.coupled_batch is not None
            raise RuntimeError("boom")

    module = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, ImmiscibleCoupling(seed=1), max_steps=1)
    assert module.coupled_batch is None  # released in on_exception, not left for a later fit


def test_world_size_above_one_without_a_process_group_is_a_clear_error():
    # Catches: every rank silently drawing the same pool (group 0 on each) when the strategy has
    # no torch.distributed process group.
    from types import SimpleNamespace

    fake = SimpleNamespace(world_size=2, num_devices=2, global_rank=0, strategy=None)
    with pytest.raises(RuntimeError, match=r"runs 2 processes but torch\.distributed has no initialised"):
        ImmiscibleCoupling(seed=0).setup(fake, ToyDiffusion(), "fit")


def test_an_on_after_batch_transfer_override_without_super_names_the_fix():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_immiscible.workers import CouplingCollate

    class NoSuper(ToyDiffusion):
        def train_dataloader(self):
            data = TensorDataset(torch.rand(16, 12) * 2 - 1)
            return DataLoader(data, batch_size=8, collate_fn=CouplingCollate("lsa", seed=3))

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch  # forgets super(): the worker batch stays wrapped

    with pytest.raises(RuntimeError, match=r"must return\s+super\(\)\.on_after_batch_transfer"):
        _fit(NoSuper(), ImmiscibleCoupling(seed=1), max_steps=1)


def test_auto_solver_choice_is_logged_once_per_pool_shape(caplog):
    # On 12-value items the rule's choice is used without a race and named once, not per batch.
    # Catches: no log, a log per batch, or a logged name that is not the rule's.
    from lightning_immiscible.solvers import choose_exact_solver

    module, cb = ToyDiffusion(sizes=(32,), batch_size=8), ImmiscibleCoupling(seed=3)
    with caplog.at_level("INFO"):
        _fit(module, cb, max_steps=3)
    notes = [r.getMessage() for r in caplog.records if "solver='auto' uses" in r.getMessage()]
    assert notes == [
        f"ImmiscibleCoupling: solver='auto' uses {choose_exact_solver(8, 12)!r} for pools of 8 items of "
        "12 values (no race: the fastest measured for D <= 64)."
    ]


class NormRecorder(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["immiscible/noise_norm2"]))


@pytest.mark.parametrize("method", ["lsa", "knn"])
def test_noise_norm2_shows_knn_tilt_and_keeps_gaussian_scale_for_lsa(method):
    # lsa permutes i.i.d. N(0, 1) noise: the mean of N squared entries is 1 with standard error
    # sqrt(2 / N) (N = 10 steps x 16 items x 64 dims = 10,240). knn with k=8 keeps the nearest of
    # 8 candidates, mostly the shorter ones (0.82 measured at 64 dims). Catches a missing or wrongly
    # normalised diagnostic (e.g. per item instead of per dimension), and noise that is not
    # the coupled batch's.
    module, cb, rec = (
        ToyDiffusion(sizes=(160,), batch_size=16, dim=64),
        ImmiscibleCoupling(method, k=8, seed=3),
        NormRecorder(),
    )
    trainer(callbacks=[cb, rec], max_steps=10).fit(module)
    measured = sum(rec.values) / len(rec.values)
    expected = float(torch.cat([r["noise"] for r in module.records]).square().mean())
    assert measured == pytest.approx(expected, rel=1e-5)
    stderr = (2 / (10 * 16 * 64)) ** 0.5
    if method == "lsa":
        assert abs(measured - 1) < 4 * stderr
    else:
        assert measured < 1 - 8 * stderr  # measured 0.82


class ResumableWorkerToy(ToyDiffusion):
    def __init__(self, num_workers: int, **kwargs):
        super().__init__(**kwargs)
        self.num_workers = num_workers

    def train_dataloader(self):
        collate = CouplingCollate("lsa", seed=11)
        return ResumableLoader(
            self._dataset(), batch_size=8, num_workers=self.num_workers, collate_fn=collate
        )


@pytest.mark.parametrize(
    ("stop", "num_workers"),
    [(3, 0), (9, 0), (6, 2)],
    ids=["mid_epoch", "mid_later_epoch", "epoch_boundary_workers"],
)
def test_worker_coupled_resume_draws_the_same_noise(tmp_path, stop, num_workers):
    # Worker path: 6 batches per epoch, interrupted after `stop` steps, resumed to 12 (after a
    # resume into epoch 1 the callback re-couples the stale first iterator's batches). Every later
    # batch's noise must equal the uninterrupted run's element-wise. Catches a stream that depends
    # on process-local state (a batch counter or worker seeds that restart with the new process):
    # the resumed run would repeat the first batches' noise.
    first = ResumableWorkerToy(num_workers, sizes=(48,))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    trainer(callbacks=[ImmiscibleCoupling(seed=1), ckpt], max_steps=stop, enable_checkpointing=True).fit(
        first
    )
    resumed = ResumableWorkerToy(num_workers, sizes=(48,))
    path = next(tmp_path.glob(f"*step={stop}*.ckpt"))
    trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=12).fit(resumed, ckpt_path=path)
    uninterrupted = ResumableWorkerToy(num_workers, sizes=(48,))
    _fit(uninterrupted, ImmiscibleCoupling(seed=1), max_steps=12)
    interrupted = first.records + resumed.records
    assert len(interrupted) == len(uninterrupted.records) == 12
    for a, b in zip(interrupted, uninterrupted.records, strict=True):
        assert torch.equal(a["x0"], b["x0"])
        assert torch.equal(a["noise"], b["noise"])
    assert not torch.equal(uninterrupted.records[0]["noise"], uninterrupted.records[6]["noise"])


def test_seed_none_follows_seed_everything():
    # With seed=None the stream comes from the run's torch seed: seed_everything(s) reproduces the
    # coupled noise, and another s changes it. Catches a seed drawn from fresh entropy (two runs with
    # the same seed_everything then differ) and a seed ignoring the run seed (s=1 equals s=0).
    noises = []
    for s in (0, 0, 1):
        L.seed_everything(s)
        module, cb = ToyDiffusion(), ImmiscibleCoupling()
        _fit(module, cb, max_steps=2)
        assert cb.resolved_seed == s and cb.seed is None
        noises.append(torch.cat([r["noise"] for r in module.records]))
    assert torch.equal(noises[0], noises[1])
    assert not torch.equal(noises[0], noises[2])


class WrappedCollateToy(ToyDiffusion):
    """Its CouplingCollate is wrapped in another callable: the callback cannot find it (defect 5)."""

    def train_dataloader(self):
        collate = CouplingCollate("lsa", seed=11)
        return torch.utils.data.DataLoader(self._dataset(), batch_size=8, collate_fn=lambda s: collate(s))


def test_stale_worker_noise_of_an_unidentifiable_collate_is_coupled_again_not_reused():
    # A wrapped collate never hears set_epoch, so epoch 1's batches carry noise drawn for epoch 0's
    # positions (the same noise as epoch 0, batch by batch). The callback must not use it: it couples
    # those batches on the training process with its own stream (Stream.FALLBACK at this rank and
    # draw) and warns how to fix the setup. Catches stale noise used silently (before issue 25:
    # epoch 1 repeated epoch 0's noise exactly, since only exactly one found collate was re-run).
    module, cb = WrappedCollateToy(sizes=(32,)), ImmiscibleCoupling(seed=1)
    with pytest.warns(UserWarning, match=r"0 CouplingCollate\(s\) as its collate_fn .* single training"):
        _fit(module, cb, max_epochs=2)
    epoch0, epoch1 = module.records[:4], module.records[4:]
    assert len(epoch1) == 4
    for i, (a, b) in enumerate(zip(epoch0, epoch1, strict=True)):
        assert torch.equal(a["x0"], b["x0"]) and not torch.equal(a["noise"], b["noise"])
        pool = draw_noise(b["x0"].shape, 1, Stream.FALLBACK, 0, 4 + i)  # rank 0, draw 4 + i
        assert torch.equal(b["noise"], couple(b["x0"], pool).noise)
    for a in epoch0:  # epoch 0's positions match: the worker's noise is used as it is
        assert torch.equal(couple(a["x0"], a["noise"]).index, torch.arange(8))


def test_a_resume_with_another_collate_seed_is_named():
    # CouplingCollate(seed=None) takes torch.initial_seed() at construction, which the checkpoint does
    # not hold: the callback records the collates' seeds and names a change on resume. Catches a
    # silently different worker stream after a resume.
    cb = ImmiscibleCoupling(seed=1)
    cb.load_state_dict({**cb.state_dict(), "worker_seeds": [5]})

    class Found:
        train_dataloader = torch.utils.data.DataLoader([0], collate_fn=CouplingCollate(seed=6))
        current_epoch = 0

    with pytest.warns(UserWarning, match=r"seed\(s\) \[6\] differ from the checkpoint's \[5\]"):
        cb.workers.start_epoch(Found())
    assert cb.state_dict()["worker_seeds"] == [6]


@pytest.mark.parametrize(
    ("before", "after"),
    [({"method": "lsa"}, {"method": "flip"}), ({"scope": "global"}, {"scope": "local"})],
    ids=["method", "scope"],
)
def test_a_resume_with_another_method_or_scope_continues_the_stream_and_says_so(tmp_path, before, after):
    # method and scope are part of the callback's state_key, so Lightning does not hand the saved
    # state to a callback with another setting (it only prints its generic "add the following
    # callbacks" warning). The callback must find it, continue the stream at the saved draw with the
    # saved seed, and name the change. Catches a silent restart of the stream (draws 0-2 repeated:
    # defect 6 of issue 25).
    first = ResumableToy(sizes=(48,))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(
        callbacks=[ImmiscibleCoupling(seed=7, **before), ckpt], max_steps=3, enable_checkpointing=True
    ).fit(first)
    resumed, cb = ResumableToy(sizes=(48,)), ImmiscibleCoupling(seed=99, **after)
    ((name, value),) = after.items()
    with pytest.warns(UserWarning, match=rf"{name}=.* -> {value!r}.* continues from it \(seed 7, draw 3"):
        trainer(callbacks=[cb], max_steps=6).fit(resumed, ckpt_path=next(tmp_path.glob("*step=3*.ckpt")))
    assert cb.resolved_seed == 7 and cb.draws == 6
    for draw, rec in zip((3, 4, 5), resumed.records, strict=True):
        pool = draw_pool(rec["x0"].shape, 7, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool, method=cb.spec.method).noise)


def test_the_hand_off_is_released_when_the_module_skips_the_rest_of_the_epoch():
    # The module's on_train_batch_start returns -1 at batch 1: Lightning skips the rest of the epoch
    # without on_train_batch_end, after the callback coupled batch 1. The hand-off must be gone by
    # the epoch's end. Catches a hand-off released only in on_train_batch_end (defect 7 of issue 25:
    # it stayed set through the epoch end and later sampling).
    class Skipping(ToyDiffusion):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 1 else None

        def on_train_epoch_end(self):
            self.ready_at_epoch_end.append(self.coupled_batch is not None)

    module = Skipping(sizes=(32,))
    module.ready_at_epoch_end = []
    _fit(module, ImmiscibleCoupling(seed=1), max_epochs=2)
    assert module.ready_at_epoch_end == [False, False] and len(module.records) == 2
    assert module.coupled_batch is None


def test_manual_optimization_gets_the_coupled_noise_and_releases_it():
    # Manual optimization: training_step steps the optimizer itself. The noise must be the exact
    # pool coupling per batch (the oracle: couple() on the same pool) and the hand-off released.
    class Manual(ToyDiffusion):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            self.ready.append(self.coupled_batch is not None)

    module = Manual(sizes=(32,))
    module.ready = []
    _fit(module, ImmiscibleCoupling(seed=4), max_steps=3)
    assert module.ready == [True] * 3 and module.coupled_batch is None and len(module.records) == 3
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, 4, group_index=0, draw_index=draw)
        assert torch.equal(rec["noise"], couple(rec["x0"], pool).noise)


def test_noise_like_of_a_transformed_x0_raises_instead_of_mispairing():
    # training_step rescales the batch after reading it: the noise was paired with batch[0], not with
    # batch[0] * 2 - 1. Catches the coupled noise handed out for the transformed tensor (a silently
    # wrong pairing: defect 7 of issue 25). A mere cast (x0.double()) stays allowed.
    class Rescaling(ToyDiffusion):
        def training_step(self, batch, batch_idx):
            assert torch.equal(self.noise_like(batch[0].double()).double(), self.coupled_batch.noise.double())
            self.noise_like(batch[0] * 2 - 1)

    with pytest.raises(ValueError, match=r"other values .* immiscible_data override"):
        _fit(Rescaling(), ImmiscibleCoupling(seed=1), max_steps=1)


class HugeData(ToyDiffusion):
    """Items of magnitude 1e20 (float32 or float64): squared distances overflow float32."""

    def __init__(self, data_dtype: torch.dtype):
        super().__init__()
        self.data_dtype = data_dtype
        self.scale = torch.nn.Parameter(torch.ones(()))

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = (torch.rand(32, 12, generator=gen, dtype=torch.float64) * 2 - 1) * 1e20
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.to(self.data_dtype)), batch_size=8
        )

    def training_step(self, batch, batch_idx):
        x0 = self.immiscible_data(batch)
        noise = self.noise_like(x0)
        self.records.append({"x0": x0.detach().clone(), "noise": noise.detach().clone()})
        return (self.scale * noise.float()).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_huge_data_is_coupled_with_float64_costs_through_the_callback(dtype):
    # |x| ~ 1e20: float32 squared distances overflow to inf. The callback's group path must pick
    # float64 costs and return a permutation of the pool (each pool row used once). Catches float32
    # costs forced in couple_in_group (SciPy then fails with a raw "infeasible" error: mutation 10
    # of issue 25).
    module = HugeData(dtype)
    _fit(module, ImmiscibleCoupling(seed=2), max_steps=3)
    assert len(module.records) == 3
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, 2, group_index=0, draw_index=draw).to(dtype)
        match = (rec["noise"][:, None, :] == pool[None, :, :]).all(-1)  # (B, B): noise i is pool row j
        assert rec["noise"].dtype == dtype and bool((match.sum(1) == 1).all() and (match.sum(0) == 1).all())


def test_the_coupling_runs_in_full_precision_inside_an_autocast_region():
    # Lightning's precision plugins autocast only the training step, so the mixed-precision fits above
    # never run the coupling under autocast; a fit inside the user's own autocast region does. The
    # noise must be the fp32 coupling (the oracle: couple() outside autocast on the same pool).
    # Catches the full-precision guard removed (bf16 costs pair differently on some batch).
    module, cb = (
        ToyDiffusion(sizes=(256,), batch_size=64, dim=100),
        ImmiscibleCoupling(seed=6, precision="fp32"),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _fit(module, cb, max_steps=4)
    assert len(module.records) == 4
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, 6, group_index=0, draw_index=draw)
        assert torch.equal(
            rec["noise"], couple(rec["x0"].float(), pool, precision="fp32").noise.to(rec["noise"])
        )
