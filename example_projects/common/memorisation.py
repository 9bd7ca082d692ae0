"""How close generated samples sit to the training set, measured against held-out data.

A model trained on a fixed training set can learn to reproduce its items. These measures put each
sample's distance to its nearest training item beside the same distance of held-out items (new
items of the true distribution), in pixel space (the flattened values):

- ``copy_share``: the share of samples closer to a training item than any held-out item is;
- ``near_share``: the share closer than the held-out items' 5th percentile (about 5 % for samples
  as new as the held-out items);
- ``distance_ratio``: the samples' median distance over the held-out items' median. Below 1: closer
  to the training set than new items are, or smoother than real items (a blurry sample can sit near
  a training item without copying it, so read it beside FID).

The dataset-level coupling's cheap runner (``experiments/dataset_fm``) and the examples' FID
callback (``FIDCallback(copies=True)``) both use them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nearest_distance(x: Tensor, train: Tensor, chunk: int = 500) -> Tensor:
    """The Euclidean distance from each row of ``x`` to its nearest row of ``train``.

    Args:
        x: ``(n, D)`` items.
        train: ``(N, D)`` training items.
        chunk: Rows of ``x`` per distance block (memory: ``chunk x N`` float64 values).

    Returns:
        ``(n,)`` float64 distances.
    """
    out = [
        torch.cdist(x[i : i + chunk].double(), train.double()).min(1).values for i in range(0, len(x), chunk)
    ]
    return torch.cat(out)


def memorisation(samples: Tensor, train: Tensor, held_nn: Tensor) -> dict[str, float]:
    """The copy share, near share and distance ratio of ``samples``.

    Args:
        samples: ``(n, D)`` generated samples.
        train: ``(N, D)`` training items.
        held_nn: ``(M,)`` the held-out items' ``nearest_distance`` to ``train`` (the reference).

    Returns:
        ``{"copy_share", "near_share", "distance_ratio"}``.
    """
    d = nearest_distance(samples, train)
    return {
        "copy_share": float((d < held_nn.min()).double().mean()),
        "near_share": float((d < torch.quantile(held_nn, 0.05)).double().mean()),
        "distance_ratio": float(torch.quantile(d, 0.5) / torch.quantile(held_nn, 0.5)),
    }
