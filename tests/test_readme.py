"""The README's Python examples run as written, and its quickstart matches .ci/run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)


def test_readme_has_exactly_two_quickstart_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    assert len(commands) == 2 and all(c.count("\n") == 1 for c in commands)
    main_job = 'pip install -e ".[examples]" && python -m example_projects.flow_matching compare'
    assert commands[0].startswith(main_job)
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()
    for config in re.findall(r"--config (\S+)", commands[0]):
        assert (ROOT / config).is_file(), config
