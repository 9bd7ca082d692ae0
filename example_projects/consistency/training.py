"""Consistency training (CT, no teacher) with the improvements of iCT, as short pure functions.

References:
    Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023 (CM): Algorithm 3 (CT),
    the boundary-condition parameterisation (Appendix C) and multistep sampling (Algorithm 1).
    Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (iCT): the
    pseudo-Huber metric (Sec. 3.3), the exponential discretisation curriculum (Eq. 5), the lognormal
    noise schedule (Eq. 6), the weighting 1 / (sigma_{i+1} - sigma_i) (Sec. 3.1) and no EMA teacher.

The loss takes the noise as an argument (k-diffusion style): one tensor ``noise`` builds both the
student input ``x0 + sigma_{i+1} noise`` and the target input ``x0 + sigma_i noise``, so a coupling
that re-pairs the noise with the data (Immiscible Diffusion) changes both consistently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: ``denoiser(x, sigma) -> x0_hat``: ``(B, *dims)``, ``(B,)`` -> ``(B, *dims)``.
Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) discretisation ``sigma_1 < ... < sigma_N`` (CM Sec. 5, iCT Eq. 4).

    Args:
        num: Number of noise levels ``N >= 2``.
        sigma_min: Smallest level (``epsilon`` in CM).
        sigma_max: Largest level (``T``).
        rho: Warping exponent (7).

    Returns:
        ``(N,)`` float64, increasing, from ``sigma_min`` to ``sigma_max``.
    """
    if num < 2:
        raise ValueError(f"A discretisation needs at least 2 noise levels, got {num}.")
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def discretisation_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Curriculum of iCT (Eq. 5): ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` noise levels at step k.

    ``K' = floor(K / (log2(floor(s1 / s0)) + 1))``: the number of levels doubles every ``K'`` steps, from
    ``s0 + 1`` at ``k = 0`` to ``s1 + 1`` for the last ``K'`` steps (at least 1 step per stage).

    Args:
        step: Training step ``k >= 0``.
        total_steps: Total training steps ``K``.
        s0: Initial discretisation steps (10).
        s1: Final discretisation steps (1280).

    Returns:
        The number of noise levels ``N(k)`` (``s0 + 1 <= N <= s1 + 1``).
    """
    if s0 < 1 or s1 < s0:
        raise ValueError(f"Need 1 <= s0 <= s1, got s0={s0}, s1={s1}.")
    stage = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    doublings = min(max(step, 0) // stage, 62)  # 2**62 is past any s1; avoids huge ints
    return min(s0 * 2**doublings, s1) + 1


def lognormal_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """The lognormal schedule of iCT over the pairs ``(sigma_i, sigma_{i+1})`` (iCT Eq. 6).

    ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - ...) / ...)``.

    Args:
        sigmas: ``(N,)`` increasing noise levels.
        p_mean: Mean of ``ln sigma`` (-1.1).
        p_std: Standard deviation of ``ln sigma`` (2.0).

    Returns:
        ``(N - 1,)`` float64 probabilities summing to 1.
    """
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def sample_pairs(
    sigmas: Tensor,
    batch: int,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draws adjacent noise levels ``(sigma_i, sigma_{i+1})`` per item from the lognormal schedule.

    Args:
        sigmas: ``(N,)`` increasing noise levels (on the CPU).
        batch: Items ``B``.
        p_mean: See :func:`lognormal_index_probs`.
        p_std: See :func:`lognormal_index_probs`.
        generator: CPU generator (``None``: the global RNG, seeded by ``seed_everything``).

    Returns:
        ``(B,)`` float64 ``sigma_i`` and ``(B,)`` float64 ``sigma_{i+1}``.
    """
    probs = lognormal_index_probs(sigmas, p_mean, p_std)
    index = torch.multinomial(probs, batch, replacement=True, generator=generator)
    return sigmas[index], sigmas[index + 1]


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance ``sqrt(||x - y||^2 + c^2) - c`` per item (iCT Eq. 3).

    Args:
        x: ``(B, *dims)``.
        y: ``(B, *dims)``.
        c: Scale (iCT: ``0.00054 * sqrt(d)``, ``d`` = values per item).

    Returns:
        ``(B,)`` distances.
    """
    sq = (x - y).flatten(1).square().sum(1)
    return (sq + c * c).sqrt() - c


def huber_c(item_shape: tuple[int, ...]) -> float:
    """The pseudo-Huber scale of iCT, ``c = 0.00054 * sqrt(d)`` for items of shape ``item_shape``."""
    return 0.00054 * math.sqrt(math.prod(item_shape))


def _view(sigma: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` in ``like``'s dtype and device."""
    return sigma.to(like).view(-1, *([1] * (like.dim() - 1)))


def consistency_loss(
    denoiser: Denoiser, x0: Tensor, noise: Tensor, sigma: Tensor, sigma_next: Tensor, c: float
) -> Tensor:
    """Loss ``E[lambda(sigma_i) d(f(x0 + sigma_{i+1} z, sigma_{i+1}), sg f(x0 + sigma_i z, sigma_i))]``.

    The target is the same network under stop-gradient (no EMA teacher, iCT Sec. 3.2), run first
    in a forked RNG so that student and target see the same dropout masks (iCT Sec. 3.1).

    Args:
        denoiser: The consistency function ``f(x, sigma)``.
        x0: ``(B, *dims)`` data.
        noise: ``(B, *dims)`` noise ``z``; ``noise[i]`` is paired with ``x0[i]`` (coupled or not).
            The same tensor builds the student's and the target's input.
        sigma: ``(B,)`` levels ``sigma_i``.
        sigma_next: ``(B,)`` levels ``sigma_{i+1} > sigma_i``.
        c: Pseudo-Huber scale.

    Returns:
        Scalar weighted loss, with weights ``1 / (sigma_{i+1} - sigma_i)``.
    """
    devices = [x0.device] if x0.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        target = denoiser(x0 + _view(sigma, x0) * noise, sigma.to(x0))
    student = denoiser(x0 + _view(sigma_next, x0) * noise, sigma_next.to(x0))
    weight = (1.0 / (sigma_next - sigma)).to(x0)
    return (weight * pseudo_huber(student, target.detach(), c)).mean()


def sampling_sigmas(
    steps: int, sigma_max: float = 80.0, mid_sigma: float = 0.821, rho: float = 7.0
) -> list[float]:
    """Noise levels of multistep consistency sampling (CM Algorithm 1), from ``sigma_max`` down.

    One step: ``[sigma_max]``. Two steps: ``[sigma_max, mid_sigma]`` (iCT's 0.821 for CIFAR-10).
    More steps: a Karras schedule of ``steps`` levels from ``sigma_max`` down to ``mid_sigma``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if steps == 1:
        return [sigma_max]
    return karras_sigmas(steps, mid_sigma, sigma_max, rho).flip(0).tolist()


@torch.no_grad()
def multistep_sample(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: list[float],
    sigma_min: float = 0.002,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling (CM Algorithm 1).

    Args:
        denoiser: The consistency function ``f(x, sigma)``.
        noise: ``(B, *dims)`` standard normal starting noise (``x_T = sigma_max * noise``).
        sigmas: Decreasing levels from :func:`sampling_sigmas` (``sigmas[0] = sigma_max``).
        sigma_min: The boundary level ``epsilon``.
        generator: CPU generator of the noise re-injected between steps.

    Returns:
        ``(B, *dims)`` samples clipped to ``[-1, 1]``.
    """
    ones = noise.new_ones(noise.shape[0])
    x = denoiser(sigmas[0] * noise, sigmas[0] * ones).clamp(-1, 1)
    for sigma in sigmas[1:]:
        z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
        x_t = x + math.sqrt(max(sigma**2 - sigma_min**2, 0.0)) * z
        x = denoiser(x_t, sigma * ones).clamp(-1, 1)
    return x
