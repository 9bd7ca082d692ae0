"""benchmarks/speedup.py: paired runs, curves, report, resume, speed-up arithmetic (tiny settings)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import speedup  # noqa: E402

TINY = [
    "--data.dataset=synthetic",
    "--data.num_synthetic=64",
    "--data.image_size=8",
    "--data.channels=1",
    "--data.batch_size=8",
    "--data.val_size=8",
    "--model.net.init_args.base_channels=8",
    "--model.net.init_args.channel_mult=[1, 2]",
    "--model.net.init_args.image_size=8",
    "--fid.extractor=example_projects.common.fid.TinyExtractor",
    "--fid.num_samples=8",
    "--fid.sampling_steps=[2]",
    "--fid.batch_size=8",
    "--grid.num_images=4",
    "--grid.steps=2",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["speedup"])


def test_steps_to_reach_interpolates_and_reports_never():
    curve = [{"step": 100, "fid": 50.0}, {"step": 200, "fid": 30.0}, {"step": 300, "fid": 20.0}]
    assert speedup.steps_to_reach(curve, "fid", 40.0) == pytest.approx(150.0)
    assert speedup.steps_to_reach(curve, "fid", 60.0) == 100.0
    assert speedup.steps_to_reach(curve, "fid", 10.0) is None
    runs = [
        {"method": "none", "seed": 0, "curve": curve},
        {"method": "lsa", "seed": 0, "curve": [{"step": 100, "fid": 20.0}, {"step": 200, "fid": 15.0}]},
    ]
    summary = speedup.summarize(runs, "fid")
    assert summary["lsa"]["speedup"] == [3.0] and summary["none"]["speedup"] == [1.0]


def _args(out, max_steps):
    return ["--example", "ddim", "--config", str(ROOT / "example_projects/ddim/configs/quickstart.yaml"),
            "--methods", "none", "lsa", "--seeds", "0", "--max-steps", str(max_steps), "--eval-every", "2",
            "--out", str(out), "--", *TINY]  # fmt: skip


def test_paired_sweep_writes_curves_plot_report_and_resumes(tmp_path):
    summary = speedup.main(_args(tmp_path, 4))
    for name in ("curves.json", "report.md", "fid_vs_steps.png"):
        assert (tmp_path / name).is_file()
    data = json.loads((tmp_path / "curves.json").read_text())
    assert data["metric"] == "val/fid16_n8_ddim2"  # not the logged evaluation time
    assert [row["step"] for row in data["runs"][0]["curve"]] == [2, 4]
    assert set(summary) == {"none", "lsa"}
    # the paired baseline and the immiscible run start from the same weights and data: their
    # first FIDs differ only through the coupling
    report = (tmp_path / "report.md").read_text()
    assert "| none |" in report and "| lsa − none |" in report  # FID table and paired differences
    assert set(data["summary"]["lsa"]["paired"]) == {"2", "4"}  # JSON keys: the evaluation steps
    # resume: an interrupted run (no done.json) continues from last.ckpt and keeps its curve
    run = tmp_path / "runs" / "lsa_seed0"
    (run / "done.json").unlink()
    speedup.main(_args(tmp_path, 6))
    resumed = json.loads((run / "done.json").read_text())
    assert [row["step"] for row in resumed["curve"]] == [2, 4, 6]
    # The records say which run was resumed and where (a runner that does not record it fails here).
    assert [session["start_step"] for session in resumed["sessions"]] == [0, 4]
    done = json.loads((tmp_path / "runs" / "none_seed0" / "done.json").read_text())
    assert [s["start_step"] for s in done["sessions"]] == [0]
    # --supersede sets the resumed run aside with its reason and the same command trains it afresh
    # (catches: a record deleted instead of kept, or a rerun continuing the superseded checkpoint).
    words = _args(tmp_path, 6)
    cut = words.index("--")
    speedup.main([*words[:cut], "--supersede", "lsa_seed0", "--reason", "resumed", *words[cut:]])
    old = tmp_path / "superseded" / "lsa_seed0"
    assert json.loads((old / "superseded.json").read_text()) == {"reason": "resumed"}
    assert json.loads((old / "done.json").read_text())["sessions"] == resumed["sessions"]
    fresh = json.loads((run / "done.json").read_text())
    assert [s["start_step"] for s in fresh["sessions"]] == [0] and [
        row["step"] for row in fresh["curve"]
    ] == [2, 4, 6]
    # Run again, the command leaves the superseded record and the rerun as they are.
    assert speedup.supersede(tmp_path, ["lsa_seed0"], "again") == []
    assert json.loads((old / "superseded.json").read_text()) == {"reason": "resumed"}


def test_supersede_needs_a_run_and_a_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="none_seed9"):
        speedup.supersede(tmp_path, ["none_seed9"], "typo")
    with pytest.raises(SystemExit):
        speedup.parse_args(["--config", "a.yaml", "--supersede", "none_seed1"])  # no --reason


def test_paired_differences_count_seeds_and_sign_test():
    assert speedup.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert speedup.sign_test_p(5, 1) == pytest.approx(2 * 7 / 64)
    assert speedup.sign_test_p(3, 3) == 1.0 and speedup.sign_test_p(0, 0) == 1.0

    def run(method, seed, fids):
        curve = [{"step": 10 * (i + 1), "fid": f} for i, f in enumerate(fids)]
        return {"method": method, "seed": seed, "curve": curve}

    runs = [
        run("none", 0, [5.0, 3.0]),
        run("lsa", 0, [4.0, 3.5]),
        run("none", 1, [6.0, 2.0]),
        run("lsa", 1, [5.0, 2.0]),
        run("lsa", 2, [1.0, 1.0]),  # no baseline for seed 2: left out of the pairs
    ]
    paired = speedup.paired_differences(runs, "fid")
    assert set(paired) == {"lsa"} and list(paired["lsa"]) == [10, 20]
    first, second = paired["lsa"][10], paired["lsa"][20]
    assert (first["mean"], first["n"], first["better"], first["worse"]) == (-1.0, 2, 2, 0)
    assert first["sem"] == pytest.approx(0.0)
    assert (second["mean"], second["better"], second["worse"]) == (0.25, 0, 1)  # a tie is neither
    assert speedup.summarize(runs, "fid")["lsa"]["paired"] == paired["lsa"]


# ----------------------------------------------------------------------------- steps to quality


def _curve(*points):
    return [{"step": s, "fid": f} for s, f in points]


def test_steps_to_quality_targets_the_baselines_best_not_its_last_value():
    base = _curve((100, 5.0), (200, 3.0), (300, 4.0))  # best 3.0 at step 200, then it rises
    # Reaches 3.0 halfway between its evaluations at 100 (4.0) and 200 (2.0): step 150, 200/150 faster.
    # Against the baseline's last value (4.0) it would be step 100 and 3x: that variant fails here.
    q = speedup.steps_to_quality(_curve((100, 4.0), (200, 2.0)), base, "fid")
    assert (q["target"], q["base_steps"], q["steps"]) == (3.0, 200.0, pytest.approx(150.0))
    assert q["speedup"] == pytest.approx(4 / 3) and q["speedup_bound"] is None and not q["at_first_eval"]
    never = speedup.steps_to_quality(_curve((100, 6.0), (300, 3.5)), base, "fid")
    assert (
        never["steps"] is None and never["speedup"] is None and never["speedup_bound"] == pytest.approx(2 / 3)
    )
    first = speedup.steps_to_quality(_curve((100, 2.5), (200, 2.0)), base, "fid")
    assert first["steps"] == 100 and first["at_first_eval"] and first["speedup"] == 2.0
    # A baseline whose best value repeats: its first occurrence counts.
    tie = speedup.steps_to_quality(_curve((100, 3.0)), _curve((100, 4.0), (200, 3.0), (300, 3.0)), "fid")
    assert tie["base_steps"] == 200.0


def test_speedup_stats_geometric_mean_interval_and_sign_tests():
    seeds = [{"speedup": f, "speedup_bound": None} for f in (2.0, 4.0, 8.0)]
    stats = speedup.speedup_stats(seeds)
    # log2 factors 1, 2, 3: mean 2 -> 4x; s.d. 1 -> 95 % half-width t(0.975, 2) / sqrt(3) in log2 units,
    # with t(0.975, 2) = 4.302652729911275 (Student's t table).
    half = 4.302652729911275 / 3**0.5
    assert stats["geomean"] == pytest.approx(4.0)
    assert stats["ci95"] == pytest.approx((2 ** (2 - half), 2 ** (2 + half)))
    assert (stats["faster"], stats["slower"], stats["p_faster"]) == (3, 0, pytest.approx(2 / 8))
    # 2.0 is a tie with the 2x claim (dropped): 2 of 2 above, one-sided p = 1/4.
    assert (stats["above_claim"], stats["below_claim"], stats["p_claim"]) == (2, 0, pytest.approx(1 / 4))
    # A seed that never reached the target: slower than 1x and than 2x, in the mean at its bound.
    censored = speedup.speedup_stats([*seeds, {"speedup": None, "speedup_bound": 0.5}])
    assert censored["censored"] == 1 and censored["geomean"] == pytest.approx(32**0.25)
    assert (censored["faster"], censored["slower"]) == (3, 1)
    assert censored["p_faster"] == pytest.approx(2 * 5 / 16)  # P(X <= 1 | n = 4), two-sided
    assert (censored["above_claim"], censored["below_claim"]) == (2, 1)
    assert censored["p_claim"] == pytest.approx(4 / 8)  # P(X >= 2 | n = 3)
    six = speedup.speedup_stats([{"speedup": 3.0, "speedup_bound": None}] * 6)
    assert six["p_claim"] == pytest.approx(1 / 64) and six["p_faster"] == pytest.approx(2 / 64)


def test_summarize_reports_steps_to_quality_per_method():
    runs = [
        {"method": "none", "seed": 0, "curve": _curve((100, 5.0), (200, 3.0), (300, 4.0))},
        {"method": "lsa-sqeuclidean", "seed": 0, "curve": _curve((100, 4.0), (200, 2.0), (300, 2.0))},
    ]
    summary = speedup.summarize(runs, "fid")
    assert "quality" not in summary["none"]
    q = summary["lsa-sqeuclidean"]["quality"]
    assert q["per_seed"][0]["steps"] == pytest.approx(150.0) and q["geomean"] == pytest.approx(4 / 3)
    text = speedup.report_section(summary, "fid", {})
    assert "| lsa-sqeuclidean | 200 -> 150 | 1.33x | 1/0 (p=1.000) | 0/1 (p=1.000) |" in text


def test_method_names_map_to_the_flow_matching_overlays():
    """The runner's arms are the settings of baseline.yaml, ot.yaml and immiscible.yaml."""
    import yaml

    configs = ROOT / "example_projects/flow_matching/configs"
    for name, overlay in (("none", "baseline"), ("lsa-sqeuclidean", "ot"), ("lsa-l2", "immiscible")):
        init = yaml.safe_load((configs / f"{overlay}.yaml").read_text())["trainer"]["callbacks"][0][
            "init_args"
        ]
        assert {k: init[k] for k in ("method", "metric") if k in speedup.method_args(name)} == {
            k: v for k, v in speedup.method_args(name).items() if k != "k"
        }, name
    with pytest.raises(ValueError, match="metric"):
        speedup.method_args("lsa-euclid")


def test_flow_matching_sweep_with_overlay_configs_and_two_fid_keys(tmp_path):
    """The pre-registered run's shape, tiny: flow matching, base + overlay configs, a report per FID key."""
    configs = f"{ROOT}/example_projects/flow_matching/configs/"
    keys = ["val/fid16_n8_euler2", "val/fid16_n8_euler1"]
    tiny = [
        w for w in TINY if not w.startswith(("--fid.sampling_steps", "--data.dataset", "--data.num_synth"))
    ]
    summaries = speedup.main(
        ["--example", "flow_matching", "--config", f"{configs}quickstart.yaml", f"{configs}compare.yaml",
         "--methods", "none", "lsa-sqeuclidean", "--seeds", "0", "--max-steps", "4", "--eval-every", "2",
         "--metric", *keys, "--out", str(tmp_path), "--", *tiny, "--fid.samplers=[euler1, euler2]"]
    )  # fmt: skip
    assert list(summaries) == keys
    # the runner's settings win over compare.yaml's (1,000 steps, evaluations every 500)
    data = json.loads((tmp_path / "curves.json").read_text())
    assert [row["step"] for row in data["runs"][0]["curve"]] == [2, 4]
    assert data["metric"] == keys[0] and data["metrics"] == keys
    assert (tmp_path / "fid_vs_steps.png").is_file() and (tmp_path / "fid_vs_steps_euler1.png").is_file()
    report = (tmp_path / "report.md").read_text()
    for key in keys:
        assert f"Steps to quality ({key})" in report
    assert summaries[keys[0]]["lsa-sqeuclidean"]["quality"]["n"] == 1
    overlay = (tmp_path / "runs" / "lsa-sqeuclidean_seed0" / "method.yaml").read_text()
    assert "method: lsa" in overlay and "metric: sqeuclidean" in overlay


def _page_commands(page: Path) -> list[list[str]]:
    import re
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    return [shlex.split(re.sub(r"\\\n\s*", " ", b)) for b in blocks]


def test_preregistered_flow_matching_commands_build_the_registered_runs(tmp_path):
    """The pre-registration page's runner commands build the arms, lengths and FID keys it registers."""
    from example_projects.common.fid import fid_metric_name
    from example_projects.flow_matching.callbacks import FlowMatchingFID

    commands = _page_commands(ROOT / "docs/results/flow-matching-preregistration.md")
    runner = [c for c in commands if c[:2] == ["python", "benchmarks/speedup.py"]]
    assert [(len(speedup.parse_args(c[2:]).seeds), speedup.parse_args(c[2:]).max_steps) for c in runner] == [
        (6, 3000), (3, 3000), (1, 9000)
    ]  # fmt: skip
    for words in runner:
        args = speedup.parse_args(words[2:])
        assert (
            args.max_steps // args.eval_every == 8 and args.max_steps % args.eval_every == 0
        )  # 8 evaluations
        args.out = tmp_path
        for method in args.methods:
            cli = speedup.build_cli(args, method, args.seeds[0], tmp_path / method)
            [fid] = [cb for cb in cli.trainer.callbacks if isinstance(cb, FlowMatchingFID)]
            specs = [(n, s) for n, steps in fid.groups.items() for s in steps]
            logged = {fid_metric_name(fid.feature, fid.num_samples, s, sampler=n) for n, s in specs}
            assert set(args.metric) == logged, (args.metric, logged)  # the keys the runs will log
            assert args.metric[0].endswith("_euler2")  # the primary first
            [coupling] = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ImmiscibleCoupling"]
            expected = speedup.method_args(method)
            assert (coupling.spec.method, coupling.spec.metric) == (
                expected["method"], expected.get("metric", coupling.spec.metric)
            )  # fmt: skip
            assert (
                cli.trainer.max_steps == args.max_steps and cli.trainer.val_check_interval == args.eval_every
            )
            assert cli.datamodule.image_size == 16


def test_the_seed_1_rerun_is_the_preregistered_run_with_its_old_records_set_aside():
    """The results page's rerun command trains what the pre-registration registered, only seed 1.

    Catches: a rerun with other settings than the registered runs (steps, evaluations, FID keys, configs,
    overrides), or one that supersedes other runs than those it trains again (a record lost or kept twice).
    """
    pre = _page_commands(ROOT / "docs/results/flow-matching-preregistration.md")
    [rerun] = [c for c in _page_commands(ROOT / "docs/results/flow-matching.md") if "--supersede" in c]
    new = speedup.parse_args(rerun[2:])
    registered = [speedup.parse_args(c[2:]) for c in pre if c[:2] == ["python", "benchmarks/speedup.py"]]
    primary = registered[0]
    for name in ("example", "config", "max_steps", "eval_every", "metric", "out", "extra"):
        assert getattr(new, name) == getattr(primary, name), name
    assert set(new.methods) == {
        m for r in registered if 1 in r.seeds and r.max_steps == 3000 for m in r.methods
    }
    assert new.seeds == [1] and sorted(new.supersede) == sorted(f"{m}_seed1" for m in new.methods)
    assert new.reason


def test_a_method_overlay_gets_the_runs_seed_on_its_coupling_and_keeps_the_rest(tmp_path):
    # Oracle: dataset.yaml as read here. Catches an overlay whose noise ignores the run's seed (its
    # runs unpaired with the baseline's), a seed put on the map's callback instead, and settings lost.
    import yaml

    path = ROOT / "example_projects/flow_matching/configs/dataset.yaml"
    original = yaml.safe_load(path.read_text())
    got = speedup.method_overlay(path, seed=4)
    [fit, coupling] = got["trainer"]["callbacks"]
    assert coupling["class_path"] == speedup.COUPLING and coupling["init_args"] == {
        **original["trainer"]["callbacks"][1]["init_args"], "seed": 4
    }  # fmt: skip
    assert fit == original["trainer"]["callbacks"][0] and got["data"] == original["data"]
    with pytest.raises(ValueError, match=r"no trainer\.callbacks entry with class_path"):
        speedup.method_overlay(ROOT / "example_projects/flow_matching/configs/heldout.yaml", seed=0)
    with pytest.raises(SystemExit):
        speedup.parse_args(["--config", str(path), "--method-config", "dataset"])


@pytest.mark.timeout(600)
def test_a_dataset_method_run_records_its_fit_its_coupling_times_and_the_copies(tmp_path):
    """The shape of the dataset-coupling pre-registration's Lightning runs, tiny.

    Catches: a fit time measured after the map's fit (then the dataset run's would not exceed the
    baseline's many times over), a run whose map is not recorded, coupling times or memorisation
    measures missing from the curves, and a method overlay that is not applied (no map, no fit).
    """
    configs = f"{ROOT}/example_projects/flow_matching/configs/"
    tiny = [w for w in TINY if not w.startswith(("--fid.sampling_steps", "--data.num_synth"))]
    speedup.main(
        ["--example", "flow_matching",
         "--config", f"{configs}quickstart.yaml", f"{configs}compare.yaml", f"{configs}heldout.yaml",
         "--methods", "none", "dataset", "--method-config", f"dataset={configs}dataset.yaml",
         "--seeds", "0", "--max-steps", "4", "--eval-every", "2", "--metric", "val/fid16_n8_euler1",
         "--out", str(tmp_path), "--", *tiny, "--data.num_synthetic=96", "--data.held_out=32",
         "--fid.samplers=[euler1]"]
    )  # fmt: skip
    runs = tmp_path / "runs"
    [base] = speedup.read_sessions(runs / "none_seed0" / "sessions.jsonl")
    [mapped] = speedup.read_sessions(runs / "dataset_seed0" / "sessions.jsonl")
    assert "map" not in base and mapped["map"]["steps"] >= 500 and mapped["map"]["chi2"] is not None
    assert mapped["fit_start_s"] > 10 * base["fit_start_s"]
    for name in ("none_seed0", "dataset_seed0"):
        rows = speedup._read_curve(runs / name / "curves.jsonl")
        assert [r["step"] for r in rows] == [2, 4]
        for r in rows:
            assert 0 <= r["val/copy_share_n8_euler1"] <= 1 and r["val/distance_ratio_n8_euler1"] > 0
            assert r["immiscible/assign_ms"] >= 0
    overlay = yaml_of(runs / "dataset_seed0" / "method.yaml")
    assert (
        overlay["data"]["dataset_coupling"] is True
        and overlay["trainer"]["callbacks"][1]["init_args"]["seed"] == 0
    )


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_dataset_coupling_lightning_command_builds_the_registered_runs(tmp_path):
    """The dataset-coupling pre-registration's Lightning command trains what that page registers.

    Three arms (independent pairs, batch OT, the dataset overlay), seeds 0-2, 3,000 steps with an
    evaluation every 375, FID of 1,024 samples at 1, 2, 4 and 8 Euler steps against the 1,000
    held-out digits at 16 x 16, the memorisation measures on; the dataset arm fits its map.
    """
    from example_projects.common.fid import fid_metric_name
    from example_projects.flow_matching.callbacks import FlowMatchingFID
    from lightning_immiscible import FitSemidiscreteMap

    commands = _page_commands(ROOT / "docs/results/dataset-coupling-preregistration.md")
    [words] = [c for c in commands if c[:2] == ["python", "benchmarks/speedup.py"]]
    args = speedup.parse_args(words[2:])
    assert (args.seeds, args.max_steps, args.eval_every) == ([0, 1, 2], 3000, 375)
    assert args.methods == ["none", "lsa-sqeuclidean", "dataset"] and set(args.method_config) == {"dataset"}
    args.out = tmp_path
    for method in args.methods:
        cli = speedup.build_cli(args, method, 0, tmp_path / method)
        [fid] = [cb for cb in cli.trainer.callbacks if isinstance(cb, FlowMatchingFID)]
        logged = {fid_metric_name(fid.feature, fid.num_samples, s, sampler=n) for n, st in fid.groups.items()
                  for s in st}  # fmt: skip
        assert logged == set(args.metric) and fid.num_samples == 1024 and fid.copies
        dm = cli.datamodule
        assert (dm.image_size, dm.held_out, dm.dataset_coupling) == (16, 1000, method == "dataset")
        fits = [cb for cb in cli.trainer.callbacks if isinstance(cb, FitSemidiscreteMap)]
        assert len(fits) == (method == "dataset")
        [coupling] = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ImmiscibleCoupling"]
        assert coupling.seed == 0
        if method != "dataset":
            expected = speedup.method_args(method)
            assert coupling.spec.method == expected["method"]
            assert coupling.spec.metric == expected.get("metric", coupling.spec.metric)


def test_the_curve_recorder_averages_each_logged_time_since_the_last_evaluation(tmp_path):
    # The logged value is one tensor Lightning may update in place between steps (as here), so the
    # recorder must keep a copy per step. Oracle: the mean of the values fed, per evaluation. Catches
    # a recorder that keeps references (every entry would read the last value: 3.0, not 2.0), one that
    # does not restart its average after an evaluation, and one that drops non-time keys' FID.
    from types import SimpleNamespace

    import torch

    path = tmp_path / "curves.jsonl"
    recorder = speedup.CurveRecorder(path)
    shared = torch.zeros(())
    logged = {"immiscible/assign_ms": shared, "immiscible/map_search_ms": 4.0,
              "immiscible/reduction_pct": torch.tensor(9.0)}  # fmt: skip
    trainer = SimpleNamespace(
        callback_metrics=logged, sanity_checking=False, is_global_zero=True, global_step=3
    )
    for value in (1.0, 2.0, 3.0):
        shared.fill_(value)
        recorder.on_train_batch_end(trainer)
    trainer.callback_metrics["val/fid64_n1024_euler1"] = torch.tensor(50.0)
    recorder.on_validation_end(trainer, None)
    shared.fill_(7.0)
    recorder.on_train_batch_end(trainer)
    trainer.global_step = 4
    recorder.on_validation_end(trainer, None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 3, "val/fid64_n1024_euler1": 50.0, "immiscible/assign_ms": 2.0,
                        "immiscible/map_search_ms": 4.0}  # fmt: skip
    assert lines[1]["immiscible/assign_ms"] == 7.0 and lines[1]["step"] == 4
