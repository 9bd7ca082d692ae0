"""Every command the docs show is exercised, here or by CI itself.

Commands are collected from the fenced ``bash`` blocks and the inline code spans of the docs site
(``docs/*.md``), the README and the example projects' READMEs. Each kind has its check:

- ``python -m example_projects.<name> fit|validate ...``, also behind ``torchrun`` and SLURM's
  ``srun``: a dry run on a simulated node with 8 CUDA GPUs. The example's LightningCLI parses the
  exact command line, builds the model, data module, callbacks and trainer (accelerator, devices,
  nodes and strategy as written) and calls the subcommand, whose ``Trainer`` method records the call
  instead of training. GPUs, several nodes,
  the external datasets and the Hub download are not available here; the real multi-process path is
  run on CPU by ``tests/test_multinode.py`` (torchrun, 2 nodes x 2).
- ``torchrun`` and the SLURM script: the launcher's own arguments parse, and the processes it starts
  per node and the node count agree with the trainer's ``devices`` and ``num_nodes``.
- Benchmark and figure scripts: the script's own parser accepts the command and the files the docs
  cite as its output exist; small real runs are in ``tests/test_benchmark_scripts.py``.
- ``bash benchmarks/run_gpu.sh``: runs here; without CUDA it records the environment and stops
  with a clear message (its H100 output is in ``benchmarks/results/``).
- ``bash tools/lower_bounds.sh ...``: its options are accepted and its Python is found (a dry run);
  ``.ci/run`` runs the default form (the floors on Python 3.10) after the main suite.
- ``pip install``: every extra and package named is declared in ``pyproject.toml``; ``.ci/run``
  performs the install of the ``test`` extra, which includes ``examples`` and ``docs``.
- ``python -m build`` and the wheel it makes: built, checked and installed by ``tests/test_packaging.py``.
- ``python -m pytest [path]``: the paths exist under ``tests/``, which CI runs in full.
- ``mkdocs build --strict``: built by ``tests/test_site_html.py::test_site_builds_strictly``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "README.md",
    *sorted((ROOT / "example_projects").glob("*/README.md")),
]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE_PREFIXES = ("python ", "pip ", "bash ", "torchrun ", "mkdocs ", "srun ")
# Placeholders the docs use for values only the reader knows.
PLACEHOLDERS = {"$NODE_RANK": "0", "$MASTER_ADDR": "127.0.0.1"}
GPUS_PER_NODE = 8
# Tiny overrides for the commands that are really trained here (they produce the inputs of the
# latent example's later commands).
FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=false",
    "--data.batch_size=8",
    "--data.val_size=8",
]


@dataclass(frozen=True)
class Shown:
    """One command as the docs show it: where, its text, and its words (``None`` for a script)."""

    source: str
    text: str
    words: tuple[str, ...] | None

    @property
    def kind(self) -> str | None:
        w = self.words
        if w is None:
            return "slurm" if self.text.startswith("#!") and "\nsrun " in self.text else None
        if w[:2] == ("python", "-m") and w[2].startswith("example_projects."):
            return "example"
        if w[:3] == ("python", "-m", "pytest"):
            return "pytest"
        if w[:3] == ("python", "-m", "build"):
            return "build"
        if w[0] == "python" and w[1].endswith(".py"):
            return "script"
        if w[:2] == ("bash", "tools/lower_bounds.sh"):
            return "lower_bounds"
        return {"torchrun": "torchrun", "pip": "pip", "mkdocs": "mkdocs", "bash": "shell_script"}.get(w[0])


def _commands_in_block(block: str) -> Iterator[str]:
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield from line.split("&&")


def shown_commands() -> list[Shown]:
    """Every command in a ``bash`` block or an inline code span that starts like a command."""
    found = []
    for path in SOURCES:
        text, source = path.read_text(), str(path.relative_to(ROOT))
        for lang, block in FENCE.findall(text):
            if lang not in ("bash", "sh", "shell"):
                continue
            if block.startswith("#!"):
                found.append(Shown(source, block, None))
                continue
            for command in _commands_in_block(block):
                found.append(Shown(source, command.strip(), tuple(shlex.split(command, comments=True))))
        for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
            for command in span.split("&&"):
                if command.strip().startswith(INLINE_PREFIXES):
                    found.append(Shown(source, command.strip(), tuple(shlex.split(command))))
    unique = {c.words or c.text: c for c in reversed(found)}  # the first place a command is shown
    return list(reversed(unique.values()))


COMMANDS = shown_commands()


def _of_kind(kind: str) -> list[Any]:
    chosen = [c for c in COMMANDS if c.kind == kind]
    return [pytest.param(c, id=f"{c.source}:{c.text[:70]}") for c in chosen]


def test_every_command_shown_in_the_docs_has_a_check():
    unchecked = [f"{c.source}: {c.text}" for c in COMMANDS if c.kind is None]
    assert not unchecked, "give these documented commands a check in this file: " + "; ".join(unchecked)
    kinds = {c.kind for c in COMMANDS}
    expected = {"example", "torchrun", "slurm", "script", "pip", "pytest", "mkdocs", "shell_script"}
    assert expected | {"lower_bounds"} <= kinds


# --- python -m example_projects.<name> ... : dry runs -------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory like a fresh checkout's root, holding the latent example's stage outputs.

    The latent stage-2 commands read ``runs/latent_autoencoder/last.ckpt`` (stage 1's output) and the
    fine-tune command ``runs/latent_diffusion/last.ckpt`` (stage 2's): both are produced here by the
    documented stage-1 and stage-2 quickstart commands themselves, trained for 2 steps.
    """
    work = tmp_path_factory.mktemp("checkout")
    (work / "example_projects").symlink_to(ROOT / "example_projects")
    stages = [
        "python -m example_projects.latent_diffusion fit --config "
        "example_projects/latent_diffusion/configs/autoencoder_quickstart.yaml",
        "python -m example_projects.latent_diffusion fit --config "
        "example_projects/latent_diffusion/configs/quickstart.yaml --config "
        "example_projects/latent_diffusion/configs/immiscible.yaml",
    ]
    shown = {c.text for c in COMMANDS}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(sys, "argv", ["cli"])
        for stage in stages:
            assert stage in shown, f"the latent README no longer shows {stage!r}; update this fixture"
            words = shlex.split(stage)
            # stage 1 validates once (it measures the latent scaling factor there); stage 2 need not
            no_val = [] if "autoencoder" in stage else ["--trainer.limit_val_batches=0"]
            importlib.import_module(words[2]).cli_main([*words[3:], *FAST, *no_val])
    assert (work / "runs/latent_autoencoder/last.ckpt").is_file()
    assert (work / "runs/latent_diffusion/last.ckpt").is_file()
    return work


def _expand(word: str, example: str) -> str:
    word = PLACEHOLDERS.get(word, word)
    return word.replace(".../", f"example_projects/{example}/configs/")


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last one wins)."""
    value = None
    for i, word in enumerate(argv):
        if word == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(f"--{name}="):
            value = word.split("=", 1)[1]
    return value


class _FakeVAE(nn.Module):
    """Stands in for diffusers' ``AutoencoderKL`` (the Hub download needs a network): 8x down/up."""

    class config:  # mirrors diffusers' attribute name
        scaling_factor = 0.18215

    def encode(self, x: Tensor) -> Any:
        mean = F.avg_pool2d(x, 8).repeat(1, 4, 1, 1)[:, :4]
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mean))

    def decode(self, z: Tensor) -> Any:
        return SimpleNamespace(sample=F.interpolate(z[:, :3], scale_factor=8))


def dry_run(words: tuple[str, ...], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list]:
    """Runs ``python -m example_projects.<name> <subcommand> ...`` with the Trainer's work recorded.

    Returns:
        The LightningCLI object and the recorded ``(subcommand, trainer, kwargs)`` calls.
    """
    assert words[:2] == ("python", "-m"), words
    example = words[2].split(".")[1]
    argv = [_expand(w, example) for w in words[3:]]
    calls: list[tuple[str, L.Trainer, dict]] = []
    for name in ("fit", "validate", "test", "predict"):
        original = getattr(L.Trainer, name)

        @functools.wraps(original)  # the CLI reads the subcommand's arguments from the signature
        def record(self: L.Trainer, *args: Any, _name: str = name, **kwargs: Any) -> None:
            calls.append((_name, self, kwargs))

        monkeypatch.setattr(L.Trainer, name, record)
    hub_ids: list[str] = []

    def fake_hub(path: str, subfolder: str | None) -> _FakeVAE:
        hub_ids.append(path)
        return _FakeVAE()

    monkeypatch.setattr("example_projects.latent_diffusion.codecs.load_diffusers_vae", fake_hub)
    _simulate_gpu_node(monkeypatch)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["cli"])
    cli = importlib.import_module(words[2]).cli_main(argv)
    if _flag(argv, "model.init_args.autoencoder_kind") == "diffusers":
        assert hub_ids == [_flag(argv, "model.init_args.autoencoder_path")]
    _check_call(argv, cli, calls)
    return cli, calls


def _simulate_gpu_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine the docs' commands target: 8 CUDA GPUs per node (nothing runs on them here)."""
    for module in ("lightning.fabric.accelerators.cuda", "lightning.pytorch.accelerators.cuda"):
        monkeypatch.setattr(f"{module}.num_cuda_devices", lambda: GPUS_PER_NODE)


def _check_call(argv: list[str], cli: Any, calls: list) -> None:
    assert [c[0] for c in calls] == [argv[0]], "the documented subcommand runs, once"
    _, trainer, kwargs = calls[0]
    assert trainer is cli.trainer and kwargs["model"] is cli.model
    assert kwargs["datamodule"] is cli.datamodule
    assert kwargs.get("ckpt_path") == _flag(argv, "ckpt_path")
    if (nodes := _flag(argv, "trainer.num_nodes")) is not None:
        assert trainer.num_nodes == int(nodes)
    if (devices := _flag(argv, "trainer.devices")) is not None:
        assert trainer.num_devices == int(devices)
    if (batches := _flag(argv, "trainer.accumulate_grad_batches")) is not None:
        assert trainer.accumulate_grad_batches == int(batches)
    for flag, attr in [("data.batch_size", "batch_size"), ("data.root", "root")]:
        if (value := _flag(argv, flag)) is not None:
            assert str(getattr(cli.datamodule, attr)) == value
    coupling = [cb for cb in trainer.callbacks if type(cb).__name__ == "ImmiscibleCoupling"]
    if any(w.endswith("immiscible.yaml") for w in argv):
        assert [cb.spec.method for cb in coupling] == ["lsa"]
    if (scope := _flag(argv, "trainer.callbacks.init_args.scope")) is not None:
        assert [cb.scope for cb in coupling] == [scope]


def dry_run_compare(words: tuple[str, ...], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m example_projects.flow_matching compare ...``: both arms build, each with its coupling."""
    from example_projects.flow_matching.__main__ import fit_cli
    from example_projects.flow_matching.compare import ARMS, build_arms

    assert words[2] == "example_projects.flow_matching", words
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["cli"])
    out, arms = build_arms(list(words[4:]), fit_cli)
    assert out == Path("runs/flow_compare")  # the folder the README names
    assert [a.name for a in arms] == list(ARMS) == ["independent", "ot"]
    couplings = [
        [cb.spec for cb in a.cli.trainer.callbacks if type(cb).__name__ == "ImmiscibleCoupling"] for a in arms
    ]
    assert [(c.method, c.metric) for [c] in couplings] == [("none", "l2"), ("lsa", "sqeuclidean")]
    assert arms[0].cli.trainer.max_steps == arms[1].cli.trainer.max_steps > 0
    assert arms[0].cli.config.seed_everything == arms[1].cli.config.seed_everything


@pytest.mark.parametrize("shown", _of_kind("example"))
def test_documented_example_command_dry_run(shown: Shown, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    if shown.words[3:4] == ("compare",):
        dry_run_compare(shown.words, workdir, monkeypatch)
        return
    dry_run(shown.words, workdir, monkeypatch)


# --- launchers ------------------------------------------------------------------------------------------


def _inner_module_command(words: list[str]) -> tuple[str, ...]:
    """``... -m example_projects.x fit ...`` -> ``python -m example_projects.x fit ...``."""
    at = words.index("-m")
    return ("python", *words[at:])


@pytest.mark.parametrize("shown", _of_kind("torchrun"))
def test_documented_torchrun_command(shown: Shown, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    from torch.distributed.run import get_args_parser

    words = [PLACEHOLDERS.get(w, w) for w in shown.words[1:]]
    launcher = get_args_parser().parse_args(words)
    assert launcher.module and launcher.training_script.startswith("example_projects.")
    cli, _ = dry_run(_inner_module_command(words), workdir, monkeypatch)
    assert cli.trainer.num_nodes == int(launcher.nnodes)
    assert cli.trainer.num_devices == int(launcher.nproc_per_node)


@pytest.mark.parametrize("shown", _of_kind("slurm"))
def test_documented_slurm_script(shown: Shown, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", shown.text, re.M))
    srun = re.sub(r"\\\n\s*", " ", shown.text).split("\nsrun ", 1)[1].splitlines()[0]
    cli, _ = dry_run(tuple(shlex.split(srun)), workdir, monkeypatch)
    assert cli.trainer.num_nodes == int(sbatch["nodes"])
    assert cli.trainer.num_devices == int(sbatch["ntasks-per-node"]) == int(sbatch["gres"].split(":")[-1])
    assert subprocess.run(["bash", "-n"], input=shown.text, text=True).returncode == 0


# --- scripts --------------------------------------------------------------------------------------------


def _script_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs_the_docs_cite(args: Any) -> list[Path]:
    outputs = [getattr(args, name, None) for name in ("out", "json", "render")]
    return [ROOT / str(p) for p in outputs if p is not None and str(p) != "OUTDIR"]


@pytest.mark.parametrize("shown", _of_kind("script"))
def test_documented_script_command_parses(shown: Shown, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script, argv = shown.words[1], list(shown.words[2:])
    module = _script_module(script)
    if script == "benchmarks/speedup.py":
        args = module.parse_args(argv)
        args.out = tmp_path / "speedup"  # the runs are built, not trained
        monkeypatch.setattr(sys, "argv", ["cli"])
        _simulate_gpu_node(monkeypatch)  # configs for GPU users (cifar10.yaml) build as on their node
        for method in args.methods:
            cli = module.build_cli(args, method, args.seeds[0], tmp_path / method)
            coupling = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ImmiscibleCoupling"]
            assert [cb.spec.method for cb in coupling] == [module.method_args(method)["method"]]
            assert cli.trainer.max_steps == args.max_steps
        return
    # The parsers refuse --device cuda where there is no GPU (test_cuda_commands_fail_clearly...).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    args = parser.parse_args(argv) if parser else module.parse_args(argv)
    for output in _outputs_the_docs_cite(args):
        assert output.exists(), f"{shown.text}: the docs cite {output}, which is not committed"


def test_cuda_commands_fail_clearly_without_a_gpu():
    """The CUDA-only commands the docs show stop at once here, saying why (this machine has no GPU)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA commands run for real (benchmarks/run_gpu.sh)")
    cuda = [c for c in _of_kind("script") if "cuda" in c.values[0].text]
    assert cuda, "the docs show the CUDA benchmark commands"
    for shown in [p.values[0] for p in cuda]:
        done = subprocess.run(
            [sys.executable, *shown.words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120
        )  # fmt: skip
        assert done.returncode == 2 and "torch.cuda.is_available() is False" in done.stderr, shown.text


@pytest.mark.parametrize("shown", _of_kind("shell_script"))
def test_documented_shell_script_runs(shown: Shown, tmp_path: Path):
    assert shown.words[:2] == ("bash", "benchmarks/run_gpu.sh"), f"add a check for {shown.text}"
    out = tmp_path / "outdir"
    words = [str(out) if w == "OUTDIR" else w for w in shown.words]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = (out / "env.txt").read_text()
    assert f"torch {torch.__version__}" in recorded and "have scipy" in recorded
    log = (out / "assignment_cuda.txt").read_text()
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in log and "exit 2" in log


@pytest.mark.parametrize("shown", _of_kind("lower_bounds"))
def test_documented_lower_bound_command_is_accepted_and_ci_runs_the_default(shown: Shown):
    # Catches: a documented option the script rejects (exit 2) or a Python it cannot find, and the
    # floor run gone from .ci/run while the docs say CI runs it. The dry run installs nothing.
    words = ["bash", "tools/lower_bounds.sh", "--dry-run", *shown.words[2:]]
    done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, shown.text + "\n" + done.stdout + done.stderr
    assert done.stdout.startswith("lower_bounds: Python "), done.stdout
    if shown.words == ("bash", "tools/lower_bounds.sh"):
        assert "\nbash tools/lower_bounds.sh\n" in (ROOT / ".ci" / "run").read_text()


# --- install, test and build commands ------------------------------------------------------------------


def _declared_requirements() -> tuple[set[str], set[str]]:
    """The extras and the package names ``pyproject.toml`` declares (as pip sees them installed)."""
    extras = set(importlib.metadata.metadata("lightning-immiscible").get_all("Provides-Extra"))
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in _requirements()}
    return extras, names


def _requirements() -> list[str]:
    return importlib.metadata.requires("lightning-immiscible") or []


@pytest.mark.parametrize("shown", _of_kind("pip"))
def test_documented_pip_install_names_declared_extras_and_packages(shown: Shown):
    extras, packages = _declared_requirements()
    words = list(shown.words[2:])
    if words[0] == "-e" or words[0].startswith((".", "dist/")):
        target = words[-1]
        if target.startswith("dist/"):  # the wheel `python -m build` makes (tests/test_packaging.py)
            assert re.fullmatch(r"dist/lightning_immiscible-[\w.]+-py3-none-any\.whl", target), shown.text
            return
        assert target.startswith("."), shown.text
        named = re.findall(r"\[(.*)\]", target)
        assert not named or set(named[0].split(",")) <= extras, f"{shown.text}: extras are {sorted(extras)}"
        return
    for word in words:
        assert word.split("==")[0].lower() in packages, f"{shown.text}: {word} is not in pyproject.toml"


def test_ci_installs_the_test_extra_which_includes_the_examples_and_docs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest" in ci
    test_extra = [r for r in _requirements() if r.endswith('extra == "test"')]
    own = [r for r in test_extra if r.startswith("lightning-immiscible[")]
    extras = set(own[0].split("[", 1)[1].split("]", 1)[0].split(",")) if own else set()
    assert {"docs", "examples", "pot"} <= extras, test_extra  # the suite tests every optional solver


@pytest.mark.parametrize("shown", _of_kind("build"))
def test_documented_build_command_is_the_one_the_packaging_test_runs(shown: Shown):
    assert shown.words == ("python", "-m", "build"), shown.text
    assert '"-m", "build"' in (ROOT / "tests" / "test_packaging.py").read_text()


@pytest.mark.parametrize("shown", _of_kind("pytest"))
def test_documented_pytest_command_targets_existing_tests(shown: Shown):
    paths = [w for w in shown.words[3:] if not w.startswith("-")]
    for path in paths:
        assert (ROOT / path).is_file() and Path(path).parts[0] == "tests", shown.text


@pytest.mark.parametrize("shown", _of_kind("mkdocs"))
def test_documented_mkdocs_command_is_the_one_the_suite_builds(shown: Shown):
    assert shown.words[1:] == ("build", "--strict"), shown.text
    suite = (ROOT / "tests" / "test_site_html.py").read_text()
    assert '"mkdocs", "build", "--strict"' in suite
