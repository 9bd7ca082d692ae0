"""Evaluation of the 2-D template: exact W2 at few Euler steps, path straightness, a picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from example_projects.flow_matching.metrics2d import path_straightness, w2_exact
from example_projects.flow_matching.targets2d import gaussian, sample_target


class Toy2DEval(L.Callback):
    """After each validation epoch: ``toy/w2_euler{k}``, and ``toy/straightness``.

    The generated samples start from a fixed noise sample and are compared with a fixed target
    sample of the same size by an exact assignment (see
    [w2_exact][example_projects.flow_matching.metrics2d.w2_exact]); ``toy/w2_floor`` is the W2
    between two independent target samples of that size, the value a perfect model would get.
    Straightness is measured on ``path_steps``-step Euler paths. A PNG (target and samples at the
    fewest steps, trajectories) goes to ``{log_dir}/toy2d/step{global_step:07d}.png`` and
    ``latest.png``.

    Args:
        euler_steps: Euler step counts for W2.
        num_samples: Points in the fixed generated and target samples (>= 1,000 for a useful W2).
        path_steps: Euler steps of the paths used for straightness and the trajectory plot.
        num_paths: Trajectories drawn in the plot.
        seed: Seed of the fixed samples.
        plot: Write the PNG.
    """

    def __init__(
        self,
        euler_steps: Sequence[int] = (1, 2, 4),
        num_samples: int = 1024,
        path_steps: int = 32,
        num_paths: int = 256,
        seed: int = 1234,
        plot: bool = True,
    ) -> None:
        if not euler_steps or any(int(s) < 1 for s in euler_steps) or num_samples < 2:
            raise ValueError(
                f"euler_steps must be positive and num_samples >= 2, got {euler_steps}, {num_samples}."
            )
        self.euler_steps = [int(s) for s in euler_steps]
        self.num_samples, self.path_steps, self.num_paths = num_samples, path_steps, num_paths
        self.seed, self.plot = seed, plot
        self.last: dict[str, float] = {}
        self.latest: Path | None = None

    def fixed_samples(self, target: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(noise, target, second target)``, each ``(num_samples, 2)``, the same every call."""
        g = torch.Generator().manual_seed(self.seed)
        return (
            gaussian(self.num_samples, g),
            sample_target(target, self.num_samples, g),
            sample_target(target, self.num_samples, g),
        )

    def evaluate(self, pl_module: Any, target: str) -> tuple[dict[str, float], dict[int, Tensor], Tensor]:
        """Metrics, the samples per Euler step count and the ``(path_steps + 1, n, 2)`` paths."""
        noise, ref, ref2 = self.fixed_samples(target)
        noise = noise.to(pl_module.device)
        metrics, samples = {"toy/w2_floor": w2_exact(ref, ref2)}, {}
        for steps in self.euler_steps:
            samples[steps] = pl_module.sample(noise, steps).cpu()
            metrics[f"toy/w2_euler{steps}"] = w2_exact(samples[steps], ref)
        path = pl_module.sample(noise, self.path_steps, return_path=True).cpu()
        metrics["toy/straightness"] = path_straightness(path)
        return metrics, samples, path

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        target = getattr(trainer.datamodule, "target", "8gaussians")
        metrics, samples, path = self.evaluate(pl_module, target)
        self.last = metrics
        for name, value in metrics.items():
            pl_module.log(name, value)
        if self.plot:
            self._plot(trainer, samples, path, self.fixed_samples(target)[1])

    @rank_zero_only
    def _plot(self, trainer: L.Trainer, samples: dict[int, Tensor], path: Tensor, ref: Tensor) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir) / "toy2d"
        out.mkdir(parents=True, exist_ok=True)
        title = f"step {trainer.global_step}: " + ", ".join(
            f"W2 euler{k} {v:.3f}" for k, v in ((k, self.last[f"toy/w2_euler{k}"]) for k in self.euler_steps)
        )
        fig = plot_toy2d(samples, path[:, : self.num_paths], ref, title)
        for name in (f"step{trainer.global_step:07d}.png", "latest.png"):
            fig.savefig(out / name, dpi=80)
        self.latest = out / "latest.png"
        import matplotlib.pyplot as plt

        plt.close(fig)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))


def plot_toy2d(samples: dict[int, Tensor], path: Tensor, ref: Tensor, title: str = "") -> Any:
    """A figure: the target against samples at each step count, and trajectories.

    Args:
        samples: Step count -> ``(n, 2)`` generated points.
        path: ``(K + 1, m, 2)`` trajectories from noise (index 0) to samples (index K).
        ref: ``(n, 2)`` target points.
        title: Figure title.

    Returns:
        A matplotlib ``Figure`` (Agg backend; close it after saving).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples) + 1, figsize=(3.2 * (len(samples) + 1), 3.4))
    for ax, (steps, points) in zip(axes, samples.items(), strict=False):
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="target")
        ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", label=f"euler{steps}")
        ax.set_title(f"{steps} Euler step{'s' if steps > 1 else ''}", fontsize=9)
    ax = axes[-1]
    ax.plot(path[:, :, 0].numpy(), path[:, :, 1].numpy(), c="olive", alpha=0.25, lw=0.5)
    ax.scatter(path[0, :, 0], path[0, :, 1], s=2, c="k", label="noise")
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=2, c="tab:blue", label="sample")
    ax.set_title(f"trajectories ({path.shape[0] - 1} steps)", fontsize=9)
    lim = float(max(ref.abs().max(), 3.0)) * 1.15
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
