"""Flow-matching example: objective, samplers, the noise pairing, the OT plan, the 2-D control, CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from example_projects.flow_matching import FlowMatching, cli_main
from example_projects.flow_matching.callbacks import FlowMatchingFID
from example_projects.flow_matching.metrics2d import path_straightness, w2_exact
from example_projects.flow_matching.objective import interpolate, sample_time, velocity_target
from example_projects.flow_matching.samplers import integrate, parse_sampler_spec
from example_projects.flow_matching.targets2d import eight_gaussians, sample_target, two_moons
from example_projects.flow_matching.toy2d import MLPVelocity, Toy2DData, Toy2DFlow
from example_projects.flow_matching.toy2d import cli_main as toy_cli_main
from example_projects.flow_matching.toy2d_eval import Toy2DEval
from lightning_immiscible import ImmiscibleCoupling

CONFIGS = Path(__file__).resolve().parents[2] / "example_projects" / "flow_matching" / "configs"
QUICK, CIFAR, TOY = (str(CONFIGS / f"{n}.yaml") for n in ("quickstart", "cifar10", "toy2d"))
OVERLAYS = {n: str(CONFIGS / f"{n}.yaml") for n in ("immiscible", "ot", "knn", "baseline")}
TINY_FID = [
    "--fid.extractor=example_projects.common.fid.TinyExtractor",
    "--fid.num_samples=8",
    "--fid.samplers=[euler1, euler2, heun2]",
    "--fid.batch_size=8",
    "--grid.num_images=4",
    "--grid.steps=2",
]
TINY_NET = [
    "--model.net.init_args.base_channels=8",
    "--model.net.init_args.channel_mult=[1, 2]",
    "--model.net.init_args.image_size=8",
    "--data.image_size=8",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv is present beside ``args``."""
    monkeypatch.setattr("sys.argv", ["example_projects.flow_matching"])


def tiny_model(**kwargs) -> FlowMatching:
    from example_projects.common.unet import UNet

    net = UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), image_size=8)
    return FlowMatching(net, in_channels=1, image_size=8, **kwargs)


# ----------------------------------------------------------------------------- objective and samplers


def test_interpolant_and_target_follow_the_documented_convention() -> None:
    """t = 0 is data, t = 1 is noise, and the target is the path's time derivative."""
    x0, noise = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 5.0]])
    assert torch.equal(interpolate(x0, noise, torch.tensor([0.0])), x0)
    assert torch.equal(interpolate(x0, noise, torch.tensor([1.0])), noise)
    assert torch.allclose(interpolate(x0, noise, torch.tensor([0.25])), torch.tensor([[1.5, -0.25]]))
    # The target is the finite difference of the path (catches a swapped sign or ends).
    h, t = 1e-3, torch.tensor([0.4], dtype=torch.float64)
    fd = (interpolate(x0.double(), noise.double(), t + h) - interpolate(x0.double(), noise.double(), t)) / h
    assert torch.allclose(fd, velocity_target(x0, noise).double(), atol=1e-9)


def test_time_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    uni, logit = sample_time(20_000, "uniform", generator=g), sample_time(20_000, "logit_normal", generator=g)
    assert 0 <= float(uni.min()) and float(uni.max()) < 1 and abs(float(uni.mean()) - 0.5) < 0.01
    # sigmoid(N(0, 1)): median 0.5, and P(t < sigmoid(-1)) = Phi(-1) = 0.1587 (normal table).
    assert abs(float(logit.median()) - 0.5) < 0.01
    assert abs(float((logit < torch.sigmoid(torch.tensor(-1.0))).float().mean()) - 0.1587) < 0.01
    shifted = sample_time(20_000, "logit_normal", loc=1.0, generator=g)
    assert abs(float(shifted.median()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.01
    with pytest.raises(ValueError, match="logit_normal"):
        sample_time(3, "cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_samplers_integrate_the_straight_field_of_a_point_mass_exactly(sampler: str, steps: int) -> None:
    """The exact velocity towards a point c, v = (x - c) / t, is linear in x; every step count lands on c."""
    c = torch.tensor([1.5, -0.5], dtype=torch.float64)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Heun evaluates at t = 0 on its last corrector: there the field's limit is the chord x - c
    # divided by t -> the same constant velocity; guard the division with the known limit.
    start = noise.clone()

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t[:, None] > 0, (x - c) / t[:, None].clamp_min(1e-30), start - c)

    out = integrate(field, noise, steps, sampler)
    assert torch.allclose(out, c.expand_as(out), atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_corrects_all_steps_but_the_last_on_a_time_affine_field(steps: int) -> None:
    """v(x, t) = a + b t: x(0) = x(1) - a - b / 2. The trapezoid is exact on each corrected step;
    the last step into t = 0 is Euler (EDM), off by b / (2 steps^2); all-Euler is off by b / (2 steps).

    Catches a Heun without its corrector (it would equal Euler), one that also corrects at t = 0
    (it would be exact), and a wrong time grid.
    """
    a, b = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def field(x, t):
        return a + b * t[:, None]

    exact = x1 - a - b / 2
    # Euler evaluates at the left end (t_k, the larger time) of each step: error -b / (2 steps).
    assert torch.allclose(integrate(field, x1, steps, "heun"), exact - b / (2 * steps**2), atol=1e-12)
    euler = integrate(field, x1, steps, "euler")
    assert torch.allclose(euler, exact - b / (2 * steps), atol=1e-12)
    path = integrate(field, x1, steps, "euler", return_path=True)
    assert path.shape == (steps + 1, 4, 2) and torch.equal(path[0], x1) and torch.equal(path[-1], euler)


def test_sampler_specs() -> None:
    assert parse_sampler_spec("euler1") == ("euler", 1) and parse_sampler_spec("heun16") == ("heun", 16)
    for bad in ("euler", "rk4", "heun0", "8euler"):
        with pytest.raises(ValueError, match="sampler name followed by a step count"):
            parse_sampler_spec(bad)
    fid = FlowMatchingFID(samplers=["euler1", "euler2", "heun8"], extractor=_tiny_extractor())
    assert fid.groups == {"euler": [1, 2], "heun": [8]}


def _tiny_extractor():
    from example_projects.common.fid import TinyExtractor

    return TinyExtractor()


# ----------------------------------------------------------------------------- the noise pairing


class BrokenPairing(FlowMatching):
    """Builds x_t from another pairing (noise rolled by one item) than the target's."""

    def loss(self, x0, noise, t):
        v = self.velocity(self.net)
        return F.mse_loss(v(interpolate(x0, noise.roll(1, 0), t), t), velocity_target(x0, noise))


class OtherTarget(FlowMatching):
    """Builds x_t with the handed-out noise but regresses onto fresh noise's velocity."""

    def loss(self, x0, noise, t):
        v = self.velocity(self.net)
        return F.mse_loss(v(interpolate(x0, noise, t), t), velocity_target(x0, torch.randn_like(noise)))


def check_same_noise(model: FlowMatching) -> None:
    """Fails unless training_step uses noise_like's noise for x_t AND in the target.

    The network is replaced by a spy that records (x_t, t) and predicts exactly noise - x0 for the
    handed-out noise: the loss is then 0 if and only if the target is built from that noise.
    """
    x0 = torch.rand(6, *model.sample_shape(), generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    model.noise_like = lambda x: noise  # what the coupling hands out for this batch
    seen: dict[str, torch.Tensor] = {}

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t / model.hparams.time_scale
        return noise - x0

    model.net.forward = spy
    model.log = lambda *a, **k: None
    loss = model.training_step((x0, torch.zeros(6, dtype=torch.long)), 0)
    t = seen["t"].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - t) * x0 + t * noise, atol=1e-6), "x_t pairing"
    assert float(loss) == 0.0, "the target is not built from the noise that built x_t"


def test_training_step_uses_the_same_noise_for_x_t_and_target() -> None:
    check_same_noise(tiny_model())
    check_same_noise(tiny_model(time_sampling="logit_normal"))


@pytest.mark.parametrize("broken", [BrokenPairing, OtherTarget])
def test_a_broken_pairing_fails_the_check(broken: type) -> None:
    from example_projects.common.unet import UNet

    model = broken(UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), image_size=8), image_size=8)
    with pytest.raises(AssertionError):
        check_same_noise(model)


def test_sampling_is_deterministic_and_uses_the_chosen_sampler() -> None:
    model = tiny_model()
    with torch.no_grad():  # a non-trivial network: the zero-initialised head would output 0
        for p in model.ema.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    noise = torch.randn(3, *model.sample_shape(), generator=torch.Generator().manual_seed(1))
    a, b = model.sample(noise, 2), model.sample(noise.clone(), 2)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    with model.using_sampler("heun"):
        heun = model.sample(noise, 2)
    assert model.sampler == "euler" and torch.equal(heun, model.sample(noise, 2, sampler="heun"))
    assert not torch.equal(heun, a)
    assert model.ema.model.training is False


# ----------------------------------------------------------------------------- ot.yaml's plan


def recorded_fit(
    configs: list[str], tmp_path: Path, steps: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs the 2-D template's CLI for a few steps and records each batch's (x0, noise) pairs."""
    args = [a for c in configs for a in ("--config", c)]
    cli = toy_cli_main(
        [
            *args,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--data.batch_size=64",
        ],
        run=False,
    )
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = cli.model.loss

    def loss(x0, noise, t):
        records.append((x0.detach().clone(), noise.detach().clone()))
        return original(x0, noise, t)

    cli.model.loss = loss
    cli.trainer.fit(cli.model, cli.datamodule)
    return records


def scipy_sq_plan(x0: torch.Tensor, noise: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """Oracle: the optimal assignment on a squared-distance cost built here, in float64."""
    a, b = x0.double().flatten(1).numpy(), noise.double().flatten(1).numpy()
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)], float(cost[rows, cols].sum()), float(np.trace(cost))


def test_ot_overlay_pairs_each_batch_by_the_exact_squared_distance_plan(tmp_path: Path) -> None:
    """With ot.yaml, the noise handed to the loss is the exact OT plan of x0 and that same noise.

    Oracle: scipy on a squared-distance cost built in the test. Since the coupling only permutes
    its pool, the pool as a set is the handed-out noise; the plan is optimal iff the identity
    pairing is an optimal assignment of that set. Catches the coupling being off (baseline.yaml
    fails this, checked below) and a wrong metric (plain L2's optimum differs in some rows).
    """
    records = recorded_fit([TOY, OVERLAYS["ot"]], tmp_path)
    assert len(records) == 3
    for x0, noise in records:
        perm, best, identity = scipy_sq_plan(x0, noise)
        assert identity == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert np.array_equal(perm, np.arange(len(perm)))  # continuous random data: a unique optimum
    x0, noise = recorded_fit([TOY, OVERLAYS["baseline"]], tmp_path, steps=1)[0]
    _, best, identity = scipy_sq_plan(x0, noise)
    assert identity > best * 1.5, "the baseline's independent pairs should be far from the OT plan"


# ----------------------------------------------------------------------------- 2-D positive control


def train_toy(method: str, seed: int, steps: int = 200) -> float:
    """1-step Euler W2 of a tiny 2-D flow trained with the given coupling (exact, on 1,024 points)."""
    L.seed_everything(seed, verbose=False)
    model = Toy2DFlow(MLPVelocity(2, 64, 3), lr=2e-3)
    data = Toy2DData("8gaussians", num_train=20_000, batch_size=128, seed=seed)
    coupling = ImmiscibleCoupling(method=method, metric="sqeuclidean", seed=seed)
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[coupling],
    )
    trainer.fit(model, data)
    metrics, _, _ = Toy2DEval(euler_steps=[1], num_samples=1024, path_steps=8, plot=False).evaluate(
        model, "8gaussians"
    )
    return metrics["toy/w2_euler1"]


# Measured (200 steps, batch 128, 8 Gaussians, lr 2e-3), one-step W2 of OT pairs vs independent
# pairs: seed 0 1.591 vs 2.292 (gap 0.70), seed 1 1.570 vs 2.186 (gap 0.62). With the coupling
# silently off (the same ot run, but the module drawing torch.randn_like instead of noise_like)
# the gap was -0.04 and +0.04: the 0.2 margin then fails, as it should.
MARGIN = 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_coupled_training_beats_independent_pairs_at_one_euler_step(seed: int) -> None:
    ot, base = train_toy("lsa", seed), train_toy("none", seed)
    assert ot < base - MARGIN, f"seed {seed}: one-step W2 with OT pairs {ot:.3f} vs independent {base:.3f}"


def test_2d_targets_and_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    pts = eight_gaussians(4000, g)
    radius = pts.norm(dim=1)
    assert pts.shape == (4000, 2) and abs(float(radius.mean()) - 5.0) < 0.05
    moons = two_moons(2000, g)
    assert moons.shape == (2000, 2) and torch.isfinite(moons).all()
    with pytest.raises(ValueError, match="target must be one of"):
        sample_target("spirals", 3)  # type: ignore[arg-type]
    # W2 oracle by brute force over all permutations of 6 points.
    import itertools

    a, b = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    cost = torch.cdist(a.double(), b.double()) ** 2
    brute = min(sum(float(cost[i, p[i]]) for i in range(6)) for p in itertools.permutations(range(6)))
    assert w2_exact(a, b) == pytest.approx(math.sqrt(brute / 6), rel=1e-12)
    assert w2_exact(a, a[torch.randperm(6, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    # Straightness: 0 on straight constant-speed paths, positive on a bent one.
    line = torch.linspace(0, 1, 5)[:, None, None] * torch.tensor([[2.0, 1.0]])
    assert path_straightness(line) == pytest.approx(0.0, abs=1e-12)
    bent = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]])  # chord (2, 0), steps (2, 2) and (2, -2)
    assert path_straightness(bent) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- configs and CLI


def couplings(cli) -> list[ImmiscibleCoupling]:
    return [c for c in cli.trainer.callbacks if isinstance(c, ImmiscibleCoupling)]


EXPECTED = {
    "immiscible": ("lsa", "l2"),
    "ot": ("lsa", "sqeuclidean"),
    "knn": ("knn", "l2"),
    "baseline": ("none", "l2"),
}


# The CIFAR-10 network takes seconds to build: one overlay there (the others are the same YAML).
@pytest.mark.parametrize(
    ("base", "overlay"),
    [(b, o) for b in (QUICK, TOY) for o in sorted(OVERLAYS)] + [(CIFAR, "baseline")],
)
def test_configs_compose_to_exactly_one_coupling(base: str, overlay: str, tmp_path: Path) -> None:
    main = toy_cli_main if base == TOY else cli_main
    cli = main(
        ["--config", base, "--config", OVERLAYS[overlay], f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    assert [(c.spec.method, c.spec.metric) for c in couplings(cli)] == [EXPECTED[overlay]]


def test_overlays_differ_only_in_the_coupling_settings() -> None:
    bodies = {
        n: [ln for ln in Path(p).read_text().splitlines() if not ln.startswith("#")]
        for n, p in OVERLAYS.items()
    }
    for name, lines in bodies.items():
        differing = [(a, b) for a, b in zip(bodies["ot"], lines, strict=True) if a != b]
        assert all(a.strip().split(":")[0] in ("method", "metric") for a, _ in differing), (name, differing)


def test_the_network_is_injected_from_the_config(tmp_path: Path) -> None:
    cli = cli_main(
        ["--config", CIFAR, "--config", OVERLAYS["ot"], f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    assert type(cli.model.net).__name__ == "UNet"
    assert sum(p.numel() for p in cli.model.net.parameters()) == pytest.approx(35.7e6, rel=0.01)
    fid = next(c for c in cli.trainer.callbacks if isinstance(c, FlowMatchingFID))
    assert fid.groups == {"euler": [1, 2, 8, 100], "heun": [8]} and (fid.feature, fid.num_samples) == (
        2048,
        50_000,
    )
    toy = toy_cli_main(
        ["--config", TOY, f"--trainer.default_root_dir={tmp_path}", "--model.net.init_args.width=16"],
        run=False,
    )
    assert toy.model.net.net[0].out_features == 16


def _run_args(tmp_path: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.log_every_n_steps=1",
    ]


def test_quickstart_fit_logs_fid_per_sampler_and_a_grid(tmp_path: Path) -> None:
    """A tiny end-to-end fit of the quickstart (embedded MNIST-5k at 8x8) logs FID per spec and a grid."""
    cli = cli_main(
        [
            "fit",
            "--config",
            QUICK,
            "--config",
            OVERLAYS["ot"],
            *_run_args(tmp_path),
            *TINY_FID,
            *TINY_NET,
            "--data.batch_size=16",
        ]
    )
    log_dir = Path(cli.trainer.logger.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    for key in ("val/fid16_n8_euler1", "val/fid16_n8_euler2", "val/fid16_n8_heun2"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0, key
    # Read as floats: the CSV holds strings and "0.0" is truthy (tests/examples/support.py). Each logged
    # reduction must be the formula of that step's logged costs and positive (exact assignment at
    # batch 16). Catches a reduction logged as 0 (the old truthiness check passed on "0.0").
    logged = [r for r in rows if r.get("immiscible/reduction_pct", "") != ""]
    assert logged
    for r in logged:
        before, after = float(r["immiscible/cost_before"]), float(r["immiscible/cost_after"])
        assert 0 < after < before
        assert float(r["immiscible/reduction_pct"]) == pytest.approx(
            100 * (before - after) / before, rel=1e-4
        )
    assert (log_dir / "grids" / "latest.png").is_file()
    assert int(cli.model.ema.num_updates) == 2


def test_toy2d_fit_logs_w2_straightness_and_a_picture(tmp_path: Path) -> None:
    cli = toy_cli_main(
        [
            "fit",
            "--config",
            TOY,
            "--config",
            OVERLAYS["ot"],
            *_run_args(tmp_path),
            "--eval.num_samples=64",
            "--eval.path_steps=4",
            "--eval.num_paths=16",
            "--data.num_train=512",
        ]
    )
    log_dir = Path(cli.trainer.logger.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    for key in ("toy/w2_euler1", "toy/w2_euler2", "toy/w2_euler4", "toy/straightness", "toy/w2_floor"):
        assert any(r.get(key) and math.isfinite(float(r[key])) for r in rows), key
    assert (log_dir / "toy2d" / "latest.png").is_file() and (log_dir / "toy2d" / "step0000002.png").is_file()


class _Seen(L.Callback):
    """Records the initial weights and the training batches of a run (for the same-start check)."""

    def __init__(self, seen: list) -> None:
        self.seen, self.batches = seen, []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first = next(iter(pl_module.net.parameters()))
        self.seen.append((first.detach().clone(), self.batches))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        self.batches.append(batch[0].detach().clone())


def test_compare_trains_both_arms_and_reports_fid_side_by_side(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`compare` on a tiny setting: both arms train on one seed; the table matches their own CSV logs."""
    from example_projects.flow_matching import __main__ as main_module

    seen: list = []

    def recording_cli(args, run=True):
        cli = original(args, run)
        cli.trainer.callbacks.append(_Seen(seen))
        return cli

    original = main_module.fit_cli
    monkeypatch.setattr(main_module, "fit_cli", recording_cli)
    out = tmp_path / "cmp"
    result = cli_main(
        [
            "compare",
            "--config",
            QUICK,
            "--config",
            str(CONFIGS / "compare.yaml"),
            f"--out={out}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.log_every_n_steps=1",
            *TINY_FID,
            "--fid.samplers=[euler1, euler2, euler8, heun2]",
            *TINY_NET,
            "--data.batch_size=16",
        ]
    )
    printed = capsys.readouterr().out
    csv_fid = {}
    for arm in ("independent", "ot"):
        log_dir = Path(result["arms"][arm]["log_dir"])
        assert log_dir.parent == out / arm  # each arm in its own folder (a shared one mixes the CSVs)
        rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
        csv_fid[arm] = {k: float(r[k]) for r in rows for k in r if k.startswith("val/fid") and r[k]}
        # The coupling that ran: the baseline logs a 0 % reduction, OT a positive one (both overlays the same
        # would fail here).
        reductions = [float(r["immiscible/reduction_pct"]) for r in rows if r.get("immiscible/reduction_pct")]
        assert reductions and (max(reductions) == 0.0) == (arm == "independent"), (arm, reductions)
    # One row per Euler spec (heun2 is left out), the values and differences of the arms' own logs.
    for steps in (1, 2, 8):
        a, b = (csv_fid[arm][f"val/fid16_n8_euler{steps}"] for arm in ("independent", "ot"))
        row = f"| {steps} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
        assert row in result["table"] and row in printed, row
    assert "heun" not in result["table"]
    # Same seed, same start: both arms begin from the same weights and see the same batches. Catches arms
    # built up front, where the second arm trains from the random state the first arm's training left.
    [(w_a, b_a), (w_b, b_b)] = seen
    assert torch.equal(w_a, w_b) and len(b_a) == len(b_b) == 2
    assert all(torch.equal(x, y) for x, y in zip(b_a, b_b, strict=True))
    png = result["png"]
    assert png == out / "compare.png" and png.stat().st_size > 1000
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 200
    for path in (
        png,
        result["markdown"],
        result["json"],
        *[Path(a["log_dir"]) for a in result["arms"].values()],
    ):
        assert str(path) in printed and path.exists(), path


# ----------------------------------------------------------------------------- resume: the same run


class _Interrupted(RuntimeError):
    """What a killed process looks like to the test."""


class _InterruptAfter(L.Callback):
    """Interrupts the fit before any step after ``step`` (its checkpoint is written by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step >= self.step:
            raise _Interrupted(f"interrupted after step {self.step}")


def _recorded_session(
    root: Path, val_every: int, *, stop: int | None = None, ckpt: Path | None = None
) -> tuple[list[dict[str, torch.Tensor]], FlowMatching]:
    """One fit session of a 6-step OT run on 32 synthetic images (4 batches of 8 per epoch).

    Records what every training step used: the batch's images, the noise handed to the loss, the
    training times and the loss. ``stop``: checkpoint after that step and interrupt the fit there.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = cli_main(
        [
            "--config", QUICK, "--config", OVERLAYS["ot"], *TINY_NET, *TINY_FID,
            "--fid.samplers=[euler1]", "--data.dataset=synthetic", "--data.num_synthetic=32",
            "--data.channels=1", "--data.batch_size=8", "--data.val_size=8", "--seed_everything=3",
            "--trainer.max_steps=6", "--trainer.max_epochs=-1", "--trainer.check_val_every_n_epoch=null",
            f"--trainer.val_check_interval={val_every}", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        ],
        run=False,
    )  # fmt: skip
    records: list[dict[str, torch.Tensor]] = []
    original = cli.model.loss

    def loss(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        value = original(x0, noise, t)
        used = {"x0": x0, "noise": noise, "t": t, "loss": value}
        records.append({name: tensor.detach().clone() for name, tensor in used.items()})
        return value

    cli.model.loss = loss
    if stop is not None:
        cli.trainer.callbacks += [
            ModelCheckpoint(dirpath=root, every_n_train_steps=stop, save_last=True),
            _InterruptAfter(stop),
        ]
        with pytest.raises(_Interrupted):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    else:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return records, cli.model


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "at-the-epoch-end"])
def test_a_resumed_run_equals_an_uninterrupted_one_step_for_step(tmp_path: Path, stop: int) -> None:
    """Interrupted after ``stop`` of 6 steps and resumed, under other evaluation schedules, a run uses
    the same batches, coupled noise and training times and reaches the same losses and weights as the
    uninterrupted run (the oracle: that run, evaluated every 2 steps; the interrupted one every 3, the
    resumed one after every step).

    Catches: training times drawn from the global random state (the resumed session restarts it from
    the seed, and every evaluation advances it: step 4's times would differ), a data order drawn from it
    (``RandomSampler``: a new shuffle after the resume), and a loader whose position is not checkpointed
    (the resumed epoch would start again from its first batch; ``mid-epoch``). ``at-the-epoch-end``: a
    checkpoint after an epoch's last batch resumes with the next epoch's order (the loader's own rollover
    is checked without Lightning in ``test_common_data.py``, where workers' early reads are modelled).
    """
    oracle, whole = _recorded_session(tmp_path / "whole", val_every=2)
    first, _ = _recorded_session(tmp_path / "cut", val_every=3, stop=stop)
    rest, resumed = _recorded_session(tmp_path / "cut2", val_every=1, ckpt=tmp_path / "cut" / "last.ckpt")
    assert (len(oracle), len(first), len(rest)) == (6, stop, 6 - stop)
    for step, (want, got) in enumerate(zip(oracle, first + rest, strict=True), start=1):
        for name in ("x0", "noise", "t", "loss"):
            assert torch.equal(want[name], got[name]), f"step {step}: {name} is not the uninterrupted run's"
    # Not vacuous: the steps draw different batches, noise and times (a stream stuck on one draw fails).
    assert not any(torch.equal(oracle[0][name], oracle[4][name]) for name in ("x0", "noise", "t"))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
