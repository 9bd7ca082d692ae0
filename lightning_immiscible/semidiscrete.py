"""Dataset-level coupling: the optimal transport map from Gaussian noise to a fixed training set.

Batch coupling re-pairs noise with data inside one batch. Semi-discrete optimal transport pairs
each noise draw `z` with an item of the **whole** training set `y_1 ... y_N`: the map

```text
T(z) = argmin_j |z - y_j|^2 - g_j  =  argmax_j <z, y_j> - (|y_j|^2 - g_j) / 2
```

with one dual potential `g_j` per item, fitted once so that standard normal noise lands on every
item equally often (semi-discrete flow matching, Mousavi-Hosseini et al., arXiv 2509.25519; ott-jax's
`SemidiscreteSolver`). A training step then draws fresh noise and trains on the items the map sends
it to; finding them is one inner-product search over the training set.

[SemidiscreteMap][lightning_immiscible.semidiscrete.SemidiscreteMap] holds the items and the
potentials:

- `fit(steps)` runs stochastic gradient on the dual: each step sends a batch of noise through the
  current map and moves `g_j` by the item's target share `1 / N` minus the share of the batch that
  hit it (Adam; the returned potentials are an exponential moving average of the iterates).
  Fitting resumes: a second `fit` continues the same noise stream, and `state_dict` /
  `load_state_dict` carry the state across processes and runs.
- `hit_chi2()` measures how uniformly the map hits the items: the chi-squared divergence
  `N sum_j p_j^2 - 1` of its hit distribution from uniform, estimated without bias from the
  pairs of a fixed noise sample that land on the same item. `0`: every item is hit equally often;
  `1 / (1 + chi2)` is the share of the training set the map effectively uses.
- `assign(noise)` is the map: `(B, *dims)` noise to `(B,)` item indices.

With integer `labels`, each class keeps its own potentials: a noise draw that comes with label
`c` is matched within class `c`'s items only, and fitting draws each noise's label as the label of
a uniformly drawn item, so every item's target share is still `1 / N` and a class's share is its
share of the data. The map is then the optimal transport map from the noise to each class's items
separately (what a class-conditional model trains on), never across classes.

Randomness: no global RNG. Fitting step `s` draws its noise from the stream
`Stream.SEMIDISCRETE` at `(0, rank, s)` and its labels at `(1, rank, s)`; the convergence sample is
the same every time (`(2, 0, i)`), so successive `hit_chi2` values are comparable.

Memory: the items as `(N, D)` float32 (the map keeps its own flattened copy), three `(N,)` float64
vectors for the fit, and a `(B, chunk)` score block per search. Time per search: `B N D`
multiply-adds. See the user guide for scaling beyond one device's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_immiscible.checks import CouplingInputError
from lightning_immiscible.streams import Stream, draw_noise, stream_seed

#: The format of `SemidiscreteMap.state_dict` (a newer library refuses an older one it cannot read).
STATE_VERSION = 1


@dataclass
class FitReport:
    """What a call of [fit][lightning_immiscible.semidiscrete.SemidiscreteMap.fit] did.

    Attributes:
        steps: Fitting steps the map has made in all (this call's and earlier ones).
        seconds: Wall time of this call.
        chi2: `(step, chi2)` for every convergence check of this call (`hit_chi2` of the averaged
            potentials).
        converged: Whether the last check reached `tol`.
    """

    steps: int
    seconds: float
    chi2: list[tuple[int, float]] = field(default_factory=list)
    converged: bool = False


class SemidiscreteMap:
    """The semi-discrete optimal transport map from standard normal noise to a fixed set of items.

    Args:
        data: `(N, *dims)` floating tensor, the training items (what the model trains on: pixels,
            or latents); flattened to `(N, D)` float32 on its device. `N >= 2`.
        labels: `(N,)` integer class labels, or `None`. With labels, each class has its own
            potentials and noise is only ever matched within its label's items.
        seed: The seed of the fitting noise streams (`None`: `torch.initial_seed()` now, the run
            seed `seed_everything` set).

    Raises:
        CouplingInputError: `data` is not a floating tensor of at least 2 items, has non-finite
            values, or `labels` is not an integer tensor of `N` labels.

    Examples:
        ```python
        import torch
        from lightning_immiscible.semidiscrete import SemidiscreteMap

        data = torch.rand(500, 1, 8, 8) * 2 - 1
        sd = SemidiscreteMap(data, seed=0)
        report = sd.fit(steps=300, batch_size=256)
        items = sd.assign(torch.randn(16, 1, 8, 8))  # (16,) indices into data
        ```
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, *, seed: int | None = None) -> None:
        if not isinstance(data, Tensor) or not data.is_floating_point() or data.ndim < 2 or data.shape[0] < 2:
            got = (
                f"{type(data).__name__} {tuple(data.shape)}"
                if isinstance(data, Tensor)
                else type(data).__name__
            )
            raise CouplingInputError(
                "SemidiscreteMap(data=...): expected a floating tensor (N, *dims) with N >= 2 items, "
                f"got {got}."
            )
        items = data.detach().reshape(data.shape[0], -1).to(torch.float32).contiguous()
        if not torch.isfinite(items).all():
            raise CouplingInputError("SemidiscreteMap(data=...): the items contain NaN or inf values.")
        self.items = items
        self.item_shape = tuple(data.shape[1:])
        self.labels = _check_labels(labels, items.shape[0])
        self._classes = _class_members(self.labels)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        sq = items.double().pow(2).sum(1)
        # Start from the inner-product map (g = |y|^2 - mean): the |y|^2 term, which would send
        # nearly all noise to the items nearest the origin in high dimension, cancels.
        self.potentials = (sq - sq.mean()).to(items.device)
        self._sq = sq.to(items.device)
        #: The items' RMS norm: the scale of the scores `<z, y_j>`, in which `fit`'s `lr` is given.
        self.scale = float(sq.mean().sqrt()) or 1.0
        self._iterate = self.potentials.clone()
        self._opt_state: dict[str, Any] = {}
        self.steps = 0

    @property
    def n(self) -> int:
        """The number of items `N`."""
        return self.items.shape[0]

    @property
    def dim(self) -> int:
        """Values per item `D`."""
        return self.items.shape[1]

    def assign(self, noise: Tensor, labels: Tensor | None = None, chunk: int = 8192) -> Tensor:
        """The map: the item each noise draw is sent to.

        Args:
            noise: `(B, *dims)` noise (the items' shape), on the items' device.
            labels: `(B,)` the label each draw comes with; required when the map has labels,
                refused when it has none.
            chunk: Items scored at a time (memory: `B x chunk` floats).

        Returns:
            `(B,)` int64 indices into the items.

        Raises:
            CouplingInputError: A shape that does not match the items, or labels missing, unknown
                or not expected.
        """
        return self._assign(self._flat_noise(noise), labels, self.potentials, chunk)

    def _assign(self, z: Tensor, labels: Tensor | None, g: Tensor, chunk: int = 8192) -> Tensor:
        """`assign` on flattened `(B, D)` noise under potentials `g`."""
        if self.labels is None:
            if labels is not None:
                raise CouplingInputError(
                    "SemidiscreteMap.assign(labels=...): this map was built without labels; "
                    "build it with SemidiscreteMap(data, labels) to match within classes."
                )
            return self._search(z, None, g, chunk)
        if labels is None or labels.shape != (z.shape[0],) or labels.is_floating_point():
            raise CouplingInputError(
                f"SemidiscreteMap.assign: this map matches within classes; pass labels=(B,) integers "
                f"for the {z.shape[0]} noise draws (got {None if labels is None else tuple(labels.shape)})."
            )
        out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
        labels = labels.to(z.device)
        for label in labels.unique().tolist():
            members = self._classes.get(int(label))
            if members is None:
                raise CouplingInputError(
                    f"SemidiscreteMap.assign: label {label} has no items in the map "
                    f"(its labels are {sorted(self._classes)})."
                )
            rows = (labels == label).nonzero().squeeze(1)
            out[rows] = members[self._search(z[rows], members, g, chunk)]
        return out

    def hits(self, noise: Tensor, labels: Tensor | None = None, potentials: Tensor | None = None) -> Tensor:
        """How often each item is hit: `(N,)` float64 counts of the items `noise` is sent to.

        Args:
            noise: `(B, *dims)` or flattened `(B, D)` noise.
            labels: `(B,)` labels, for a map with labels.
            potentials: `(N,)` potentials to map with (default: the fitted `potentials`).
        """
        flat = noise.ndim == 2 and noise.shape[1] == self.dim
        z = noise if flat else self._flat_noise(noise)
        g = self.potentials if potentials is None else potentials
        idx = self._assign(z.to(self.items.device, torch.float32), labels, g)
        return torch.bincount(idx, minlength=self.n).to(torch.float64)

    def fit(
        self,
        steps: int,
        *,
        batch_size: int = 1024,
        lr: float = 0.02,
        ema: float = 0.99,
        tol: float | None = 0.05,
        check_every: int = 500,
        check_samples: int = 65536,
        rank: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        log: Callable[[int, float], None] | None = None,
    ) -> FitReport:
        """Fits the potentials: `steps` more stochastic gradient steps on the semi-discrete dual.

        Args:
            steps: Fitting steps to make in this call (the map counts them across calls).
            batch_size: Noise draws per step (per rank, when `reduce` sums over ranks).
            lr: Adam's learning rate as a fraction of the items' RMS norm `scale` (the spread of
                the scores `<z, y_j>`), so that one setting suits pixels and latents alike.
            ema: Decay of the moving average of the iterates that becomes `potentials`.
            tol: Stop at a convergence check whose `hit_chi2` is at most `tol` (`None`: never).
            check_every: Steps between convergence checks (and one at the end of the call).
            check_samples: Noise draws per convergence check.
            rank: This process's rank: part of the fitting noise's stream position.
            reduce: Sums a float64 vector over processes (e.g. an all-reduce): each step's `(N + 1,)`
                hit counts and failure flag, and each check's `(1,)` failure flag, so that all ranks
                make the same update and stop together if one fails (in its noise draw, its search
                or its check); `None`: this process alone.
            log: Called with `(step, chi2)` at each convergence check.

        Returns:
            A [FitReport][lightning_immiscible.semidiscrete.FitReport].
        """
        if steps < 0 or batch_size < 1 or check_every < 1 or not 0 <= ema < 1 or lr <= 0:
            raise ValueError(
                f"SemidiscreteMap.fit: need steps >= 0, batch_size >= 1, check_every >= 1, 0 <= ema < 1 "
                f"and lr > 0 (got steps={steps}, batch_size={batch_size}, check_every={check_every}, "
                f"ema={ema}, lr={lr})."
            )
        start, report = time.perf_counter(), FitReport(steps=self.steps, seconds=0.0)
        for i in range(steps):
            counts = self._step_counts(batch_size, rank, reduce)
            self._adam_step(counts / counts.sum() - 1.0 / self.n, lr * self.scale)
            self._iterate_ema(ema)
            self.steps += 1
            if (i + 1) % check_every == 0 or i + 1 == steps:
                chi2 = self._checked_chi2(check_samples, reduce)
                report.chi2.append((self.steps, chi2))
                if log is not None:
                    log(self.steps, chi2)
                if tol is not None and chi2 <= tol:
                    report.converged = True
                    break
        report.steps, report.seconds = self.steps, time.perf_counter() - start
        return report

    def _step_counts(self, batch_size: int, rank: int, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
        """This step's hit counts at the iterate (summed over ranks by `reduce`).

        With `reduce`, a rank whose search fails still joins the sum, with a failure flag, so
        every rank stops at the same step instead of waiting for it.
        """
        if reduce is None:
            return self._local_counts(batch_size, rank)
        error: Exception | None = None
        try:
            counts = self._local_counts(batch_size, rank)
        except Exception as exc:
            error, counts = exc, torch.zeros(self.n, dtype=torch.float64, device=self.items.device)
        summed = self._flagged(counts, error, reduce, f"fitting step {self.steps}")
        return summed.to(torch.float64)

    def _local_counts(self, batch_size: int, rank: int) -> Tensor:
        """`(N,)` this rank's hit counts at the iterate: its fitting noise and labels, then the search."""
        noise, labels = self._fit_noise(batch_size, rank), self._fit_labels(batch_size, rank)
        return self.hits(noise, labels, self._iterate)

    def _checked_chi2(self, samples: int, reduce: Callable[[Tensor], Tensor] | None) -> float:
        """The convergence check's `hit_chi2`; with `reduce`, a rank whose check fails stops them all."""
        if reduce is None:
            return self.hit_chi2(samples)
        error: Exception | None = None
        chi2 = float("nan")
        try:
            chi2 = self.hit_chi2(samples)
        except Exception as exc:
            error = exc
        empty = torch.zeros(0, dtype=torch.float64, device=self.items.device)
        self._flagged(empty, error, reduce, f"the convergence check after step {self.steps}")
        return chi2

    @staticmethod
    def _flagged(
        values: Tensor, error: Exception | None, reduce: Callable[[Tensor], Tensor], where: str
    ) -> Tensor:
        """`values` summed over ranks with a failure flag: raises this rank's error, or another rank's.

        Args:
            values: `(K,)` float64 this rank's values (zeros when it failed).
            error: This rank's failure, or `None`.
            reduce: The sum over ranks.
            where: Named in the error a healthy rank raises.

        Returns:
            `(K,)` the summed values, when no rank failed.
        """
        flag = torch.tensor([float(error is not None)], dtype=torch.float64, device=values.device)
        summed = reduce(torch.cat([values, flag]))
        if error is not None:
            raise error
        if float(summed[-1]) > 0:
            raise RuntimeError(
                f"SemidiscreteMap.fit: another rank failed at {where} (its own error is in its log); "
                "every rank stops here."
            )
        return summed[:-1]

    def hit_chi2(self, samples: int = 65536, batch_size: int = 2048) -> float:
        """How far the map's hit distribution is from uniform: `N sum_j p_j^2 - 1`, estimated.

        Sends a fixed sample of `samples` noise draws (the same at every call) through the map and
        counts hits `c_j`; `sum_j c_j (c_j - 1) / (M (M - 1))` is an unbiased estimate of
        `sum_j p_j^2`. Its standard error is about `sqrt(2 N) / M` near uniform.

        Returns:
            The estimate (`0` for a uniform map; it can dip slightly below 0 by chance).
        """
        counts = torch.zeros(self.n, dtype=torch.float64, device=self.items.device)
        for i, lo in enumerate(range(0, samples, batch_size)):
            b = min(batch_size, samples - lo)
            counts += self.hits(self._noise(b, 2, 0, i), self._labels_for(b, 2, 0, i))
        m = counts.sum()
        return float(self.n * (counts * (counts - 1)).sum() / (m * (m - 1)) - 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The fit's state (potentials, iterate, optimiser moments, steps, seed) and the data's shape."""
        return {
            "version": STATE_VERSION,
            "n": self.n,
            "dim": self.dim,
            "labelled": self.labels is not None,
            "seed": self.seed,
            "steps": self.steps,
            "potentials": self.potentials.cpu(),
            "iterate": self._iterate.cpu(),
            "adam": {k: v.cpu() for k, v in self._opt_state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a fit made on the same items (same `N`, `D` and labelling).

        Raises:
            ValueError: The state was made for other data or by an unknown format.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"SemidiscreteMap state version {state.get('version')!r}; this library reads {STATE_VERSION}."
            )
        mine = (self.n, self.dim, self.labels is not None)
        theirs = (state["n"], state["dim"], state["labelled"])
        if mine != theirs:
            raise ValueError(
                f"SemidiscreteMap.load_state_dict: the state was fitted on (N, D, labelled) = {theirs}, "
                f"this map holds {mine}: fit the map on these items instead."
            )
        dev = self.items.device
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.potentials = state["potentials"].to(dev, torch.float64)
        self._iterate = state["iterate"].to(dev, torch.float64)
        self._opt_state = {k: v.to(dev) for k, v in state["adam"].items()}

    # ------------------------------------------------------------------------------------------
    # internals

    def _flat_noise(self, noise: Tensor) -> Tensor:
        if not isinstance(noise, Tensor) or tuple(noise.shape[1:]) != self.item_shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise CouplingInputError(
                f"SemidiscreteMap: noise must be (B, {', '.join(map(str, self.item_shape))}) like the "
                f"items, got {got}."
            )
        return noise.reshape(noise.shape[0], -1).to(self.items.device, torch.float32)

    def _offsets(self, members: Tensor | None, g: Tensor) -> Tensor:
        """`(|y_j|^2 - g_j) / 2` for the items searched, float32."""
        h = (self._sq - g) / 2
        return (h if members is None else h[members]).float()

    def _search(self, z: Tensor, members: Tensor | None, g: Tensor, chunk: int) -> Tensor:
        """`argmax_j <z, y_j> - h_j` over all items or `members`; indices into that set."""
        items = self.items if members is None else self.items[members]
        h = self._offsets(members, g)
        best = torch.full((z.shape[0],), -torch.inf, device=z.device)
        arg = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        for lo in range(0, items.shape[0], chunk):
            scores = z @ items[lo : lo + chunk].T - h[lo : lo + chunk]
            val, idx = scores.max(1)
            better = val > best
            best, arg = torch.where(better, val, best), torch.where(better, idx + lo, arg)
        return arg

    def _noise(self, b: int, *words: int) -> Tensor:
        return draw_noise((b, self.dim), self.seed, Stream.SEMIDISCRETE, *words, device=self.items.device)

    def _labels_for(self, b: int, *words: int) -> Tensor | None:
        """Each draw's label: the label of a uniformly drawn item (`None` without labels)."""
        if self.labels is None:
            return None
        gen = torch.Generator().manual_seed(stream_seed(self.seed, Stream.SEMIDISCRETE, *words))
        return self.labels[torch.randint(self.n, (b,), generator=gen).to(self.labels.device)]

    def _fit_noise(self, b: int, rank: int) -> Tensor:
        return self._noise(b, 0, rank, self.steps)

    def _fit_labels(self, b: int, rank: int) -> Tensor | None:
        return self._labels_for(b, 1, rank, self.steps)

    def _adam_step(self, grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """One Adam step on the iterate: descent on the dual loss, whose gradient is `grad`."""
        st = self._opt_state
        if not st:
            st.update(
                m=torch.zeros_like(grad), v=torch.zeros_like(grad), t=torch.zeros((), dtype=torch.float64)
            )
        st["t"] += 1
        st["m"].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        st["v"].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = st["m"] / (1 - betas[0] ** float(st["t"]))
        v_hat = st["v"] / (1 - betas[1] ** float(st["t"]))
        self._iterate -= lr * m_hat / (v_hat.sqrt() + 1e-12)

    def _iterate_ema(self, ema: float) -> None:
        self.potentials.mul_(ema).add_(self._iterate, alpha=1 - ema)


def _check_labels(labels: Tensor | None, n: int) -> Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (n,):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise CouplingInputError(
            f"SemidiscreteMap(labels=...): expected ({n},) integer class labels, one per item, got {got}."
        )
    return labels.to(torch.int64)


def _class_members(labels: Tensor | None) -> dict[int, Tensor]:
    if labels is None:
        return {}
    return {int(c): (labels == c).nonzero().squeeze(1) for c in labels.unique().tolist()}
