"""The callback's life cycle: arguments checked at construction, fresh state each fit, groups released,
the coupled noise really taken, logs left to the Trainer."""

from __future__ import annotations

import csv
import math
import re
import traceback
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_immiscible.groups as li_groups
from lightning_immiscible import ImmiscibleCoupling
from lightning_immiscible.mixin import hand_off
from tests.helpers import ToyDiffusion, run_ranks, trainer


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"seed": -1}, "seed=-1"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"seed": True}, "seed=True"),
        ({"seed": 2**63}, "seed="),
        ({"max_step_fraction": 0}, "max_step_fraction=0"),
        ({"max_step_fraction": -0.5}, "max_step_fraction=-0.5"),
        ({"max_step_fraction": math.nan}, "max_step_fraction=nan"),
        ({"collective_timeout_s": -1}, "collective_timeout_s=-1"),
        ({"collective_timeout_s": 0}, "collective_timeout_s=0"),
        ({"collective_timeout_s": math.inf}, "collective_timeout_s=inf"),
        ({"prog_bar": "yes"}, "prog_bar='yes'"),
        ({"within_condition": 1}, "within_condition=1"),
        ({"scope": "globl"}, "scope='globl'"),
        ({"scope": 0}, "scope=0"),
        ({"k": 0}, "k must be >= 1"),
        ({"method": "lsaa"}, "method 'lsaa'"),
    ],
)
def test_bad_constructor_arguments_fail_at_construction_naming_the_argument(kwargs, named):
    # Catches an argument accepted at construction and failing mid-fit (seed=-1 raised NumPy's
    # message at the first batch) or silently changed (seed=1.5 truncated), as before issue 32.
    with pytest.raises(ValueError, match=re.escape(named)):
        ImmiscibleCoupling(**kwargs)


def test_good_constructor_arguments_are_kept_as_given():
    cb = ImmiscibleCoupling(seed=2**63 - 1, max_step_fraction=2, collective_timeout_s=0.5, scope=4)
    assert (cb.seed, cb.max_step_fraction, cb.collective_timeout_s, cb.scope) == (2**63 - 1, 2.0, 0.5, 4)


class Probe(Callback):
    """What the coupling callback knows when each fit starts, and its records of each batch."""

    def __init__(self, coupling: ImmiscibleCoupling):
        self.coupling, self.at_start, self.costs = coupling, [], []

    def on_train_start(self, trainer, pl_module):
        self.at_start.append((self.coupling.draws, self.coupling.auto_group_size))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.costs.append(self.coupling.last_result.cost_before)


def _fit_seeded(seed: int, coupling: ImmiscibleCoupling) -> tuple[ToyDiffusion, list[str], Probe]:
    L.seed_everything(seed)
    module, probe = ToyDiffusion(sizes=(24,), batch_size=8), Probe(coupling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[coupling, probe], max_steps=5).fit(module)
    ours = [re.sub(r"\d+(\.\d+)?", "#", str(w.message)) for w in caught]  # times differ per run
    return module, [m for m in ours if "ImmiscibleCoupling" in m], probe


def test_two_fits_with_one_callback_behave_like_two_fresh_callbacks():
    # seed=None resolves from each fit's torch seed; the overhead probe and its warning, scope="auto"'s
    # decision and the draw counter are per fit. Oracle: a fresh callback per fit. Catches state that
    # outlives a fit (issue 32): the first fit's seed reused by the second, the second fit starting
    # at draw 5, the overhead warning or scope="auto"'s probe never run again.
    kwargs = {"scope": "auto", "max_step_fraction": 1e-9}
    reused = ImmiscibleCoupling(**kwargs)
    runs = [_fit_seeded(s, reused) for s in (11, 22)]
    assert reused.resolved_seed == 22 and reused.seed is None  # the constructor's seed is untouched
    for (module, warned, probe), s in zip(runs, (11, 22), strict=True):
        fresh_module, fresh_warned, fresh_probe = _fit_seeded(s, ImmiscibleCoupling(**kwargs))
        for a, b in zip(module.records, fresh_module.records, strict=True):
            assert torch.equal(a["noise"], b["noise"])
        assert warned == fresh_warned and any("max_step_fraction" in w for w in warned)
        assert probe.at_start == fresh_probe.at_start == [(0, None)]
    assert reused.auto_group_size == 1  # decided again in the second fit (a world of one)


class RandnLike(ToyDiffusion):
    """Adds the mixin and the callback but keeps torch.randn_like: the coupling changes nothing."""

    def training_step(self, batch, batch_idx):
        x0 = self.coupled_data(batch)
        noise = torch.randn_like(x0)
        return nn.functional.mse_loss(self.net(0.8 * x0 + 0.6 * noise), noise)


@pytest.mark.parametrize(("module_cls", "taken"), [(RandnLike, 0.0), (ToyDiffusion, 1.0)])
def test_noise_never_taken_is_warned_once_and_logged(tmp_path, module_cls, taken):
    # Catches the silent no-op of issue 35: a module that never calls noise_like still logged a
    # distance reduction, so "it works" was a false signal. The control (noise_like called) must
    # not warn.
    cb = ImmiscibleCoupling(seed=1)
    logger = CSVLogger(tmp_path, name="run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[cb], max_steps=3, logger=logger, log_every_n_steps=1).fit(module_cls(sizes=(24,)))
    notices = [w for w in caught if "never took the coupled noise" in str(w.message)]
    assert len(notices) == (1 if taken == 0.0 else 0)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [float(r["immiscible/noise_taken"]) for r in rows] == [taken] * 3


def test_logged_values_are_fresh_at_every_trainer_logging_step(tmp_path):
    # The callback logs every coupled batch and leaves the frequency to the Trainer. Catches the
    # stale logs of issue 32 (a callback that logged every n-th batch made Lightning write the last
    # value again at each Trainer logging step): every written cost_before must be its own step's.
    cb = ImmiscibleCoupling(seed=1)
    probe = Probe(cb)
    t = trainer(
        callbacks=[cb, probe], max_steps=6, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2
    )
    t.fit(ToyDiffusion(sizes=(48,)))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    written = {int(r["step"]): float(r["immiscible/cost_before"]) for r in rows}
    assert sorted(written) == [1, 3, 5]  # Lightning writes at steps where (step + 1) % 2 == 0
    for step, value in written.items():
        assert value == pytest.approx(probe.costs[step], rel=1e-6)
    assert len(set(written.values())) == 3


def test_the_checkpoint_state_has_a_plain_key_with_the_settings_inside(tmp_path):
    # Catches a state key that encodes settings (Lightning then hands a changed setting nothing and
    # the stream restarts) and state without the settings to compare on load.
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = ImmiscibleCoupling(method="flip", seed=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    trainer(callbacks=[cb, ckpt], max_steps=2, enable_checkpointing=True).fit(ToyDiffusion())
    state = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)["callbacks"]["ImmiscibleCoupling"]
    assert state["settings"]["method"] == "flip" and state["seed"] == 4 and state["draws"] == 2


class CountingGroups:
    """``torch.distributed`` as the groups module sees it, counting group creation and destruction."""

    def __init__(self):
        self.created, self.destroyed = 0, 0

    def __getattr__(self, name):
        target = getattr(dist, name)
        if name not in ("new_group", "destroy_process_group"):
            return target

        def counted(*args, **kwargs):
            if name == "new_group":
                self.created += 1
            else:
                self.destroyed += 1
            return target(*args, **kwargs)

        return counted


def _two_fits_on_rank(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)  # a forked child of a process whose thread pool ran: see test_conditional_ddp
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        counting = CountingGroups()
        li_groups.dist = counting  # this forked process only
        cb, seen = ImmiscibleCoupling(scope="global", collective_timeout_s=30), []
        for seed in (5, 6):
            torch.manual_seed(seed if rank == 0 else 100 + seed)  # the seed comes from rank 0
            module = ToyDiffusion(sizes=(16,), batch_size=8)
            trainer(callbacks=[cb], max_steps=2).fit(module)  # each process: its own one-device Trainer
            seen.append((cb.resolved_seed, counting.created, counting.destroyed))
        queue.put((rank, "ok", seen))
    except Exception as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=2)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_each_fit_builds_its_process_groups_and_releases_them_in_teardown():
    # Two processes in one gloo world, each fitting twice with one callback instance. Each fit must
    # create its timed world group in setup and destroy it in teardown, and resolve its own seed
    # from rank 0. Catches groups never destroyed (no teardown), groups kept from the first fit,
    # and the first fit's seed kept by the second (issue 32).
    results = run_ranks(_two_fits_on_rank, lambda r, port, queue: (r, port, queue))
    for rank in range(2):
        status, seen = results[rank]
        assert status == "ok", seen
        # (resolved seed, groups created so far, destroyed so far) after each fit
        assert seen == [(5, 1, 1), (6, 2, 2)]


def test_a_fit_that_ends_in_an_exception_releases_the_hand_off():
    class Failing(ToyDiffusion):
        def training_step(self, batch, batch_idx):
            self.noise_like(self.coupled_data(batch))
            raise RuntimeError("user bug")

    module = Failing()
    with pytest.raises(RuntimeError, match="user bug"):
        trainer(callbacks=[ImmiscibleCoupling(seed=1)], max_steps=2).fit(module)
    assert module.coupled_batch is None and hand_off(module).worker is None
