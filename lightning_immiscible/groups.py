"""Process groups of the coupling: which ranks pool their batches, where exchanges run, bounded waits.

Every collective the library issues goes through this module's
[collective][lightning_immiscible.groups.collective] (a failure or a time-out becomes an error that
says which it was and what to check) on a tensor placed by
[place][lightning_immiscible.groups.place] on the group's exchange device: the module's device
under NCCL (which takes accelerator tensors only), the CPU under Gloo. The groups a fit creates are
destroyed by [destroy_groups][lightning_immiscible.groups.destroy_groups] at its end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def process_rank() -> int:
    """This process's global rank (0 without an initialised process group)."""
    return dist.get_rank() if distributed_ready() else 0


def distributed_ready() -> bool:
    """Whether `torch.distributed` has an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def exchange_device(process_group: Any, device: torch.device | None) -> torch.device:
    """Where tensors exchanged over `process_group` live: `device` under NCCL, else the CPU.

    Args:
        process_group: A `torch.distributed` group.
        device: The module's device (`None`: the current CUDA device under NCCL).

    Raises:
        ValueError: Under NCCL with a CPU device.
    """
    if dist.get_backend(process_group) == "nccl":
        if device is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if device is None or device.type == "cpu":
            raise ValueError(
                "ImmiscibleCoupling: an NCCL process group exchanges accelerator tensors only, but the "
                f"coupling was given device {device}. Pass the module's device (pl_module.device)."
            )
        return device
    return torch.device("cpu")


#: Where exchanges run under Gloo.
CPU = torch.device("cpu")


@dataclass(frozen=True)
class RankGroup:
    """The ranks that pool their batches for one assignment, and where their exchanges run.

    Attributes:
        index: Group number (`0..num_groups-1`); seeds the group's noise pool.
        ranks: Global ranks in the group, ascending.
        process_group: The group's `torch.distributed` group (`None` for a group of one rank).
        header_group: The group the per-step header travels over: the world, so that a failure on
            any rank ends every rank in the same step (`None` in a single process).
        device: The device exchanged tensors are placed on (see `exchange_device`).
        created: The process groups this object's builder created (destroyed at the fit's end).
    """

    index: int
    ranks: tuple[int, ...]
    process_group: Any = None
    header_group: Any = None
    device: torch.device = CPU
    created: tuple[Any, ...] = field(default=(), compare=False)

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return len(self.ranks)


SINGLE = RankGroup(0, (0,))
"""The group of a single process: no collective is ever called."""


def partition_ranks(scope: str | int, world_size: int, ranks_per_node: int) -> list[tuple[int, ...]]:
    """Splits `range(world_size)` into coupling groups of consecutive ranks.

    Args:
        scope: `"global"` (one group), `"local"` (one group per rank), `"node"` (groups of
            `ranks_per_node`) or an int (groups of that many ranks).
        world_size: Number of processes.
        ranks_per_node: Processes per node (Lightning: `trainer.num_devices`).

    Returns:
        The groups as tuples of global ranks.

    Raises:
        ValueError: If the scope is unknown or does not divide the world size.
    """
    if scope == "global":
        size = world_size
    elif scope == "local":
        size = 1
    elif scope == "node":
        size = ranks_per_node
    elif isinstance(scope, int) and not isinstance(scope, bool) and scope >= 1:
        size = scope
    else:
        raise ValueError(f"Unknown scope {scope!r}: use 'global', 'local', 'node' or a positive int.")
    size = min(size, world_size)
    if world_size % size:
        raise ValueError(
            f"scope={scope!r} means groups of {size} ranks, which does not divide the world size "
            f"{world_size}. Choose a group size that divides it (or 'global' / 'local')."
        )
    return [tuple(range(start, start + size)) for start in range(0, world_size, size)]


def build_world_group(timeout_s: float | None = None, device: torch.device | None = None) -> RankGroup:
    """The world as one group (a collective call when `timeout_s` asks for a dedicated group).

    Every rank must call it at the same point. With `timeout_s` its collectives are bounded by it.

    Args:
        timeout_s: Timeout of the group's collectives (`None`: the default group's).
        device: The module's device (exchanges run there under NCCL).
    """
    if not distributed_ready() or dist.get_world_size() == 1:
        return SINGLE
    ranks = tuple(range(dist.get_world_size()))
    handle, created = dist.group.WORLD, ()
    if timeout_s is not None:
        with collective(RankGroup(0, ranks), "new_group"):
            handle = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
        created = (handle,)
    return RankGroup(0, ranks, handle, handle, exchange_device(handle, device), created)


def build_rank_group(
    scope: str | int,
    ranks_per_node: int = 1,
    timeout_s: float | None = None,
    device: torch.device | None = None,
    world: RankGroup | None = None,
) -> RankGroup:
    """This rank's coupling group (a collective call when subgroups are needed).

    Every rank must call it, in the same order (`torch.distributed.new_group` is collective).

    Args:
        scope: See [partition_ranks][lightning_immiscible.groups.partition_ranks].
        ranks_per_node: Processes per node.
        timeout_s: Timeout of the subgroups' collectives (`None`: the backend's default).
        device: The module's device (exchanges run there under NCCL).
        world: The world group the headers travel over (`None`: built here).

    Returns:
        The group; its `header_group` is the world's.
    """
    world = world if world is not None else build_world_group(timeout_s, device)
    if world.process_group is None:
        return SINGLE
    groups = partition_ranks(scope, world.size, ranks_per_node)
    mine = next(i for i, g in enumerate(groups) if process_rank() in g)
    if len(groups[mine]) == 1:
        return RankGroup(mine, groups[mine], None, world.process_group, world.device)
    if len(groups) == 1:
        return world
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    with collective(RankGroup(mine, groups[mine]), "new_group"):
        handles = [dist.new_group(list(g), **kwargs) for g in groups]  # collective: all ranks, all groups
    return RankGroup(mine, groups[mine], handles[mine], world.process_group, world.device, tuple(handles))


def destroy_groups(*groups: RankGroup) -> None:
    """Destroys the process groups the given groups' builders created (each once)."""
    if not distributed_ready():
        return
    seen: set[int] = set()
    for group in groups:
        for handle in group.created:
            if id(handle) not in seen and handle is not None:
                seen.add(id(handle))
                dist.destroy_process_group(handle)


def place(t: Tensor, group: RankGroup) -> Tensor:
    """`t` on the group's exchange device: every tensor the library exchanges passes through here."""
    return t.to(group.device)


def broadcast_from_first(group: RankGroup, value: int, what: str) -> int:
    """The group's first rank's `value` on every rank of `group` (no collective in a group of one).

    Args:
        group: From [build_world_group][lightning_immiscible.groups.build_world_group].
        value: This rank's value (only the first rank's matters).
        what: Named in the error when the broadcast fails or times out.
    """
    if group.process_group is None:
        return int(value)
    data = place(torch.tensor([int(value)], dtype=torch.int64), group)
    with collective(group, f"{what} broadcast"):
        dist.broadcast(data, src=group.ranks[0], group=group.process_group)
    return int(data.cpu()[0])


class CollectiveError(RuntimeError):
    """A collective of the coupling failed or timed out (the message says which, and what to check)."""


@contextmanager
def collective(group: RankGroup, what: str) -> Iterator[None]:
    """Turns a failed or timed-out collective into an error that says which it was and what to check."""
    try:
        yield
    except RuntimeError as exc:
        where = f"the {what} of coupling group {group.index} (ranks {list(group.ranks)})"
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise CollectiveError(
                f"ImmiscibleCoupling: rank {process_rank()} waited in {where} and another rank did not "
                "reach it in time (it is stalled or slow, or ranks run different numbers of training "
                "batches: give every rank the same number, e.g. with Lightning's DistributedSampler). "
                f"`collective_timeout_s` bounds the wait. The backend said: {exc}"
            ) from exc
        raise CollectiveError(
            f"ImmiscibleCoupling: {where} failed on rank {process_rank()}: {exc}. A rank of the group "
            "probably crashed or closed its connection; its own error says why."
        ) from exc
