"""The distribution: ``python -m build`` makes an sdist and a wheel that pass ``twine check``, and the
wheel installs the library and nothing else.

A fresh virtual environment with torch and Lightning would download gigabytes, so the install test
creates a new environment that sees the test environment's site-packages through a ``.pth`` file (its
dependencies are already there; ``.pth`` files inside it, such as an editable install of this
repository, are not run) and installs the wheel with ``--no-deps --no-index``. The full
fresh-environment install is the release check in the docs' "What the tests guarantee" page.
"""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: no download of the build backend; the sdist is built first and the wheel from it,
    # so a file missing from the sdist breaks the wheel here.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    return out


def test_build_makes_an_sdist_and_a_wheel_that_pass_twine_check(dist: Path):
    files = sorted(p.name for p in dist.iterdir())
    assert [f for f in files if f.endswith(".whl")] and [f for f in files if f.endswith(".tar.gz")], files
    report = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()), cwd=dist)
    assert report.count("PASSED") == 2, report


def test_wheel_holds_the_library_only(dist: Path):
    # Catches packages.find picking up example_projects, tests or benchmarks again.
    (wheel,) = dist.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"lightning_immiscible", "lightning_immiscible-0.1.0.dist-info"}, tops
    assert "lightning_immiscible/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_wheel_installs_into_a_new_environment_and_imports(dist: Path, tmp_path: Path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (site / "test_env_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = set(os.listdir(site))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", wheel, cwd=tmp_path)
    added = set(os.listdir(site)) - before
    assert added == {"lightning_immiscible", "lightning_immiscible-0.1.0.dist-info"}, added
    # Run outside the clone: the package must come from the new environment, not the repository.
    code = (
        "import lightning_immiscible as li; from lightning_immiscible import ImmiscibleCoupling, couple;"
        "import torch; ImmiscibleCoupling(method='lsa');"
        "print(li.__file__); print(couple(torch.zeros(4, 3), torch.randn(4, 3)).noise.shape)"
    )
    out = run(python, "-c", code, cwd=tmp_path).splitlines()
    assert out[0].startswith(str(site)), out
    assert out[1] == "torch.Size([4, 3])", out
