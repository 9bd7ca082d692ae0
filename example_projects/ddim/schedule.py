"""DDPM noise schedules, the epsilon-prediction loss and the deterministic DDIM sampler.

References: Ho et al. 2020 (DDPM, linear betas, Eq. 4 and 14), Nichol & Dhariwal 2021 (cosine
schedule, Eq. 17), Song et al. 2021 (DDIM, Eq. 12 with eta = 0 and "linear" timestep selection).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from example_projects.common.training import check_prediction

#: ``model(x_t, t) -> eps``: ``(B, C, H, W)``, ``(B,)`` -> ``(B, C, H, W)``.
EpsModel = Callable[[Tensor, Tensor], Tensor]
SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str = "linear", num_timesteps: int = 1000) -> Tensor:
    """The ``(T,)`` float64 beta schedule.

    ``linear``: DDPM's 1e-4 .. 0.02 (scaled for T != 1000); ``cosine``: Nichol & Dhariwal's
    ``s = 0.008`` with betas clipped at 0.999.
    """
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")


def q_sample(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM Eq. 4).

    Args:
        x0: ``(B, *dims)`` data.
        noise: ``(B, *dims)`` the noise paired with each ``x0[i]`` (coupled or not).
        t: ``(B,)`` integer timesteps in ``[0, T)``.
        alphas_cumprod: ``(T,)`` cumulative products of ``1 - beta``.

    Returns:
        ``(B, *dims)`` noisy data ``x_t``.
    """
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def eps_loss(model: EpsModel, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The simple DDPM loss ``|| noise - model(x_t, t) ||^2`` (DDPM Eq. 14).

    The noise is an argument (k-diffusion style): the *same* tensor builds ``x_t`` and is the
    target, so a coupling that re-pairs noise with data changes both consistently.

    Args:
        model: The epsilon predictor.
        x0: ``(B, *dims)`` data.
        noise: ``(B, *dims)`` noise, ``noise[i]`` paired with ``x0[i]``.
        t: ``(B,)`` integer timesteps.
        alphas_cumprod: ``(T,)``.

    Returns:
        Scalar mean squared error.
    """
    x_t = q_sample(x0, noise, t, alphas_cumprod)
    return F.mse_loss(check_prediction(model(x_t, t), noise), noise)


def ddim_timesteps(num_steps: int, num_timesteps: int = 1000) -> Tensor:
    """DDIM's "linear" (uniform) timestep selection ``0, c, 2c, ...`` with ``c = T // S``.

    Returns:
        ``(S,)`` increasing integer timesteps; sampling walks them from the last to the first.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
    return torch.arange(0, num_timesteps, num_timesteps // num_steps)[:num_steps]


@torch.no_grad()
def ddim_sample(
    model: EpsModel,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int,
    clip: bool = True,
) -> Tensor:
    """Deterministic DDIM sampling (eta = 0, Song et al. 2021 Eq. 12).

    Args:
        model: The epsilon predictor.
        noise: ``(B, *dims)`` the starting ``x_T`` (draw it with an explicit generator for
            reproducible samples: the sampler itself uses no randomness).
        alphas_cumprod: ``(T,)``.
        num_steps: Number of denoising steps ``S``.
        clip: Clip the predicted ``x0`` to ``[-1, 1]`` at every step.

    Returns:
        ``(B, *dims)`` samples, in ``[-1, 1]`` when ``clip``.
    """
    abar = alphas_cumprod.to(noise.device, torch.float64)
    seq = ddim_timesteps(num_steps, abar.numel()).tolist()
    x = noise
    for i in reversed(range(len(seq))):
        t = torch.full((x.shape[0],), seq[i], device=x.device, dtype=torch.long)
        a_t = abar[seq[i]].item()
        a_prev = abar[seq[i - 1]].item() if i > 0 else 1.0
        eps = model(x, t).to(x.dtype)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x.clamp(-1, 1) if clip else x
