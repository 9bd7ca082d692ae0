"""``compare``: independent pairs and OT pairs trained on the same seed, FID side by side, one PNG.

    python -m example_projects.flow_matching compare \
        --config example_projects/flow_matching/configs/quickstart.yaml \
        --config example_projects/flow_matching/configs/compare.yaml

Each arm is the example's own ``fit`` (its LightningCLI, FID callback and samplers) with one coupling
overlay added after the given configs: ``baseline.yaml`` (independent pairs) and ``ot.yaml``
(minibatch optimal transport). Both arms run with the same seed, so they start from the same weights,
read the data in the same order and draw the same noise; only the pairing differs. Every other
argument goes to both fits unchanged (``--trainer.max_steps=300``...). ``--out DIR`` (default
``runs/flow_compare``) holds both arms' logs and checkpoints, ``compare.png``, ``compare.md`` and
``compare.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from example_projects.flow_matching.callbacks import FlowMatchingFID
from example_projects.flow_matching.samplers import parse_sampler_spec

CONFIGS = Path(__file__).resolve().parent / "configs"
#: Arm name -> its coupling overlay. The first arm is the reference of the differences.
ARMS: dict[str, str] = {"independent": "baseline.yaml", "ot": "ot.yaml"}
ARM_TITLES = {"independent": "independent pairs", "ot": "OT pairs"}
#: Euler step counts shown in the PNG (the few-step regime where the pairing matters).
PICTURE_STEPS = (1, 2)


class FIDHistory(L.Callback):
    """Keeps every evaluation's FID values: ``rows[i] = {"step": s, "val/fid...": value}``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fids = {k: float(v) for k, v in trainer.callback_metrics.items() if "/fid" in k}
        if fids:
            self.rows.append({"step": trainer.global_step, **fids})


@dataclass
class Arm:
    """One trained arm: its CLI (model, trainer) and its FID curve."""

    name: str
    cli: Any
    history: FIDHistory = field(default_factory=FIDHistory)

    @property
    def log_dir(self) -> Path:
        """The arm's log folder (metrics CSV, grids)."""
        trainer = self.cli.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    @property
    def checkpoint(self) -> str:
        """The arm's last checkpoint ("" when checkpointing is off)."""
        ckpt = self.cli.trainer.checkpoint_callback
        return getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "") or ""


def split_out(args: Sequence[str], default: str = "runs/flow_compare") -> tuple[Path, list[str]]:
    """Takes ``--out DIR`` / ``--out=DIR`` out of ``args``; returns the folder and the other args."""
    rest, out, it = [], default, iter(args)
    for word in it:
        if word == "--out":
            out = next(it, None) or _missing_out()
        elif word.startswith("--out="):
            out = word.split("=", 1)[1] or _missing_out()
        else:
            rest.append(word)
    return Path(out), rest


def _missing_out() -> str:
    raise ValueError("--out needs a folder, e.g. --out runs/flow_compare.")


def arm_args(arm: str, out: Path, args: Sequence[str]) -> list[str]:
    """The ``fit`` arguments of one arm: the given ones, its coupling overlay, its own folder."""
    return [
        *args,
        "--config",
        str(CONFIGS / ARMS[arm]),
        f"--trainer.default_root_dir={out / arm}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={arm}",
    ]


def build_arm(name: str, out: Path, args: Sequence[str], cli_factory: Callable[..., Any]) -> Arm:
    """Builds (does not train) one arm's CLI; LightningCLI seeds everything as it builds it."""
    arm = Arm(name, cli_factory(arm_args(name, out, args), run=False))
    arm.cli.trainer.callbacks.append(arm.history)
    return arm


def build_arms(args: Sequence[str], cli_factory: Callable[..., Any]) -> tuple[Path, list[Arm]]:
    """Builds (does not train) both arms' CLIs; returns the output folder and the arms."""
    out, rest = split_out(args)
    return out, [build_arm(name, out, rest, cli_factory) for name in ARMS]


def fid_specs(arm: Arm) -> list[tuple[str, str]]:
    """``(spec, metric key)`` of the arm's Euler FID evaluations, in the configured order."""
    callback = next(cb for cb in arm.cli.trainer.callbacks if isinstance(cb, FlowMatchingFID))
    last = arm.history.rows[-1] if arm.history.rows else {}
    keys = {key.rsplit("_", 1)[1]: key for key in last if key.startswith("val/fid")}
    return [(s, keys[s]) for s in callback.samplers if parse_sampler_spec(s)[0] == "euler" and s in keys]


def table(arms: list[Arm]) -> str:
    """Markdown table of the last evaluation: FID per Euler spec per arm, and the difference."""
    ref, other = arms
    head = f"| Euler steps | {ARM_TITLES[ref.name]} | {ARM_TITLES[other.name]} | difference | change |"
    lines = [f"FID after {ref.history.rows[-1]['step']} training steps (lower is better):", "", head]
    lines.append("|---:|---:|---:|---:|---:|")
    for spec, key in fid_specs(ref):
        a, b = ref.history.rows[-1][key], other.history.rows[-1][key]
        change = f"{100 * (b - a) / a:+.0f} %" if a else "-"
        lines.append(f"| {parse_sampler_spec(spec)[1]} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {change} |")
    return "\n".join(lines)


def history_table(arms: list[Arm]) -> str:
    """Markdown table of every evaluation: one row per training step, FID per arm and spec."""
    specs = fid_specs(arms[0])
    cols = [f"{ARM_TITLES[a.name]}, {s}" for s in (s for s, _ in specs) for a in arms]
    lines = ["| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for rows in zip(*(a.history.rows for a in arms), strict=False):
        cells = [f"{r[key]:.3f}" for _, key in specs for r in rows]
        lines.append(f"| {rows[0]['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def picture(arms: list[Arm], path: Path, num_images: int = 16, seed: int = 0) -> Path:
    """One PNG: each arm's samples from the same starting noise at 1 and 2 Euler steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from example_projects.common.grids import make_grid

    model = arms[0].cli.model
    noise = torch.randn((num_images, *model.sample_shape()), generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(
        len(PICTURE_STEPS), len(arms), figsize=(3.2 * len(arms), 3.4 * len(PICTURE_STEPS)), squeeze=False
    )
    for i, steps in enumerate(PICTURE_STEPS):
        for j, arm in enumerate(arms):
            images = arm.cli.model.sample(noise.to(arm.cli.model.device), steps=steps, sampler="euler")
            axes[i][j].imshow(make_grid(images, nrow=4).permute(1, 2, 0).numpy())
            axes[i][j].set_title(f"{ARM_TITLES[arm.name]}, {steps} Euler step{'s' * (steps > 1)}", fontsize=9)
            axes[i][j].axis("off")
    fig.suptitle("Same starting noise in every panel", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@rank_zero_only
def say(text: str) -> None:
    """The command's report on the terminal (once, on rank 0)."""
    print(text, flush=True)


def report(out: Path, arms: list[Arm], args: Sequence[str]) -> dict[str, Any]:
    """Writes ``compare.md``, ``compare.json`` and ``compare.png`` under ``out``; prints the table."""
    png = picture(arms, out / "compare.png")
    text = table(arms)
    md = out / "compare.md"
    md.write_text(f"{text}\n\nEvery evaluation:\n\n{history_table(arms)}\n")
    runs = {a.name: {"curve": a.history.rows, "log_dir": str(a.log_dir), "checkpoint": a.checkpoint}
            for a in arms}  # fmt: skip
    js = out / "compare.json"
    js.write_text(json.dumps({"args": list(args), "arms": runs}, indent=2))
    files = [f"  samples, both arms, 1 and 2 Euler steps: {png}", f"  this table and every evaluation: {md}"]
    files += [f"  FID curves (JSON): {js}"]
    files += [f"  {ARM_TITLES[a.name]}: logs {a.log_dir}, checkpoint {a.checkpoint or '-'}" for a in arms]
    say("\n" + text + "\n\nFiles:\n" + "\n".join(files))
    return {"table": text, "png": png, "markdown": md, "json": js, "arms": runs}


def compare(args: Sequence[str], cli_factory: Callable[..., Any]) -> dict[str, Any]:
    """Trains both arms one after the other, then reports (see the module docstring)."""
    out, rest = split_out(args)
    arms = []
    for name in ARMS:
        say(f"\n=== Arm '{name}' ({ARM_TITLES[name]}, overlay {ARMS[name]}) ===")
        # Built right before it trains: the seed is set again, so both arms start from the same weights
        # (drawn from the global random state), not from the state the first arm's training left; the
        # data order and training times come from streams seeded from the same run seed.
        arm = build_arm(name, out, rest, cli_factory)
        arm.cli.trainer.fit(arm.cli.model, datamodule=arm.cli.datamodule)
        arms.append(arm)
        if not arm.history.rows:
            raise RuntimeError(
                f"Arm '{arm.name}' finished without an FID evaluation: set trainer.val_check_interval "
                "(or check_val_every_n_epoch) so that at least one evaluation runs."
            )
    return report(out, arms, args)
