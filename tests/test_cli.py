"""The callback's typed arguments on the real example CLI: listed by --help, checked at parse time."""

from __future__ import annotations

from pathlib import Path

import pytest

from example_projects.ddim.__main__ import cli_main

QUICK = str(Path(__file__).resolve().parents[1] / "example_projects/ddim/configs/quickstart.yaml")
CALLBACK = "lightning_immiscible.ImmiscibleCoupling"


def _flat(text: str) -> str:
    return " ".join(text.split())  # the help text wraps at spaces


def test_callback_help_lists_every_choice(capsys):
    # Catches: an argument typed `str` again (jsonargparse would print SOLVER-style metavars, not
    # the set of choices).
    with pytest.raises(SystemExit) as stopped:
        cli_main(["fit", "--trainer.callbacks.help", CALLBACK])
    assert stopped.value.code == 0
    out = _flat(capsys.readouterr().out)
    for listed in (
        "--trainer.callbacks.method {lsa,knn,flip,none}",
        "--trainer.callbacks.metric {l2,sqeuclidean,l1}",
        "--trainer.callbacks.precision {auto,fp32,bf16,fp16}",
        "Union[Literal['global', 'local', 'node', 'auto'], int]",
    ):
        assert listed in out


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("method", "lssa", "Literal['lsa', 'knn', 'flip', 'none']"),
        ("metric", "cosine", "Literal['l2', 'sqeuclidean', 'l1']"),
        ("precision", "fp8", "Literal['auto', 'fp32', 'bf16', 'fp16']"),
        ("scope", "cluster", "Literal['global', 'local', 'node', 'auto']"),
    ],
)
def test_a_wrong_value_in_a_yaml_overlay_fails_at_parse_time_naming_the_choices(
    tmp_path, capsys, key, value, choices
):
    # Catches: a typo accepted by the parser and only failing (or silently running) in the fit.
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        f"trainer:\n  callbacks:\n    - class_path: {CALLBACK}\n      init_args:\n        {key}: {value}\n"
    )
    with pytest.raises(SystemExit) as stopped:
        cli_main(["--config", QUICK, "--config", str(overlay)], run=False)  # parsing only
    assert stopped.value.code == 2
    err = _flat(capsys.readouterr().err)
    assert f'Parser key "{key}"' in err and choices in err and value in err
