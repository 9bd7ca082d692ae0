"""Immiscible Diffusion's data-noise coupling as pure functions (torch + NumPy/SciPy, no Lightning).

Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment", NeurIPS
2024, Algorithm 1: before noising a minibatch ``x0`` (B items), re-pair the B i.i.d. Gaussian noise
vectors with the data so that the total data-noise distance is minimal (a linear assignment).
The noise multiset is unchanged, so the batch of noise is still Gaussian.

Example::

    import torch
    from lightning_immiscible import couple

    x0 = torch.rand(64, 3, 32, 32) * 2 - 1
    res = couple(x0, torch.randn_like(x0), method="lsa", metric="l2")
    x_t = alpha * x0 + sigma * res.noise        # res.noise[i] is paired with x0[i]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_immiscible.solvers import solve

Method = Literal["lsa", "knn", "flip", "none"]
Metric = Literal["l2", "sqeuclidean", "l1"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

METHODS: tuple[str, ...] = ("lsa", "knn", "flip", "none")
METRICS: tuple[str, ...] = ("l2", "sqeuclidean", "l1")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CouplingInputError(ValueError, TypeError):
    """Invalid input to the coupling (NaN/Inf, integer tensors, mismatched shapes, ...).

    Subclasses both ``ValueError`` and ``TypeError``. ``reason`` is a short machine-readable key
    (one of :data:`INPUT_ERROR_REASONS`) that ranks exchange so all of them fail together.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


INPUT_ERROR_REASONS: tuple[str, ...] = (
    "invalid",
    "non_finite",
    "dtype",
    "shape",
    "no_tensor",
    "device",
    "empty",
    "exception",
    "out_of_step",
)


@dataclass(frozen=True)
class CouplingResult:
    """The outcome of :func:`couple`.

    Attributes:
        noise: ``(B, *dims)``, like ``x0``: ``noise[i]`` is the noise paired with ``x0[i]``.
        index: ``(B,)`` int64. For ``lsa``/``flip``/``none``: ``noise == input_noise[index]``.
            For ``knn``: ``index[i]`` is the candidate chosen for item ``i``.
        cost_before: Mean distance (in ``metric``) of the pairs before re-pairing: ``x0[i]`` with
            ``input_noise[i]`` (``knn``: with candidate 0).
        cost_after: Mean distance of the returned pairs ``x0[i]``, ``noise[i]``.
        cost_ms: Wall time of the cost matrix (including the device-to-host copy), ms.
        solve_ms: Wall time of the assignment solver, ms.
        method: The coupling method used.
        metric: The distance used for the costs.

    """

    noise: Tensor
    index: Tensor
    cost_before: float
    cost_after: float
    cost_ms: float = 0.0
    solve_ms: float = 0.0
    method: str = "lsa"
    metric: str = "l2"

    @property
    def assign_ms(self) -> float:
        """Total time of the coupling (cost matrix + solver), ms."""
        return self.cost_ms + self.solve_ms

    @property
    def reduction_pct(self) -> float:
        """Relative reduction of the mean pair distance, in percent (positive = closer pairs)."""
        if self.cost_before == 0 or not math.isfinite(self.cost_before - self.cost_after):
            return 0.0
        return 100.0 * (self.cost_before - self.cost_after) / self.cost_before


def check_inputs(x0: Tensor, noise: Tensor, method: str = "lsa", check_finite: bool = True) -> None:
    """Validates ``x0`` and ``noise`` for :func:`couple`.

    Args:
        x0: ``(B, *dims)`` floating-point data.
        noise: ``(B, *dims)``; for ``knn`` ``(B, k, *dims)``.
        method: One of :data:`METHODS`.
        check_finite: Whether to scan both tensors for NaN/Inf (one device sync).

    Raises:
        CouplingInputError: With a message that says what is wrong and how to fix it.

    """
    if method not in METHODS:
        raise CouplingInputError(f"Unknown method {method!r}; choose one of {METHODS}.", "invalid")
    for name, t in (("x0", x0), ("noise", noise)):
        if not isinstance(t, Tensor):
            raise CouplingInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.", "dtype")
        if not t.is_floating_point():
            raise CouplingInputError(
                f"{name} has dtype {t.dtype}; the coupling needs floating-point tensors. Convert it "
                f"(e.g. {name}.float(), images scaled as your model sees them) before coupling.",
                "dtype",
            )
        if t.ndim < 1:
            raise CouplingInputError(f"{name} must have a batch dimension, got a 0-d tensor.", "shape")
    expected = (x0.shape[0], noise.shape[1], *x0.shape[1:]) if method == "knn" else x0.shape
    if method == "knn" and noise.ndim != x0.ndim + 1:
        raise CouplingInputError(
            f"knn needs noise of shape (B, k, *x0.shape[1:]) = (B, k, {', '.join(map(str, x0.shape[1:]))}), "
            f"got {tuple(noise.shape)}.",
            "shape",
        )
    if tuple(noise.shape) != tuple(expected):
        raise CouplingInputError(
            f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)} "
            f"(expected {tuple(expected)} for method={method!r}).",
            "shape",
        )
    if x0.device != noise.device:
        raise CouplingInputError(f"x0 is on {x0.device} but noise is on {noise.device}.", "device")
    if check_finite:
        # The group coupling validates x0 alone as check_inputs(x0, x0): scan it once.
        for name, t in (("x0", x0),) if noise is x0 else (("x0", x0), ("noise", noise)):
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                raise CouplingInputError(
                    f"{name} contains {bad} NaN/Inf value(s) (shape {tuple(t.shape)}); fix the data "
                    "pipeline or the model output that produced it before coupling.",
                    "non_finite",
                )


#: Bound on a squared norm (or an l1 sum) below which fp32 costs are safe: fp32's largest value is
#: 3.4e38, and a cost adds two such terms.
FP32_COST_LIMIT = 1e37


def cost_dtype(x: Tensor, noise: Tensor, metric: str = "l2") -> torch.dtype:
    """The dtype in which the costs of ``x`` against ``noise`` are computed.

    float64 when either input is float64 (its precision is kept: near-identical rows stay apart)
    or when fp32 costs could overflow (entries so large that ``D * (max|x| + max|n|)^2``, or the
    ``l1`` sum, exceeds [FP32_COST_LIMIT][lightning_immiscible.coupling.FP32_COST_LIMIT]);
    float32 otherwise. Costs the inputs' largest magnitude (one reduction, one device sync).

    Args:
        x: ``(b, *dims)`` data.
        noise: ``(B, *dims)`` noise.
        metric: One of [METRICS][lightning_immiscible.coupling.METRICS].

    Returns:
        ``torch.float64`` or ``torch.float32``.

    """
    if torch.float64 in (x.dtype, noise.dtype):
        return torch.float64
    if not x.numel() or not noise.numel():
        return torch.float32
    dim = x[0].numel()
    reach = _largest_magnitude(x) + _largest_magnitude(noise)
    bound = dim * reach if metric == "l1" else dim * reach * reach
    return torch.float64 if bound > FP32_COST_LIMIT else torch.float32


def _largest_magnitude(t: Tensor) -> float:
    low, high = torch.aminmax(t.detach())  # no |t| temporary of the input's size
    return max(abs(float(low)), abs(float(high)))


def resolve_precision(precision: str, device: torch.device, base: torch.dtype = torch.float32) -> torch.dtype:
    """Maps a ``precision`` name to the dtype of the cost matrix's matmul inputs.

    ``auto`` is fp16 on CUDA (tensor cores; inputs are norm-scaled so fp16 cannot overflow) and
    the cost's own dtype ``base`` elsewhere (half-precision matmul is several times slower than
    fp32 on CPUs). float64 costs (float64 inputs) keep a float64 matmul under ``auto``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" and base == torch.float32 else base
    return _HALF.get(precision, torch.float32)


def _gram(x: Tensor, n: Tensor, dtype: torch.dtype) -> Tensor:
    """``x @ n.T`` in ``x``'s dtype ``(b, B)``; a narrower matmul ``dtype`` sees normalised rows.

    Each row is divided by its norm before the cast, so every reduced-precision product lies in
    [-1, 1] (no overflow, full mantissa used); the norms are multiplied back in the wide dtype.
    """
    if dtype == x.dtype:
        return x @ n.T
    tiny = torch.finfo(x.dtype).tiny
    xn = torch.linalg.vector_norm(x, dim=1).clamp_min(tiny)
    nn_ = torch.linalg.vector_norm(n, dim=1).clamp_min(tiny)
    unit = (x / xn[:, None]).to(dtype) @ (n / nn_[:, None]).to(dtype).T
    return unit.to(x.dtype) * xn[:, None] * nn_[None, :]


def cost_matrix(
    x: Tensor, noise: Tensor, metric: str = "l2", precision: str = "auto", dtype: torch.dtype | None = None
) -> Tensor:
    """Pairwise data-noise distances, never through a ``(b, B, D)`` broadcast tensor.

    ``l2`` and ``sqeuclidean`` use ``||x||^2 + ||n||^2 - 2 x.n`` (a GEMM), whose cancellation
    costs relative precision: in float32, items that differ by less than about 1e-3 of their norm
    are not told apart. Pass float64 tensors to cost such data in float64.

    Args:
        x: ``(b, *dims)`` data (any float dtype).
        noise: ``(B, *dims)`` noise.
        metric: ``l2`` (Euclidean), ``sqeuclidean`` or ``l1``.
        precision: Matmul input precision for ``l2``/``sqeuclidean`` (see
            [resolve_precision][lightning_immiscible.coupling.resolve_precision]); ``l1`` always
            uses ``torch.cdist`` in the cost's dtype (no tensor-core path exists for it).
        dtype: The cost's dtype; ``None`` chooses it with
            [cost_dtype][lightning_immiscible.coupling.cost_dtype] (float64 for float64 inputs or
            values large enough to overflow fp32, else float32). Ranks of a group pass the dtype
            they agreed on, so their rows can be gathered.

    Returns:
        ``(b, B)`` tensor of ``dtype`` on ``x``'s device: ``C[i, j] = metric(x[i], noise[j])``.

    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS}.")
    dtype = dtype or cost_dtype(x, noise, metric)
    xf = x.reshape(x.shape[0], -1).to(dtype)
    nf = noise.reshape(noise.shape[0], -1).to(dtype)
    if metric == "l1":
        return torch.cdist(xf, nf, p=1.0)
    # ||x||^2 and ||n||^2 in the cost's dtype: only the cross term sees a reduced precision.
    sq = xf.square().sum(1)[:, None] + nf.square().sum(1)[None, :]
    cost = (sq - 2.0 * _gram(xf, nf, resolve_precision(precision, x.device, dtype))).clamp_min_(0.0)
    return cost.sqrt_() if metric == "l2" else cost


def paired_distance(x: Tensor, noise: Tensor, metric: str = "l2") -> Tensor:
    """Distance of each pair ``(x[i], noise[i])``, from the differences (no cancellation).

    Args:
        x: ``(B, *dims)``.
        noise: ``(B, *dims)``.
        metric: One of [METRICS][lightning_immiscible.coupling.METRICS].

    Returns:
        ``(B,)`` distances in [cost_dtype][lightning_immiscible.coupling.cost_dtype] (float32, or
        float64 for float64 inputs and values whose fp32 distance would overflow).

    """
    dtype = cost_dtype(x, noise, metric)
    diff = (x.to(dtype) - noise.to(dtype)).reshape(x.shape[0], -1)
    if metric == "l1":
        return diff.abs().sum(1)
    sq = diff.square().sum(1)
    return sq.sqrt() if metric == "l2" else sq


def _mean(t: Tensor) -> float:
    return float(t.mean()) if t.numel() else 0.0


def _timed_cost(x0: Tensor, target: Tensor, metric: str, precision: str) -> tuple[Tensor, float]:
    start = time.perf_counter()
    cost = cost_matrix(x0, target, metric, precision).cpu()
    return cost, (time.perf_counter() - start) * 1e3


def _timed_solve(cost: Tensor, solver: str, device: torch.device) -> tuple[Tensor, float]:
    start = time.perf_counter()
    col = solve(cost.double().numpy(), solver)
    return torch.from_numpy(col).to(device), (time.perf_counter() - start) * 1e3


def _couple_knn(x0: Tensor, noise: Tensor, metric: str) -> CouplingResult:
    """Per item, keeps the nearest of its k candidates (no cross-item matching)."""
    start = time.perf_counter()
    b, k = noise.shape[:2]
    flat_x = x0.reshape(b, 1, -1).float()
    diff = flat_x - noise.reshape(b, k, -1).float()  # (B, k, D): the size of the noise itself
    if metric == "l1":
        dist = diff.abs().sum(-1)
    else:
        dist = diff.square().sum(-1)
        dist = dist.sqrt() if metric == "l2" else dist
    index = dist.argmin(1)
    chosen = noise[torch.arange(b, device=noise.device), index]
    ms = (time.perf_counter() - start) * 1e3
    before, after = _mean(dist[:, 0]), _mean(dist.gather(1, index[:, None]))
    return CouplingResult(chosen, index, before, after, ms, 0.0, "knn", metric)


def couple(
    x0: Tensor,
    noise: Tensor,
    *,
    method: Method | str = "lsa",
    metric: Metric | str = "l2",
    precision: Precision | str = "auto",
    solver: str = "auto",
    check_finite: bool = True,
) -> CouplingResult:
    """Re-pairs ``noise`` with ``x0`` (Immiscible Diffusion, Li et al. 2024, Algorithm 1).

    Args:
        x0: ``(B, *dims)`` floating-point data batch (images, latents, any shape).
        noise: ``(B, *dims)`` i.i.d. Gaussian noise; for ``method="knn"`` ``(B, k, *dims)``
            candidates per item.
        method: ``lsa`` (the paper: exact assignment minimising the total distance), ``knn``
            (nearest of k candidates per item), ``flip`` (the paper's non-OT ablation: assign
            against ``-noise``, diffuse with ``noise``), ``none`` (identity, the baseline).
        metric: ``l2`` (the paper's), ``sqeuclidean`` or ``l1``.
        precision: Cost-matrix matmul precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``,
            ``bf16``, ``fp16``. The costs themselves are float32, or float64 for float64 inputs
            (``auto`` then keeps a float64 matmul) and for values so large that fp32 costs would
            overflow (see [cost_dtype][lightning_immiscible.coupling.cost_dtype]).
        solver: Assignment solver name (``auto`` = fastest installed exact solver), see
            :mod:`lightning_immiscible.solvers`.
        check_finite: Scan inputs for NaN/Inf first (recommended; costs one device sync).

    Returns:
        A :class:`CouplingResult`; ``result.noise`` is on ``x0``'s device with ``noise``'s dtype.

    Raises:
        CouplingInputError: For NaN/Inf, non-float tensors or mismatched shapes.

    """
    check_inputs(x0, noise, method, check_finite)
    b = x0.shape[0]
    if method == "knn":
        return _couple_knn(x0, noise, metric)
    before = paired_distance(x0, noise, metric) if b else x0.new_zeros(0)
    if method == "none" or b <= 1:
        index = torch.arange(b, device=x0.device)
        return CouplingResult(noise, index, _mean(before), _mean(before), method=method, metric=metric)
    cost, cost_ms = _timed_cost(x0, -noise if method == "flip" else noise, metric, precision)
    index, solve_ms = _timed_solve(cost, solver, x0.device)
    paired = noise[index]
    after = paired_distance(x0, paired, metric)
    return CouplingResult(paired, index, _mean(before), _mean(after), cost_ms, solve_ms, method, metric)
